"""Running Claude Code headless, as an unprivileged user, and turning its output into events."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from collections.abc import Awaitable, Callable

import trio

from marathon.agent.stream import StreamParser
from marathon.errors import SandboxError, single_errors
from marathon.protocol import messages as m

log = logging.getLogger("marathon.agent")

Emit = Callable[[list[m.Event]], Awaitable[None]]
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "Marathon",
    "GIT_AUTHOR_EMAIL": "marathon@localhost",
    "GIT_COMMITTER_NAME": "Marathon",
    "GIT_COMMITTER_EMAIL": "marathon@localhost",
}


@dataclass
class RunUser:
    """Who Claude Code (and every git command on the workspace) runs as."""

    uid: int
    gid: int
    home: str

    @property
    def popen_kwargs(self) -> dict:
        if os.geteuid() == 0 and self.uid != 0:
            return {"user": self.uid, "group": self.gid, "extra_groups": []}
        return {}

    def base_env(self) -> dict[str, str]:
        return {
            "HOME": self.home,
            "TMPDIR": os.path.join(self.home, "tmp"),
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "USER": "marathon",
            **GIT_IDENTITY,
        }


def make_run_user(uid: int, root: str) -> RunUser:
    """A private HOME for the run; drop to ``uid`` when we are root, else run as ourselves."""
    if os.geteuid() != 0:
        uid = os.geteuid()
    gid = uid if os.geteuid() == 0 else os.getegid()
    home = os.path.join(root, f"marathon-home-{os.getpid()}")
    os.makedirs(os.path.join(home, "tmp"), mode=0o700, exist_ok=True)
    os.chmod(home, 0o700)
    if os.geteuid() == 0:
        for d in (home, os.path.join(home, "tmp")):
            os.chown(d, uid, gid)
    return RunUser(uid, gid, home)


async def run_git(user: RunUser, workspace: str, *args: str, env: dict | None = None, check: bool = True) -> str:
    res = await trio.run_process(
        ["git", "-C", workspace, *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env={**user.base_env(), **(env or {})},
        **user.popen_kwargs,
    )
    if check and res.returncode != 0:
        raise SandboxError(f"git {args[0]} failed: {res.stderr.decode(errors='replace').strip()[:500]}")
    return res.stdout.decode(errors="replace")


async def run_git_to_file(user: RunUser, workspace: str, path: str, *args: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        res = await trio.run_process(
            ["git", "-C", workspace, *args],
            stdout=out,
            capture_stderr=True,
            check=False,
            env=user.base_env(),
            **user.popen_kwargs,
        )
    if res.returncode != 0:
        raise SandboxError(f"git {args[0]} failed: {res.stderr.decode(errors='replace').strip()[:500]}")


def find_claude(configured: str = "") -> str:
    path = configured or os.environ.get("MARATHON_CLAUDE_BIN", "") or shutil.which("claude") or ""
    if not path or not os.access(path, os.X_OK):
        raise SandboxError(
            f"Claude Code CLI not found ({path or 'not on PATH'}); set MARATHON_CLAUDE_BIN or install @anthropic-ai/claude-code"
        )
    return path


@dataclass
class ClaudeRun:
    exit_code: int | None = None
    stderr_tail: str = ""
    parser: StreamParser = field(default_factory=StreamParser)
    killed: bool = False


async def run_claude(
    *,
    claude: str,
    prompt: str,
    workspace: str,
    user: RunUser,
    api_url: str,
    api_key: str,
    model: str | None,
    max_turns: int,
    emit: Emit,
    cancel: trio.Event,
    extra_env: dict[str, str] | None = None,
) -> ClaudeRun:
    """Run one ``claude -p`` to completion (or until ``cancel`` is set: then the whole process
    group is killed).  Every stdout line becomes events as it arrives."""
    cmd = [
        claude,
        "-p",
        prompt,
        "--output-format",
        "stream-json",
        "--verbose",
        "--max-turns",
        str(max_turns),
        "--dangerously-skip-permissions",
    ]
    if model:
        cmd += ["--model", model]
    env = {
        **user.base_env(),
        "ANTHROPIC_BASE_URL": api_url,
        "ANTHROPIC_API_KEY": api_key,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_ERROR_REPORTING": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        **(extra_env or {}),
    }
    run = ClaudeRun()
    try:
        proc = await trio.lowlevel.open_process(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=workspace,
            env=env,
            start_new_session=True,
            **user.popen_kwargs,
        )
    except OSError as exc:
        raise SandboxError(f"could not start Claude Code: {exc}") from None

    def kill(sig=signal.SIGKILL) -> None:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    async def read_stdout() -> None:
        buf = b""
        while chunk := await proc.stdout.receive_some(65536):
            buf += chunk
            *lines, buf = buf.split(b"\n")
            events = [ev for line in lines for ev in run.parser.line(line)]
            if events:
                await emit(events)
        if events := run.parser.line(buf):
            await emit(events)

    async def read_stderr() -> None:
        tail = b""
        while chunk := await proc.stderr.receive_some(65536):
            tail = (tail + chunk)[-4000:]
        run.stderr_tail = tail.decode(errors="replace").strip()

    async def watch_cancel(scope: trio.CancelScope) -> None:
        await cancel.wait()
        run.killed = True
        kill(signal.SIGTERM)
        with trio.move_on_after(2):
            await proc.wait()
        kill(signal.SIGKILL)

    try:
        with single_errors():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_cancel, nursery.cancel_scope)
                async with trio.open_nursery() as io:
                    io.start_soon(read_stdout)
                    io.start_soon(read_stderr)
                run.exit_code = await proc.wait()
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            kill()  # also whatever Claude Code left behind in its process group
            await proc.wait()
    return run
