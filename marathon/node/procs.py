"""Process-tree helpers (Linux /proc): find and kill everything a sandbox started."""

from __future__ import annotations

import os
import signal

import trio


def _ppid_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    return children


def descendants(pid: int) -> set[int]:
    """Every process below ``pid``."""
    children = _ppid_map()
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def alive(pids: set[int]) -> set[int]:
    """Those of ``pids`` still running (zombies do not count)."""
    out = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                    out.add(pid)
        except OSError:
            pass
    return out


async def kill_tree(pid: int, *, timeout: float = 5.0) -> set[int]:
    """SIGKILL ``pid`` and everything below it, then wait (bounded) until they are gone.
    Returns what is still alive after ``timeout`` (normally nothing)."""
    pids = descendants(pid) | {pid}
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    delay = 0.002
    with trio.move_on_after(timeout):
        while alive(pids):
            await trio.sleep(delay)
            delay = min(delay * 2, 0.1)
    return alive(pids)
