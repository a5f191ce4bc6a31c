"""The bus, rate-limiter and login-throttle contracts, run against the in-process
implementations and the Redis ones (a real redis-server the harness starts).

For Redis every test opens two instances (two "replicas") on one server: what one
notifies, the other's followers see; what one counts, the other sees counted.
"""

import secrets
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio

from marathon.bus.memory import MemoryBus
from marathon.bus.ratelimit import MemoryRateLimiter
from marathon.bus.redis import open_redis_bus
from marathon.bus.redis_limits import RedisRateLimiter, RedisThrottle, open_redis_client
from marathon.bus.throttle import MemoryThrottle
from marathon.errors import Unavailable
from tests.polling import until
import trio.lowlevel

BOUND = 10.0  # hang detector, never a speed goal


async def _zero(aw) -> bool:
    return await aw == 0.0


@pytest.fixture(params=["memory", "redis"])
def kind(request):
    return request.param


@pytest.fixture
def redis_url(kind, request):
    return request.getfixturevalue("redis_server").url if kind == "redis" else None


@asynccontextmanager
async def two_buses(redis_url, *, poll_interval=60.0):
    """(publisher's bus, follower's bus): the same bus in-process; two replicas on Redis."""
    if redis_url is None:
        bus = MemoryBus()
        yield bus, bus
        return
    prefix = f"test:{secrets.token_hex(4)}:"
    async with (
        open_redis_bus(redis_url, prefix=prefix, poll_interval=poll_interval, timeout=2) as a,
        open_redis_bus(redis_url, prefix=prefix, poll_interval=poll_interval, timeout=2) as b,
    ):
        yield a, b


@pytest.fixture
async def buses(redis_url):
    async with two_buses(redis_url) as pair:
        yield pair


async def test_notify_after_arm_wakes_the_follower(buses):
    pub, sub = buses
    async with sub.watch("t1") as w:
        w.arm()
        async with trio.open_nursery() as n:
            woke = trio.Event()

            async def follower():
                await w.wait()
                woke.set()

            n.start_soon(follower)
            await trio.lowlevel.checkpoint()
            await pub.notify("t1")
            with trio.fail_after(BOUND):
                await woke.wait()


async def test_notify_between_read_and_wait_is_not_lost(buses):
    pub, sub = buses
    async with sub.watch("t1") as w:
        w.arm()
        await pub.notify("t1")  # lands after arm, before wait: the follower "was reading the store"
        with trio.fail_after(BOUND):
            await w.wait()


async def test_topics_are_independent(buses):
    pub, sub = buses
    async with sub.watch("a") as wa, sub.watch("b") as wb:
        wa.arm()
        wb.arm()
        await pub.notify("b")
        with trio.fail_after(BOUND):
            await wb.wait()
        # "b" went all the way round; "a" has had nothing
        with trio.move_on_after(0.3) as scope:
            await wa.wait()
        assert scope.cancelled_caught


async def test_followers_see_every_item_once_in_order(buses):
    """The pattern every follower uses (arm, read the store, wait) against a stand-in store:
    three followers on the other replica, a producer notifying after each write."""
    pub, sub = buses
    log: list[int] = []
    n_items = 200
    seen: dict[int, list[int]] = {}

    async def follower(i):
        got: list[int] = []
        async with sub.watch("task") as w:
            while len(got) < n_items:
                w.arm()
                got.extend(log[len(got) :])
                if len(got) < n_items:
                    await w.wait()
        seen[i] = got

    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            for i in range(3):
                n.start_soon(follower, i)
            await trio.lowlevel.checkpoint()
            for k in range(n_items):
                log.append(k)
                await pub.notify("task")
                if k % 17 == 0:
                    await trio.sleep(0.001)
    assert all(v == list(range(n_items)) for v in seen.values()) and len(seen) == 3


# ---------------------------------------------------------------------- Redis only


async def test_a_follower_wakes_after_poll_interval_without_any_notification(redis_server):
    async with two_buses(redis_server.url, poll_interval=0.2) as (_, sub), sub.watch("quiet") as w:
        w.arm()
        with trio.fail_after(BOUND):
            await w.wait()  # nothing notified: returns anyway ("look again")


async def test_notifications_survive_a_redis_restart(own_servers):
    redis = own_servers.redis()
    async with two_buses(redis.url, poll_interval=60) as (pub, sub), sub.watch("t") as w:
        w.arm()
        await trio.to_thread.run_sync(redis.stop)
        # the follower's subscriber lost its connection: it wakes everyone (look again)
        with trio.fail_after(BOUND):
            await w.wait()
        # while Redis is down a notify is dropped, never raised, never hangs
        w.arm()
        with trio.fail_after(BOUND):
            await pub.notify("t")
        await until(lambda: pub.dropped >= 1)
        await trio.to_thread.run_sync(redis.start)
        # the subscriber comes back by itself
        await until(lambda: sub.connected)
        w.arm()
        await pub.notify("t")
        with trio.fail_after(BOUND):
            await w.wait()
        assert sub.reconnects >= 1


async def test_a_hung_redis_blocks_neither_writers_nor_followers(own_servers):
    import signal

    redis = own_servers.redis()
    async with two_buses(redis.url, poll_interval=0.5) as (pub, sub), sub.watch("t") as w:
        redis.send_signal(signal.SIGSTOP)  # accepts connections, answers nothing
        try:
            with trio.fail_after(BOUND):  # 200 publishes would take 400 s if each waited
                for i in range(200):
                    await pub.notify(f"t{i}")
                w.arm()
                await w.wait()  # returns by poll_interval
        finally:
            redis.send_signal(signal.SIGCONT)
        await until(lambda: pub.published + pub.dropped >= 200)


