"""What only the PostgreSQL store has to prove: cancellation reaches the server, migrations
are safe when replicas start at once, sequence numbers hold across replicas, and the store
fails fast while the server is down and recovers by itself when it is back."""

import psycopg
import pytest
import trio

from marathon.errors import StoreError, StoreUnavailable
from marathon.store import EventIn, TaskRecord, TaskRequest, open_store
from marathon.store.postgres import PostgresStore
from marathon.store.postgres_schema import MIGRATIONS
from tests.polling import until


def rec(i: int) -> TaskRecord:
    return TaskRecord(
        id=f"t{i:03d}", owner="u1", state="queued", request=TaskRequest(prompt="p"), created_at=1000.0 + i
    )


def ev(task_id: str) -> EventIn:
    return EventIn(task_id, "log", b'{"type":"log"}')


def server_queries(url: str, like: str) -> list[str]:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT query FROM pg_stat_activity WHERE state = 'active' AND query LIKE %s AND pid <> pg_backend_pid()",
            (like,),
        ).fetchall()
    return [r[0] for r in rows]


async def wait_for(cond, timeout=30.0):
    """Poll a condition the server holds (in a thread: it queries the server)."""
    await until(lambda: trio.to_thread.run_sync(cond), timeout)


async def test_cancellation_cancels_the_query_on_the_server(pg_url):
    store = await PostgresStore.open(pg_url, pool_size=2)
    try:
        started = trio.Event()
        with trio.move_on_after(30) as outer:
            async with trio.open_nursery() as n:

                async def sleeper():
                    await store._run(lambda c: c.execute("SELECT pg_sleep(600) /* marathon-cancel-test */"))

                n.start_soon(sleeper)
                await wait_for(lambda: bool(server_queries(pg_url, "%marathon-cancel-test%")))
                started.set()
                n.cancel_scope.cancel()
        assert started.is_set() and not outer.cancelled_caught
        await wait_for(lambda: not server_queries(pg_url, "%marathon-cancel-test%"))
        # the connection went back to the pool in a usable state: both connections still work
        async with trio.open_nursery() as n:
            for _ in range(4):
                n.start_soon(store.count_users)
    finally:
        await store.close()


async def test_statement_timeout_ends_a_long_statement(pg_url):
    store = await PostgresStore.open(pg_url, pool_size=1, statement_timeout=0.2)
    try:
        with pytest.raises(StoreUnavailable, match="statement timeout"):
            await store._run(lambda c: c.execute("SELECT pg_sleep(30)"))
        assert await store.count_users() == 0
    finally:
        await store.close()


async def test_concurrent_opens_on_a_fresh_database_migrate_once(pg_url):
    stores: list[PostgresStore] = []

    async def one():
        stores.append(await PostgresStore.open(pg_url, pool_size=1))

    async with trio.open_nursery() as n:
        for _ in range(8):
            n.start_soon(one)
    try:
        assert len(stores) == 8
        with psycopg.connect(pg_url) as conn:
            versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]
        assert versions == list(range(1, len(MIGRATIONS) + 1))
        await stores[0].create_task(rec(1), ev("t001"))
        got = await stores[-1].get_task("t001")
        assert got is not None and got.id == "t001"
    finally:
        for s in stores:
            await s.close()


