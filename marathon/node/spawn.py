"""Starting a sandbox's root process (bwrap, QEMU, Firecracker) so that it dies with the node.

``trio.lowlevel.open_process`` forks from one of trio's worker threads, and the parent-death
signal (``bwrap --die-with-parent``, ``setpriv --pdeathsig``) fires when the *thread* that
forked exits, not the process: trio's idle worker threads exit after 10 s, so every sandbox
that ran longer than that was killed on a node running in its own process.  Here the root of
a sandbox is forked on the trio thread itself, which lives as long as the node: a blocking
``Popen`` (vfork + exec, a few milliseconds) traded for a lifetime that is exactly the node's.

The child is waited for through a pidfd, so waiting never needs a thread either.

``enter`` names cgroup ``procs`` files the child joins *before* it execs the real command (a
``/bin/sh`` one-liner writes ``$$`` into each), so nothing the sandbox starts escapes its limits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Sequence

import trio

# join every cgroup named before "--", then exec the rest
_ENTER = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'


def command(argv: Sequence[str], *, enter: Sequence[str] = (), pdeathsig: bool = False) -> list[str]:
    """``argv`` wrapped to join cgroups first and/or to get a parent-death signal (for commands
    that, unlike bwrap, cannot ask for one themselves)."""
    out = list(argv)
    if pdeathsig:
        out = ["setpriv", "--pdeathsig", "KILL", "--", *out]
    if enter:
        out = ["/bin/sh", "-c", _ENTER, "sh", *enter, "--", *out]
    return out


class Child:
    """A process started by :func:`spawn`: ``pid``, ``poll()``, ``await wait()``, ``kill()``."""

    def __init__(self, popen: subprocess.Popen):
        self._popen = popen
        self.pid = popen.pid
        try:
            self._pidfd: int | None = os.pidfd_open(popen.pid)
        except (AttributeError, OSError):  # no pidfds (kernel < 5.3): wait by polling
            self._pidfd = None

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    def poll(self) -> int | None:
        code = self._popen.poll()
        if code is not None:
            self._close()
        return code

    async def wait(self) -> int:
        delay = 0.005
        while (code := self.poll()) is None:
            if self._pidfd is not None:
                await trio.lowlevel.wait_readable(self._pidfd)
            else:
                await trio.sleep(delay)
                delay = min(delay * 2, 0.1)
        return code

    def send_signal(self, sig: int) -> None:
        if self._popen.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._popen.send_signal(sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def _close(self) -> None:
        if self._pidfd is not None:
            fd, self._pidfd = self._pidfd, None
            with contextlib.suppress(OSError):
                trio.lowlevel.notify_closing(fd)
            os.close(fd)


def spawn(
    argv: Sequence[str],
    *,
    env: dict[str, str],
    cwd: str | None = None,
    stdin: int | None = subprocess.DEVNULL,
    stdout: int | None = None,
    stderr: int | None = None,
    pass_fds: Sequence[int] = (),
    enter: Sequence[str] = (),
    pdeathsig: bool = False,
) -> Child:
    """Fork ``argv`` from the calling (trio) thread in a new session, with exactly ``env``.

    Raises OSError when it cannot be started."""
    popen = subprocess.Popen(
        command(argv, enter=enter, pdeathsig=pdeathsig),
        env=env,
        cwd=cwd,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        pass_fds=tuple(pass_fds),
        start_new_session=True,
        close_fds=True,
    )
    return Child(popen)
