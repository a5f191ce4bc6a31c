"""The one-file executable (``make build``) runs every role: orchestrator, node, agent, client."""

from __future__ import annotations

import os
import subprocess
from functools import partial

import pytest
import trio

from tests import fake_anthropic as fa
from tests.harness import REPO_ROOT, TEST_KEY, claude_bin, make_git_repo, scratch_dir

pytestmark = pytest.mark.slow
EXE = os.environ.get("MARATHON_EXE") or str(REPO_ROOT / "dist" / "marathon")


@pytest.fixture
def exe():
    if not os.access(EXE, os.X_OK):
        pytest.fail(f"{EXE} is missing: build it with `make build` (make test does)")
    return EXE


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_executable_runs_a_task_end_to_end(exe):
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == __import__("marathon").__version__

    tmp = scratch_dir()
    repo = make_git_repo(os.path.join(tmp, "repo"))
    http, gw = free_port(), free_port()
    script = [fa.tool_use("Write", {"file_path": "HELLO.txt", "content": "hi\n"}), fa.text("wrote it")]
    async with fa.open_fake_anthropic(script) as fake:
        env = {
            "PATH": os.environ["PATH"],
            "HOME": tmp,
            "MARATHON_DATA_DIR": os.path.join(tmp, "data"),
            "MARATHON_HTTP_LISTEN": f"tcp:127.0.0.1:{http}",
            "MARATHON_GATEWAY_LISTEN": f"tcp:127.0.0.1:{gw}",
            "MARATHON_ANTHROPIC_API_KEY": TEST_KEY,
            "MARATHON_ANTHROPIC_BASE_URL": fake.url,
            "MARATHON_CLAUDE_BIN": claude_bin(),
            "MARATHON_BWRAP": "required",
            "MARATHON_URL": f"http://127.0.0.1:{http}",
        }
        async with trio.open_nursery() as n:
            server = await n.start(
                partial(trio.run_process, [exe, "serve", "--role", "all"], env=env, check=False, stderr=subprocess.PIPE)
            )
            try:
                # wait for the API: the server says so on stderr
                buf = b""
                with trio.fail_after(30):
                    while b"API on" not in buf:
                        chunk = await server.stderr.receive_some(4096)
                        assert chunk, buf.decode()
                        buf += chunk
                n.start_soon(_drain, server.stderr)
                res = await trio.run_process(
                    [exe, "run", "write hello", "--repo", repo],
                    env=env,
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
                text = res.stdout.decode()
                assert res.returncode == 0, text + res.stderr.decode()
                assert "→ Write HELLO.txt" in text and "succeeded" in text
                task_id = text.split()[1]
                diff = await trio.run_process([exe, "diff", task_id], env=env, capture_stdout=True)
                assert "+++ b/HELLO.txt" in diff.stdout.decode()
                # the dashboard's files are in the executable, served at /
                import httpx

                async with httpx.AsyncClient(base_url=env["MARATHON_URL"], trust_env=False) as web:
                    for path, name in (("/", "index.html"), ("/ui/app.js", "app.js"), ("/ui/task.js", "task.js")):
                        r = await web.get(path)
                        assert r.status_code == 200, path
                        assert r.content == (REPO_ROOT / "marathon" / "web" / name).read_bytes(), path
            finally:
                server.terminate()
                with trio.move_on_after(10):
                    await server.wait()
                server.kill()


async def _drain(stream):
    while await stream.receive_some(65536):
        pass
