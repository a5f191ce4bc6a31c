"""Login throttling: count failures per key (an account, a client address) in a window.

``hit`` after a failed attempt, ``check`` before verifying one (a blocked key costs no
password hash), ``reset`` after a success or when an administrator lifts a lockout.  A
window is fixed: it starts at the key's first failure and lasts ``window`` seconds; the
``limit``-th failure in it blocks the key until the window ends.  In-process here; the
Redis implementation (bus/redis_limits.py) shares the contract across replicas.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol


class LoginThrottle(Protocol):
    async def hit(self, key: str, *, limit: int, window: float) -> float:
        """Count one failure.  Returns 0.0 while the key has had fewer than ``limit``
        failures in its window, else the seconds until the window ends."""
        ...

    async def check(self, key: str, *, limit: int) -> float:
        """Seconds the key stays blocked (``limit`` failures reached), 0.0 if it is not; counts nothing."""
        ...

    async def reset(self, key: str) -> None:
        """Forget the key's failures (a successful login; an administrator lifting a lockout)."""
        ...


def window_step(count: int, ends: float, now: float, window: float) -> tuple[int, float]:
    """Pure fixed-window arithmetic for one failure: (count after, window end)."""
    if now >= ends:
        return 1, now + window
    return count + 1, ends


class MemoryThrottle:
    SWEEP_AT = 10_000  # keys kept before the expired ones are swept out

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._keys: dict[str, tuple[int, float]] = {}

    def _sweep(self, now: float) -> None:
        if len(self._keys) >= self.SWEEP_AT:
            self._keys = {k: v for k, v in self._keys.items() if v[1] > now}

    async def hit(self, key: str, *, limit: int, window: float) -> float:
        now = self._clock()
        self._sweep(now)
        count, ends = window_step(*self._keys.get(key, (0, now)), now, window)
        self._keys[key] = (count, ends)
        return ends - now if count >= limit else 0.0

    async def check(self, key: str, *, limit: int) -> float:
        now = self._clock()
        count, ends = self._keys.get(key, (0, now))
        return ends - now if count >= limit and ends > now else 0.0

    async def reset(self, key: str) -> None:
        self._keys.pop(key, None)
