"""Waiting for a condition that no event announces (a server's state, a counter), with a bound."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

import trio


async def until(cond: Callable[[], bool | Awaitable[bool]], timeout: float = 30.0, interval: float = 0.05) -> None:
    """Poll ``cond`` (sync or async) until it is true; ``trio.TooSlowError`` after ``timeout``."""
    with trio.fail_after(timeout):
        while True:
            out = cond()
            if inspect.isawaitable(out):
                out = await out
            if out:
                return
            await trio.sleep(interval)
