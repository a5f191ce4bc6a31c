"""Running Claude Code headless, as an unprivileged user, and turning its output into events."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import stat
import subprocess
import tempfile
from dataclasses import dataclass, field
from collections.abc import Awaitable, Callable

import trio

from marathon.agent.files import create_private
from marathon.agent.stream import StreamParser
from marathon.errors import SandboxError
from marathon.protocol import messages as m

log = logging.getLogger("marathon.agent")

Emit = Callable[[list[m.Event]], Awaitable[None]]
MAX_LINE = 32 * 1024 * 1024  # a stream-json line (a tool result of a huge output) beyond this is skipped
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "Marathon",
    "GIT_AUTHOR_EMAIL": "marathon@localhost",
    "GIT_COMMITTER_NAME": "Marathon",
    "GIT_COMMITTER_EMAIL": "marathon@localhost",
}


class GitError(SandboxError):
    """A git command on the workspace failed (``disk_exhausted`` when the disk was full)."""

    def __init__(self, message: str, *, disk_full: bool = False):
        super().__init__(message)
        self.disk_full = disk_full
        self.code = "disk_exhausted" if disk_full else "git_error"


_ENOSPC = ("No space left on device", "Disk quota exceeded", "ENOSPC")


@dataclass
class RunUser:
    """Who Claude Code (and every git command on the workspace) runs as, and where its HOME
    and TMPDIR are (the task's capped disk)."""

    uid: int
    gid: int
    home: str
    tmp: str = "/tmp"

    @property
    def popen_kwargs(self) -> dict:
        if os.geteuid() == 0 and self.uid != 0:
            return {"user": self.uid, "group": self.gid, "extra_groups": []}
        return {}

    def base_env(self) -> dict[str, str]:
        return {
            "HOME": self.home,
            "TMPDIR": self.tmp,
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "USER": "marathon",
            "LOGNAME": "marathon",
            "SHELL": "/bin/bash",
            "GIT_CONFIG_NOSYSTEM": "1",
            **GIT_IDENTITY,
        }


def make_run_user(uid: int, gid: int | None = None, *, home: str = "", tmp: str = "") -> RunUser:
    """Drop to ``uid`` when we are root, else run as ourselves.  ``home``/``tmp`` are given by
    the node (the sandbox's own, on the task's disk); otherwise (a VM guest) a private HOME is
    made under /tmp."""
    if os.geteuid() != 0:
        uid, gid = os.geteuid(), os.getegid()
    gid = uid if gid is None else gid
    if not home:
        home = tempfile.mkdtemp(prefix="marathon-home-", dir="/tmp")
        if os.geteuid() == 0:
            os.chown(home, uid, gid)
    tmp = tmp or (os.path.join(home, "tmp") if home.startswith("/tmp/") else "/tmp")
    if tmp != "/tmp":
        os.makedirs(tmp, mode=0o700, exist_ok=True)
        if os.geteuid() == 0:
            st = os.lstat(tmp)
            if stat.S_ISDIR(st.st_mode) and not stat.S_ISLNK(st.st_mode):
                os.chown(tmp, uid, gid, follow_symlinks=False)
    return RunUser(uid, gid, home, tmp)


def _git_failure(args: tuple[str, ...], stderr: bytes) -> GitError:
    err = stderr.decode(errors="replace").strip()
    return GitError(f"git {args[0]} failed: {err[-500:]}", disk_full=any(s in err for s in _ENOSPC))


async def run_git(user: RunUser, workspace: str, *args: str, env: dict | None = None, check: bool = True,
                  limit: int | None = None) -> bytes:  # fmt: skip
    """git on the workspace, as the sandbox user; stdout as bytes (at most ``limit`` kept)."""
    proc = await trio.lowlevel.open_process(
        ["git", "-C", workspace, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**user.base_env(), **(env or {})}, **user.popen_kwargs,
    )  # fmt: skip
    out, err = bytearray(), bytearray()

    async def pump(stream, buf: bytearray, cap: int | None) -> None:
        while chunk := await stream.receive_some(65536):
            if cap is None or len(buf) < cap:
                buf += chunk
        if cap is not None:
            del buf[cap:]

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, proc.stdout, out, None if limit is None else limit + 1)
            nursery.start_soon(pump, proc.stderr, err, 65536)
        code = await proc.wait()
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    if check and code != 0:
        raise _git_failure(args, bytes(err))
    return bytes(out)


