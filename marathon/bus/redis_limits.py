"""Redis rate limiter (token bucket) and login throttle, each one atomic Lua script on the
server's clock, so every replica shares one bucket / one counter per key."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import coredis
import trio
from coredis.retry import NoRetryPolicy

from marathon.bus.redis import REDIS_ERRORS, redact_redis_url
from marathon.errors import Unavailable

# bucket_step (bus/ratelimit.py) in Lua.  KEYS[1] the bucket; ARGV rate (tokens/s), burst.
# Returns the retry delay as a string (a Lua number would be truncated to an integer);
# "inf" when rate is 0.  The bucket expires when it would be full again (same as absent).
TOKEN_BUCKET = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local b = redis.call('HMGET', KEYS[1], 'tokens', 'last')
local tokens = tonumber(b[1])
local last = tonumber(b[2])
if tokens == nil or last == nil then
  tokens = burst
  last = now
end
tokens = math.min(burst, tokens + math.max(0, now - last) * rate)
local retry = '0'
if tokens >= 1 then
  tokens = tokens - 1
elseif rate > 0 then
  retry = string.format('%.17g', (1 - tokens) / rate)
else
  retry = 'inf'
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'last', string.format('%.6f', now))
local ttl = 86400000
if rate > 0 then
  ttl = math.ceil((burst - tokens) / rate * 1000) + 1000
end
redis.call('PEXPIRE', KEYS[1], ttl)
return retry
"""

# window_step (bus/throttle.py) in Lua.  KEYS[1] the counter; ARGV window (ms), limit,
# "1" to count a failure or "0" to only look.  Returns the blocked time in ms (0: not blocked).
LOGIN_WINDOW = """
local window = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local n
if ARGV[3] == '1' then
  n = redis.call('INCR', KEYS[1])
  if n == 1 then
    redis.call('PEXPIRE', KEYS[1], window)
  end
else
  n = tonumber(redis.call('GET', KEYS[1]) or '0')
end
if n < limit then
  return 0
end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  return 0
end
return ttl
"""


class _RedisScripts:
    def __init__(self, client: coredis.Redis, prefix: str, timeout: float):
        self._client, self.prefix, self.timeout = client, prefix, timeout

    async def _call(self, script, key: str, args: list) -> object:
        try:
            with trio.fail_after(self.timeout):
                return await script(keys=[self.prefix + key], args=args)
        except REDIS_ERRORS as exc:
            raise Unavailable(f"redis: {exc or type(exc).__name__}") from None


class RedisRateLimiter(_RedisScripts):
    def __init__(self, client: coredis.Redis, *, prefix: str = "marathon:rl:", timeout: float = 5.0):
        super().__init__(client, prefix, timeout)
        self._script = client.register_script(TOKEN_BUCKET)

    async def take(self, key: str, *, rate: float, burst: int) -> float:
        out = await self._call(self._script, key, [repr(float(rate)), int(burst)])
        return float(out.decode() if isinstance(out, bytes) else str(out))


class RedisThrottle(_RedisScripts):
    def __init__(self, client: coredis.Redis, *, prefix: str = "marathon:login:", timeout: float = 5.0):
        super().__init__(client, prefix, timeout)
        self._script = client.register_script(LOGIN_WINDOW)

    async def hit(self, key: str, *, limit: int, window: float) -> float:
        ms = await self._call(self._script, key, [max(1, int(window * 1000)), int(limit), "1"])
        return int(ms) / 1000.0  # type: ignore[call-overload]

    async def check(self, key: str, *, limit: int) -> float:
        ms = await self._call(self._script, key, [1, int(limit), "0"])
        return int(ms) / 1000.0  # type: ignore[call-overload]

    async def reset(self, key: str) -> None:
        try:
            with trio.fail_after(self.timeout):
                await self._client.delete([self.prefix + key])
        except REDIS_ERRORS as exc:
            raise Unavailable(f"redis: {exc or type(exc).__name__}") from None


@asynccontextmanager
async def open_redis_client(url: str, *, timeout: float = 5.0, name: str = "marathon") -> AsyncIterator[coredis.Redis]:
    """A coredis client that fails fast (no retries: callers decide), bounded by ``timeout``."""
    client = coredis.Redis.from_url(
        url, connect_timeout=timeout, stream_timeout=timeout, retry_policy=NoRetryPolicy(), client_name=name
    )
    async with AsyncExitStack() as stack:
        try:
            await stack.enter_async_context(client)
        except REDIS_ERRORS as exc:
            raise Unavailable(f"redis at {redact_redis_url(url)}: {exc}") from None
        yield client
