"""Configuration picks the backends: in-process by default, PostgreSQL / Redis / etcd when
their settings are given (flags, environment MARATHON_*, marathon.toml)."""

import pytest

from marathon.bus import open_bus, open_rate_limiter, open_throttle
from marathon.bus.memory import MemoryBus
from marathon.bus.ratelimit import MemoryRateLimiter
from marathon.bus.redis import RedisBus
from marathon.bus.redis_limits import RedisRateLimiter, RedisThrottle
from marathon.bus.throttle import MemoryThrottle
from marathon.config import load_config
from marathon.errors import ConfigError
from marathon.registry import open_registry
from marathon.registry.etcd import EtcdKV
from marathon.registry.memory import MemoryKV
from marathon.store import open_store
from marathon.store.postgres import PostgresStore


def test_settings_from_the_environment(tmp_path):
    env = {
        "MARATHON_STORE": "postgresql://m:pw@db.example:5432/marathon",
        "MARATHON_REDIS_URL": "redis://:secret@cache:6379/1",
        "MARATHON_ETCD_ENDPOINTS": "http://e1:2379, http://e2:2379/",
        "MARATHON_LEADER_TTL": "7",
        "MARATHON_STORE_POOL_SIZE": "4",
    }
    c = load_config(env=env, cwd=tmp_path)
    assert c.etcd_endpoint_list() == ["http://e1:2379", "http://e2:2379"]
    assert c.leader_ttl == 7.0 and c.store_pool_size == 4 and c.lease_ttl == 10.0
    shown = c.redacted()
    assert "pw" not in shown["store"] and "secret" not in shown["redis_url"]
    assert shown["store"] == "postgresql://m:***@db.example:5432/marathon"


@pytest.mark.parametrize(
    "key,value,msg",
    [
        ("MARATHON_REDIS_URL", "cache:6379", "redis_url"),
        ("MARATHON_ETCD_ENDPOINTS", "e1:2379", "etcd_endpoints"),
        ("MARATHON_LEASE_TTL", "1", "lease_ttl"),
        ("MARATHON_STORE_POOL_SIZE", "0", "store_pool_size"),
    ],
)
def test_bad_settings_are_clear_errors(tmp_path, key, value, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(env={key: value}, cwd=tmp_path)


async def test_in_process_by_default(tmp_path):
    c = load_config({"data_dir": str(tmp_path)}, env={}, cwd=tmp_path)
    async with open_bus(c) as bus, open_rate_limiter(c) as rl, open_throttle(c) as th, open_registry(c) as reg:
        assert isinstance(bus, MemoryBus) and isinstance(rl, MemoryRateLimiter) and isinstance(th, MemoryThrottle)
        assert isinstance(reg.kv, MemoryKV)  # type: ignore[attr-defined]
        assert await reg.leader("scheduler") is None


async def test_distributed_when_configured(tmp_path, redis_server, etcd_server, pg_url):
    c = load_config(
        {
            "data_dir": str(tmp_path),
            "redis_url": redis_server.url,
            "etcd_endpoints": etcd_server.endpoint,
            "etcd_prefix": "/test-config/",
            "store": pg_url,
            "store_pool_size": 3,
        },
        env={},
        cwd=tmp_path,
    )
    async with open_bus(c) as bus, open_rate_limiter(c) as rl, open_throttle(c) as th, open_registry(c) as reg:
        assert isinstance(bus, RedisBus) and isinstance(rl, RedisRateLimiter) and isinstance(th, RedisThrottle)
        assert isinstance(reg.kv, EtcdKV)  # type: ignore[attr-defined]
        assert await rl.take("cfg", rate=1, burst=1) == 0.0
        assert await th.check("cfg", limit=1) == 0.0
        assert await reg.leader("scheduler") is None
        async with bus.watch("x") as w:
            w.arm()
            await bus.notify("x")
            await w.wait()
    store = await open_store(c.store, c.data_dir, config=c)
    try:
        assert isinstance(store, PostgresStore) and store.pool_size == 3
        assert await store.count_users() == 0
    finally:
        await store.close()


async def test_an_unknown_store_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="postgresql://"):
        await open_store("mysql://x", str(tmp_path))