async def run_git_text(user: RunUser, workspace: str, *args: str, **kw) -> str:
    return (await run_git(user, workspace, *args, **kw)).decode(errors="replace")


async def run_git_to_file(user: RunUser, workspace: str, path: str, *args: str) -> None:
    """git's stdout straight into a new file of the agent's (a bundle): written to a temporary
    name and renamed over ``path`` only when git succeeded, so a failure keeps the last good one."""
    tmp = f"{path}.partial"
    fd = create_private(tmp)
    try:
        with os.fdopen(fd, "wb") as out:
            res = await trio.run_process(
                ["git", "-C", workspace, *args], stdin=subprocess.DEVNULL, stdout=out, capture_stderr=True,
                check=False, env=user.base_env(), **user.popen_kwargs,
            )  # fmt: skip
        if res.returncode != 0:
            raise _git_failure(args, res.stderr)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


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
    group is killed).  The prompt goes in on stdin — never in argv, where Claude Code would parse
    a prompt like ``--help`` as an option, the kernel caps one argument at 128 KiB, and every
    user of the host sees it in ``ps``.  Every stdout line becomes events as it arrives."""
    cmd = [claude, "-p", "--output-format", "stream-json", "--verbose", "--max-turns", str(max_turns),
           "--dangerously-skip-permissions"]  # fmt: skip
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
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=workspace, env=env,
            start_new_session=True, **user.popen_kwargs,
        )  # fmt: skip
    except OSError as exc:
        raise SandboxError(f"could not start Claude Code: {exc}") from None
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    stdin, stdout, stderr = proc.stdin, proc.stdout, proc.stderr

    def kill(sig=signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    async def write_prompt() -> None:
        try:
            await stdin.send_all(prompt.encode())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # it exited before reading it all: its exit code says why
        finally:
            await stdin.aclose()

    async def read_stdout() -> None:
        buf = bytearray()
        skipping = False
        while chunk := await stdout.receive_some(65536):
            buf += chunk
            *lines, rest = bytes(buf).split(b"\n")
            buf = bytearray(rest)
            if skipping and lines:
                lines, skipping = lines[1:], False
            events = [ev for line in lines for ev in run.parser.line(line)]
            if len(buf) > MAX_LINE and not skipping:  # one line bigger than any event we would keep
                skipping, buf = True, bytearray()
                events.append(m.LogEvent(message=f"a Claude Code output line over {MAX_LINE} bytes was skipped",
                                         level="warning", source="agent"))  # fmt: skip
            elif skipping:
                buf = bytearray()
            if events:
                await emit(events)
        if not skipping and (events := run.parser.line(bytes(buf))):
            await emit(events)

    async def read_stderr() -> None:
        tail = b""
        while chunk := await stderr.receive_some(65536):
            tail = (tail + chunk)[-4000:]
        run.stderr_tail = tail.decode(errors="replace").strip()

    async def watch_cancel() -> None:
        await cancel.wait()
        run.killed = True
        kill(signal.SIGTERM)
        with trio.move_on_after(2):
            await proc.wait()
        kill(signal.SIGKILL)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_cancel)
            async with trio.open_nursery() as io:
                io.start_soon(write_prompt)
                io.start_soon(read_stdout)
                io.start_soon(read_stderr)
            run.exit_code = await proc.wait()
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            kill()  # also whatever Claude Code left behind in its process group
            await proc.wait()
    return run