async def test_an_older_schema_is_migrated_in_place_and_keeps_its_rows(pg_url):
    """A database at version 1 (before server-tool columns) with a ledger row opens, gains the
    columns at version 2, and the old row reads back with zero server-tool requests."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(MIGRATIONS[0][1])
        conn.execute(
            "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL, "
            "applied_at double precision NOT NULL)"
        )
        conn.execute("INSERT INTO schema_migrations VALUES (1, 'initial schema', 0)")
        conn.execute(
            "INSERT INTO ledger (task_id, user_id, ts, model, input_tokens, output_tokens, "
            "cache_creation_input_tokens, cache_read_input_tokens, tool_calls, cost_usd, status, duration_s, "
            "ttft_s, request_bytes, response_bytes, complete, priced) "
            "VALUES ('t1', 'u1', 1, 'm', 10, 5, 0, 0, 0, 0.5, 200, 1, NULL, 1, 1, true, true)"
        )
        conn.execute(
            "INSERT INTO users (id, email, password_hash, admin, created_at) VALUES ('u1', 'a@x', 'h', true, 1)"
        )
        conn.execute(
            "INSERT INTO api_keys (id, user_id, name, prefix, key_hash, created_at) VALUES ('k1', 'u1', 'n', 'p', 'kh', 1)"
        )
    store = await PostgresStore.open(pg_url)
    try:
        with psycopg.connect(pg_url) as conn:
            versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]
        assert versions == list(range(1, len(MIGRATIONS) + 1))
        (row,) = await store.ledger_rows("t1")
        assert (row.input_tokens, row.web_search_requests, row.web_fetch_requests) == (10, 0, 0)
        found = await store.find_api_key("kh")  # the account lifecycle columns: never expires, not disabled
        assert found is not None
        key, user = found
        assert key.expires_at is None and user.admin and not user.disabled
    finally:
        await store.close()


async def test_a_newer_schema_is_refused(pg_url):
    await (await PostgresStore.open(pg_url)).close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("INSERT INTO schema_migrations VALUES (999, 'from the future', 0)")
    with pytest.raises(StoreError, match="newer than this marathon"):
        await PostgresStore.open(pg_url)


async def test_sequences_stay_gapless_across_replicas(pg_url):
    a = await PostgresStore.open(pg_url, pool_size=4)
    b = await PostgresStore.open(pg_url, pool_size=4)
    try:
        await a.create_task(rec(1), ev("t001"))
        got: list[int] = []

        async def writer(store, k):
            for _ in range(25):
                out = await store.append_events([ev("t001")] * k)
                got.extend(e.seq for e in out if e)

        async with trio.open_nursery() as n:
            for i in range(8):
                n.start_soon(writer, (a, b)[i % 2], 1 + i % 3)
        total = 1 + 25 * sum(1 + i % 3 for i in range(8))
        assert sorted(got) == list(range(2, total + 1))
        assert [e.seq for e in await b.events_after("t001", 0, limit=10_000)] == list(range(1, total + 1))
    finally:
        await a.close()
        await b.close()


@pytest.mark.slow
async def test_open_on_a_server_that_is_down_is_a_clear_error(own_servers):
    pg = own_servers.postgres()
    url = pg.url().replace("postgres@", "postgres:s3cret@")
    pg.stop()
    with trio.fail_after(30):
        with pytest.raises(StoreUnavailable) as info:
            await open_store(url, "/nonexistent")
    assert "s3cret" not in str(info.value) and "cannot open the store" in str(info.value)


@pytest.mark.slow
async def test_server_restart_fails_fast_then_recovers_by_itself(own_servers):
    pg = own_servers.postgres()
    url = pg.create_database()
    store = await PostgresStore.open(url, pool_size=3, connect_timeout=1.0)
    try:
        await store.create_task(rec(1), ev("t001"))
        await trio.to_thread.run_sync(pg.stop)

        # while it is down: every call is a StoreUnavailable, within the connect timeout (not a hang)
        for call in (
            lambda: store.get_task("t001"),
            lambda: store.append_events([ev("t001")]),
            lambda: store.create_task(rec(2), ev("t002")),
        ):
            with trio.fail_after(15):
                with pytest.raises(StoreUnavailable):
                    await call()

        await trio.to_thread.run_sync(pg.start)
        # back: the pool drops its dead connections (checked before use) and makes new ones, on its
        # own reconnect schedule (exponential backoff while the server was away): no manual action
        with trio.fail_after(60):
            while True:
                try:
                    got = await store.get_task("t001")
                    break
                except StoreUnavailable:
                    await trio.sleep(0.2)
        assert got is not None and got.id == "t001"
        await store.append_events([ev("t001")])
        assert [e.seq for e in await store.events_after("t001", 0)] == [1, 2]
    finally:
        await store.close()


async def test_batches_spanning_tasks_in_opposite_orders_do_not_deadlock(pg_url):
    store = await PostgresStore.open(pg_url, pool_size=4)
    try:
        for i in (1, 2, 3):
            await store.create_task(rec(i), ev(f"t{i:03d}"))

        async def writer(order):
            for _ in range(30):
                await store.append_events([ev(t) for t in order for _ in range(3)])

        with trio.fail_after(60):
            async with trio.open_nursery() as n:
                n.start_soon(writer, ["t001", "t002", "t003"])
                n.start_soon(writer, ["t003", "t002", "t001"])
                n.start_soon(writer, ["t002", "t001", "t003"])
        for t in ("t001", "t002", "t003"):
            assert [e.seq for e in await store.events_after(t, 0, limit=1000)] == list(range(1, 2 + 3 * 30 * 3))
    finally:
        await store.close()
