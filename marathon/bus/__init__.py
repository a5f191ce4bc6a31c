"""Change notifications between orchestrator components (and replicas).

The store is the source of truth; the bus only says "topic X changed, look again".
A follower arms a watch, reads the store, then waits: a notify that lands between the
read and the wait is not lost, so followers never miss events and never see one twice.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from marathon.bus.ratelimit import RateLimiter
    from marathon.bus.throttle import LoginThrottle
    from marathon.config import Config


class Watch(Protocol):
    def arm(self) -> None: ...

    async def wait(self) -> None: ...


class Bus(Protocol):
    async def notify(self, topic: str) -> None: ...

    def watch(self, topic: str) -> AbstractAsyncContextManager[Watch]: ...

    async def close(self) -> None: ...


@asynccontextmanager
async def open_bus(config: Config) -> AsyncIterator[Bus]:
    """The in-process bus, or the Redis one when ``redis_url`` is set (several replicas)."""
    if not config.redis_url:
        from marathon.bus.memory import MemoryBus

        yield MemoryBus()
        return
    from marathon.bus.redis import open_redis_bus

    async with open_redis_bus(
        config.redis_url, poll_interval=config.bus_poll_interval, timeout=config.redis_timeout
    ) as bus:
        yield bus


@asynccontextmanager
async def open_rate_limiter(config: Config) -> AsyncIterator[RateLimiter]:
    """Token buckets in-process, or shared by every replica in Redis when ``redis_url`` is set."""
    if not config.redis_url:
        from marathon.bus.ratelimit import MemoryRateLimiter

        yield MemoryRateLimiter()
        return
    from marathon.bus.redis_limits import RedisRateLimiter, open_redis_client

    async with open_redis_client(config.redis_url, timeout=config.redis_timeout, name="marathon-ratelimit") as c:
        yield RedisRateLimiter(c, timeout=config.redis_timeout)


@asynccontextmanager
async def open_throttle(config: Config) -> AsyncIterator[LoginThrottle]:
    """Login failure counters in-process, or shared in Redis when ``redis_url`` is set."""
    if not config.redis_url:
        from marathon.bus.throttle import MemoryThrottle

        yield MemoryThrottle()
        return
    from marathon.bus.redis_limits import RedisThrottle, open_redis_client

    async with open_redis_client(config.redis_url, timeout=config.redis_timeout, name="marathon-throttle") as c:
        yield RedisThrottle(c, timeout=config.redis_timeout)
