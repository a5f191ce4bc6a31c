"""Token-bucket rate limits.  In-process here; the Redis implementation shares the contract."""

from __future__ import annotations

import time
from typing import Protocol
from collections.abc import Callable


class RateLimiter(Protocol):
    async def take(self, key: str, *, rate: float, burst: int) -> float:
        """Take one token; returns 0 when allowed, else seconds until a token is available."""


def bucket_step(tokens: float, last: float, now: float, rate: float, burst: int) -> tuple[float, float, float]:
    """Pure token-bucket arithmetic: (tokens after, stamp, retry_after).  ``rate`` per second."""
    tokens = min(float(burst), tokens + max(0.0, now - last) * rate)
    if tokens >= 1.0:
        return tokens - 1.0, now, 0.0
    return tokens, now, (1.0 - tokens) / rate if rate > 0 else float("inf")


class MemoryRateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}

    async def take(self, key: str, *, rate: float, burst: int) -> float:
        now = self._clock()
        tokens, last = self._buckets.get(key, (float(burst), now))
        tokens, last, retry = bucket_step(tokens, last, now, rate, burst)
        self._buckets[key] = (tokens, last)
        return retry
