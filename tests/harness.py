"""Running a real Marathon (orchestrator + node, embedded stores) inside a test's trio run."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio

from marathon.cli.serve import serve_role
from marathon.config import Config, load_config
from marathon.node.procs import alive, descendants  # noqa: F401  (used by tests)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CLAUDE = REPO_ROOT / ".cache/claude-code/node_modules/@anthropic-ai/claude-code/bin/claude.exe"
TEST_KEY = "sk-ant-test-" + "k" * 24
TERMINAL = {"succeeded", "failed", "cancelled", "timed_out"}


def claude_bin() -> str:
    """The Claude Code CLI, for a test that runs it: an error naming the fix when it is missing."""
    path = os.environ.get("MARATHON_CLAUDE_BIN") or str(DEFAULT_CLAUDE)
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"Claude Code CLI not found at {path}: run `make claude-code` (make test does)")
    return path


def claude_bin_if_present() -> str:
    """The Claude Code CLI, or "" where it is not installed: a Marathon that runs no task
    (the gateway against scripted nodes, make test-fast) does not need it."""
    try:
        return claude_bin()
    except RuntimeError:
        return ""


SCRATCH: list[str] = []


def scratch_dir(prefix: str = "marathon-test-") -> str:
    """A temp dir the sandbox uid can traverse (pytest's tmp_path is 0700); removed at the
    end of the test session (conftest)."""
    d = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    os.chmod(d, 0o711)
    SCRATCH.append(d)
    return d


def make_git_repo(path: str, files: dict[str, str] | None = None) -> str:
    import subprocess

    os.makedirs(path, exist_ok=True)
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    subprocess.run(["git", "init", "-q", "-b", "main", path], check=True, env=env)
    for name, content in (files or {"README.md": "# test repo\n"}).items():
        Path(path, name).write_text(content)
    subprocess.run(["git", "-C", path, "add", "-A"], check=True, env=env)
    subprocess.run(["git", "-C", path, "commit", "-q", "-m", "initial"], check=True, env=env)
    return path


def marathon_config(data_dir: str, **overrides) -> Config:
    flags = dict(
        data_dir=data_dir,
        http_listen="tcp:127.0.0.1:0",
        gateway_listen="tcp:127.0.0.1:0",
        anthropic_api_key=TEST_KEY,
        anthropic_base_url="http://127.0.0.1:9",
        claude_bin=claude_bin_if_present(),
        heartbeat_interval=0.5,
        node_timeout=5.0,
        node_grace=1.0,
        assign_timeout=5.0,
        connect_timeout=20.0,
        bwrap="required",
        log_level="debug",
    )
    flags.update(overrides)
    return load_config(flags, env={}, cwd=data_dir)


@dataclass
class Marathon:
    url: str
    gateway: str
    node_secret: str
    info: object
    node: object
    client: httpx.AsyncClient

    async def submit(self, prompt: str, **kw) -> dict:
        r = await self.client.post("/v1/tasks", json={"prompt": prompt, **kw})
        assert r.status_code == 201, r.text
        return r.json()

    async def task(self, task_id: str) -> dict:
        r = await self.client.get(f"/v1/tasks/{task_id}")
        r.raise_for_status()
        return r.json()

    async def events(self, task_id: str, *, after: int = 0, follow: bool = True, until=None) -> list[dict]:
        """Read the SSE stream; stop at its end (task terminal) or when ``until(event)`` is true."""
        out = []
        headers = {"Last-Event-ID": str(after)} if after else {}
        async with self.client.stream(
            "GET",
            f"/v1/tasks/{task_id}/events",
            params={"follow": "1" if follow else "0"},
            headers=headers,
            timeout=httpx.Timeout(10, read=None),
        ) as resp:
            resp.raise_for_status()
            ev: dict = {}
            async for line in resp.aiter_lines():
                if line == "":
                    if ev:
                        ev["data"] = json.loads(ev["data"])
                        out.append(ev)
                        if until is not None and until(ev):
                            return out
                    ev = {}
                elif line.startswith(":"):
                    continue
                else:
                    k, _, v = line.partition(": ")
                    if k == "id":
                        ev["id"] = int(v)
                    elif k in ("event", "data"):
                        ev[k] = v
        return out

    async def wait_state(self, task_id: str, states: set[str]) -> list[dict]:
        return await self.events(task_id, until=lambda e: e["event"] == "state" and e["data"]["state"] in states)

    async def finish(self, task_id: str, timeout: float = 90) -> dict:
        with trio.fail_after(timeout):
            await self.events(task_id)
        return await self.task(task_id)


async def admin_token(info) -> str:
    from marathon.cli import credentials
    from marathon.errors import AuthError
    from marathon.orchestrator.auth import Principal

    saved = credentials.load(info.url)
    if saved:
        try:  # a port can be reused by a later test's orchestrator, with another database
            await info.accounts.authenticate(f"Bearer {saved['token']}")
            return saved["token"]
        except AuthError:
            pass
    admin = await info.accounts.ensure_local_admin()
    key, _ = await info.accounts.create_key(Principal(admin.id, admin.email, True), "tests")
    credentials.save(info.url, key)
    return key


@asynccontextmanager
async def run_marathon(config: Config, role: str = "all"):
    os.makedirs(config.data_dir, mode=0o711, exist_ok=True)
    os.chmod(config.data_dir, 0o711)
    async with trio.open_nursery() as nursery:
        info, node = await nursery.start(serve_role, role, config)
        token = await admin_token(info)
        async with httpx.AsyncClient(
            base_url=info.url, timeout=30, trust_env=False, headers={"Authorization": f"Bearer {token}"}
        ) as client:
            if node is not None:
                with trio.fail_after(10):
                    await node.connected.wait()
            try:
                yield Marathon(info.url, info.gateway, info.node_secret, info, node, client)
            finally:
                nursery.cancel_scope.cancel()