async def test_a_bus_opened_while_redis_is_down_connects_when_it_is_up(own_servers):
    redis = own_servers.redis()
    await trio.to_thread.run_sync(redis.stop)
    with trio.fail_after(BOUND):
        async with two_buses(redis.url, poll_interval=60) as (pub, sub):
            assert not sub.connected
            await trio.to_thread.run_sync(redis.start)
            await until(lambda: sub.connected and pub.connected)
            async with sub.watch("t") as w:
                w.arm()
                await pub.notify("t")
                with trio.fail_after(BOUND):
                    await w.wait()


# ---------------------------------------------------------------------- rate limiter


@asynccontextmanager
async def two_limiters(redis_url, cls_mem, cls_redis):
    if redis_url is None:
        one = cls_mem()
        yield one, one
        return
    prefix = f"test:{secrets.token_hex(4)}:"
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(open_redis_client(redis_url, timeout=2))
        b = await stack.enter_async_context(open_redis_client(redis_url, timeout=2))
        yield cls_redis(a, prefix=prefix, timeout=2), cls_redis(b, prefix=prefix, timeout=2)


@pytest.fixture
async def limiters(redis_url):
    async with two_limiters(redis_url, MemoryRateLimiter, RedisRateLimiter) as pair:
        yield pair


async def test_bucket_allows_the_burst_then_says_how_long_to_wait(limiters):
    a, b = limiters
    assert [await (a, b)[i % 2].take("u1", rate=0.01, burst=3) for i in range(3)] == [0.0, 0.0, 0.0]
    retry = await a.take("u1", rate=0.01, burst=3)
    assert 90 < retry <= 100  # one token at 0.01/s: ~100 s (a little has refilled meanwhile)
    assert await b.take("u1", rate=0.01, burst=3) > 0  # shared by both replicas
    assert await b.take("u2", rate=0.01, burst=3) == 0.0  # buckets are per key


async def test_bucket_refills_at_its_rate(limiters):
    a, b = limiters
    assert await a.take("k", rate=20.0, burst=1) == 0.0
    retry = await b.take("k", rate=20.0, burst=1)
    assert 0 < retry <= 0.05
    await until(lambda: _zero(a.take("k", rate=20.0, burst=1)), interval=0.01)


async def test_a_zero_rate_never_refills(limiters):
    a, _ = limiters
    assert await a.take("z", rate=0.0, burst=1) == 0.0
    assert await a.take("z", rate=0.0, burst=1) == float("inf")


async def test_redis_down_is_unavailable_not_a_hang(own_servers):
    redis = own_servers.redis()
    async with two_limiters(redis.url, MemoryRateLimiter, RedisRateLimiter) as (a, _):
        await a.take("k", rate=1, burst=5)
        await trio.to_thread.run_sync(redis.stop)
        with trio.fail_after(BOUND), pytest.raises(Unavailable):
            await a.take("k", rate=1, burst=5)
        await trio.to_thread.run_sync(redis.start)
        assert await a.take("k", rate=1, burst=5) == 0.0  # a fresh bucket (Redis kept nothing)


# ---------------------------------------------------------------------- login throttle


@pytest.fixture
async def throttles(redis_url):
    async with two_limiters(redis_url, MemoryThrottle, RedisThrottle) as pair:
        yield pair


async def test_throttle_blocks_at_the_limit_until_reset(throttles):
    a, b = throttles
    assert await a.hit("acct:x", limit=3, window=60) == 0.0
    assert await b.check("acct:x", limit=3) == 0.0
    assert await b.hit("acct:x", limit=3, window=60) == 0.0
    blocked = await a.hit("acct:x", limit=3, window=60)
    assert 50 < blocked <= 60
    assert 50 < await b.check("acct:x", limit=3) <= 60
    assert await b.check("acct:y", limit=3) == 0.0  # per key
    assert await a.hit("acct:y", limit=3, window=60) == 0.0
    await b.reset("acct:x")  # an administrator lifts the lockout
    assert await a.check("acct:x", limit=3) == 0.0
    assert await a.hit("acct:x", limit=3, window=60) == 0.0


async def test_throttle_window_ends(throttles):
    a, b = throttles
    assert await a.hit("addr:1", limit=1, window=0.2) > 0
    await until(lambda: _zero(b.check("addr:1", limit=1)), interval=0.02)
    assert await a.hit("addr:1", limit=2, window=0.2) == 0.0  # a new window


async def test_memory_throttle_on_virtual_time(autojump_clock):
    t = MemoryThrottle(clock=trio.current_time)
    for _ in range(4):
        assert await t.hit("k", limit=5, window=900) == 0.0
    assert await t.hit("k", limit=5, window=900) == 900
    await trio.sleep(600)
    assert await t.check("k", limit=5) == 300
    await trio.sleep(300)
    assert await t.check("k", limit=5) == 0.0
    assert await t.hit("k", limit=5, window=900) == 0.0


async def test_memory_throttle_forgets_expired_keys(autojump_clock):
    t = MemoryThrottle(clock=trio.current_time)
    t.SWEEP_AT = 100
    for i in range(100):
        await t.hit(f"addr:{i}", limit=5, window=10)
    await trio.sleep(11)
    await t.hit("fresh", limit=5, window=10)
    assert list(t._keys) == ["fresh"]
