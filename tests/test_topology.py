"""The topology users deploy: orchestrator and node in separate processes.

- A task that runs longer than any idle timeout (trio's worker threads exit after 10 s idle;
  a parent-death signal follows the thread that forked) succeeds.
- A node killed with SIGKILL takes its sandboxes with it: nothing it started survives.
"""

from __future__ import annotations

import os
import re
import signal
import sys

import httpx
import pytest
import trio

from tests import fake_anthropic as fa
from tests.polling import until
from tests.harness import TEST_KEY, Marathon, alive, claude_bin, make_git_repo, scratch_dir

pytestmark = pytest.mark.slow


def _env(**kw) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "HOME": os.environ.get("HOME", "/")}
    env.update({f"MARATHON_{k.upper()}": str(v) for k, v in kw.items()})
    return env


async def _wait_for_line(path: str, pattern: str, timeout: float = 60) -> re.Match:
    with trio.fail_after(timeout):
        while True:
            with open(path, errors="replace") as f:
                found = re.search(pattern, f.read())
            if found:
                return found
            await trio.sleep(0.05)


def _procs_mentioning(text: str) -> set[int]:
    out = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    out.add(int(pid))
        except OSError:
            pass
    return out


async def _start(argv: list[str], env: dict, log: str):
    with open(log, "wb") as f:
        return await trio.lowlevel.open_process(argv, env=env, stdout=f, stderr=f)


async def _stop(proc) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGINT)
        with trio.move_on_after(20):
            await proc.wait()
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


async def test_long_task_on_a_separate_node_and_a_killed_node_leaves_nothing():
    tmp = scratch_dir()
    repo = make_git_repo(os.path.join(tmp, "repo"))
    slept = "python3 -c \"import time\nt = time.time()\nwhile time.time() - t < 35: time.sleep(0.5)\nprint('slept-35-seconds')\""

    def script(body, i):
        prompt = str(body["messages"][0]["content"])
        if "hang" in prompt:
            if i == 0:
                return fa.tool_use("Bash", {"command": "python3 -c 'import time; time.sleep(600)'", "timeout": 600000})
            return fa.hang()
        return [fa.tool_use("Bash", {"command": slept, "description": "take a while", "timeout": 120000}),
                fa.text("done after a while")][i]  # fmt: skip

    async with fa.open_fake_anthropic(script) as fake:
        orch_data, node_data = os.path.join(tmp, "orch"), os.path.join(tmp, "node")
        orch_log, node_log = os.path.join(tmp, "orch.log"), os.path.join(tmp, "node.log")
        # the first administrator, made where the orchestrator's configuration is
        made = await trio.run_process(
            [
                sys.executable,
                "-m",
                "marathon",
                "admin",
                "create-user",
                "ops@example.com",
                "--admin",
                "--password-stdin",
            ],
            env=_env(data_dir=orch_data),
            stdin=b"a long enough password\n",
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert made.returncode == 0, made.stderr
        orch = await _start(
            [sys.executable, "-m", "marathon", "serve", "--role", "orchestrator"],
            _env(data_dir=orch_data, http_listen="tcp:127.0.0.1:0", gateway_listen="tcp:127.0.0.1:0",
                 heartbeat_interval=0.5, node_grace=2),
            orch_log,
        )  # fmt: skip
        node = None
        try:
            api = (await _wait_for_line(orch_log, r"API on (http://[\d.:]+)")).group(1)
            gateway = (await _wait_for_line(orch_log, r"node gateway listening on (tcp:[\d.:]+)")).group(1)
            with open(os.path.join(orch_data, "node_secret")) as f:
                secret = f.read().strip()
            node = await _start(
                [sys.executable, "-m", "marathon", "serve", "--role", "node"],
                _env(data_dir=node_data, orchestrator=gateway, node_secret=secret, claude_bin=claude_bin(),
                     anthropic_api_key=TEST_KEY, anthropic_base_url=fake.url, bwrap="required",
                     heartbeat_interval=0.5),
                node_log,
            )  # fmt: skip
            async with httpx.AsyncClient(base_url=api, timeout=30, trust_env=False) as client:
                creds = {"email": "ops@example.com", "password": "a long enough password"}
                r = await client.post("/v1/auth/login", json=creds)
                client.headers["Authorization"] = f"Bearer {r.json()['token']}"
                mt = Marathon(api, gateway, secret, None, None, client)

                async def node_up() -> bool:
                    return bool((await client.get("/v1/nodes")).json().get("nodes"))

                await until(node_up, timeout=60)

                task = await mt.submit("take a while", repo=repo)
                final = await mt.finish(task["id"], timeout=180)
                with open(node_log) as f:
                    assert final["state"] == "succeeded", (final, f.read()[-2000:])
                results = [e["data"]["summary"] for e in await mt.events(task["id"], follow=False)
                           if e["event"] == "tool_result"]  # fmt: skip
                assert any(r.startswith("slept-35-seconds") for r in results), results
                assert final["duration_s"] >= 35

                # a node killed hard takes its sandbox (bwrap, the agent, Claude Code, the sleep) with it
                stuck = await mt.submit("hang here", repo=repo)
                await until(lambda: bool(_procs_mentioning("time.sleep(600)")), timeout=60)  # its tool runs
                sandbox_dir = os.path.join(node_data, "sandboxes", stuck["id"])
                before = _procs_mentioning(sandbox_dir) | _procs_mentioning("time.sleep(600)")
                assert before, "the sandbox's processes were not found"
                node.kill()
                await node.wait()
                await until(lambda: not _procs_mentioning(sandbox_dir) and not alive(before), timeout=15)
        finally:
            if node is not None:
                await _stop(node)
            await _stop(orch)
