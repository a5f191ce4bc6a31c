"""systemd's notify protocol, spoken directly (no dependency): READY, WATCHDOG, STOPPING.

A datagram of ``KEY=VALUE`` lines to the Unix socket named by ``$NOTIFY_SOCKET`` (a path,
or an abstract name written with a leading ``@``).  Without ``$NOTIFY_SOCKET`` (not started
by systemd with ``Type=notify``) every call is a no-op.  Never blocks and never raises: a
service must not stop because its supervisor is slow to read.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Mapping

import trio

log = logging.getLogger("marathon.notify")


def _address(env: Mapping[str, str]) -> str | None:
    addr = env.get("NOTIFY_SOCKET", "")
    if not addr:
        return None
    if addr.startswith("@"):  # abstract namespace
        return "\0" + addr[1:]
    if addr.startswith("/"):
        return addr
    return None  # vsock: and other forms are not for us


def notify(state: str, *, env: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1\\nSTATUS=…"``); True when it was handed to the socket."""
    addr = _address(os.environ if env is None else env)
    if addr is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), socket.MSG_DONTWAIT, addr)
        return True
    except OSError as exc:
        log.debug("sd_notify %r to %r failed: %s", state.split("\n", 1)[0], addr.lstrip("\0"), exc)
        return False


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings: half of ``$WATCHDOG_USEC``, when it is meant for us."""
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    ours = {str(os.getpid())}
    if getattr(sys, "frozen", False):  # the one-file executable: systemd's main pid is its bootloader, our parent
        ours.add(str(os.getppid()))
    if usec <= 0 or (pid and pid not in ours):
        return None
    return usec / 2 / 1_000_000


async def serve_notify(status: str = "", *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Start this in the role's nursery once its services have started: says READY=1, pings
    the watchdog from the event loop (so a wedged loop stops the pings and systemd restarts
    us), and says STOPPING=1 when cancelled (shutdown)."""
    ready = "READY=1" + (f"\nSTATUS={status}" if status else "")
    notify(ready)
    interval = watchdog_interval()
    task_status.started()
    try:
        if interval is None:
            await trio.sleep_forever()
        while True:
            notify("WATCHDOG=1")
            await trio.sleep(interval)
    finally:
        notify("STOPPING=1")
