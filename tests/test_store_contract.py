"""The store contract, run against every implementation: SQLite (embedded) and PostgreSQL
(a real server the harness starts; a fresh database per test)."""

import hashlib
import os

import msgspec
import pytest
import trio

from marathon.errors import Conflict, StoreError
from marathon.protocol.messages import Usage
from marathon.store import EventIn, TaskRecord, TaskRequest, open_store
from marathon.store.models import ApiKey, LedgerRow, Session, User


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    """A URL for an empty store, and how to open it again (same data)."""
    if request.param == "sqlite":
        return f"sqlite://{os.path.join(tmp_path, 't.db')}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
async def store(store_url, tmp_path):
    s = await open_store(store_url, str(tmp_path))
    yield s
    await s.close()


def rec(i: int, state="queued", owner="u1") -> TaskRecord:
    return TaskRecord(
        id=f"t{i:03d}", owner=owner, state=state, request=TaskRequest(prompt=f"p{i}"), created_at=1000.0 + i
    )


def ev(task_id, kind="log", node_seq=None, node_id=None, body=b'{"type":"log","message":"x"}', ledger=None):
    return EventIn(task_id, kind, body, node_seq, node_id, ledger)


def ledger(task_id="t001", user="u1", ts=1000.0, model="claude-x", inp=10, out=5, cost=0.01) -> LedgerRow:
    return LedgerRow(
        task_id=task_id,
        user_id=user,
        ts=ts,
        model=model,
        input_tokens=inp,
        output_tokens=out,
        cache_creation_input_tokens=1,
        cache_read_input_tokens=2,
        tool_calls=1,
        cost_usd=cost,
        status=200,
        duration_s=0.5,
        ttft_s=0.1,
        request_bytes=100,
        response_bytes=200,
        complete=True,
        priced=False,
    )


async def test_create_get_and_first_event(store):
    r, first = await store.create_task(rec(1), ev("t001", "state"))
    assert first.seq == 1 and r.last_seq == 1
    got = await store.get_task("t001")
    assert got.request.prompt == "p1" and got.state == "queued" and got.usage == Usage()
    assert got.last_seq == 1 and got.created_at == 1001.0
    assert (await store.events_after("t001", 0))[0].kind == "state"
    assert await store.get_task("nope") is None


async def test_create_refuses_a_duplicate_id(store):
    """A Conflict (what an Idempotency-Key's race relies on), and nothing of the second is written."""
    await store.create_task(rec(1), ev("t001"))
    with pytest.raises(Conflict):
        await store.create_task(rec(1), ev("t001"))
    assert len(await store.events_after("t001", 0)) == 1


async def test_full_record_round_trips(store):
    r = rec(1)
    r.request = TaskRequest(prompt="p", repo="o/r", max_tokens=10, pr=True, max_iterations=3)
    await store.create_task(r, ev("t001"))
    changes = dict(
        state="succeeded",
        reason=None,
        message="done",
        node_id="n1",
        attempt=2,
        started_at=1001.5,
        finished_at=1002.25,
        usage=Usage(1, 2, 3, 4),
        cost_usd=0.125,
        num_turns=7,
        exit_code=0,
        is_error=False,
        diff_stat="1 file",
        final_text="ok ✓",
        compute_s=3.5,
        claude_usage=Usage(5, 6, 7, 8),
        iterations=2,
        commits=1,
        branch="marathon/x",
        head="abc",
        pr_url="https://example.invalid/pr/1",
        pr_error=None,
        reply="yes",
    )
    await store.update_task("t001", expect_state=None, changes=changes)
    got = await store.get_task("t001")
    for k, v in changes.items():
        assert getattr(got, k) == v, k
    assert got.request.repo == "o/r" and got.request.pr is True and got.request.max_iterations == 3


async def test_list_filters_and_cursor_pagination(store):
    for i in range(7):
        await store.create_task(
            rec(i, state="queued" if i % 2 else "running", owner="u1" if i < 5 else "u2"), ev(f"t{i:03d}")
        )
    page, cur = await store.list_tasks(limit=3)
    assert [t.id for t in page] == ["t006", "t005", "t004"] and cur
    page2, cur2 = await store.list_tasks(limit=3, cursor=cur)
    assert [t.id for t in page2] == ["t003", "t002", "t001"]
    page3, cur3 = await store.list_tasks(limit=3, cursor=cur2)
    assert [t.id for t in page3] == ["t000"] and cur3 is None
    q, _ = await store.list_tasks(states=["queued"], owner="u1")
    assert [t.id for t in q] == ["t003", "t001"]
    two, _ = await store.list_tasks(states=["queued", "running"], owner="u2")
    assert [t.id for t in two] == ["t006", "t005"]
    asc, cur = await store.list_tasks(oldest_first=True, limit=2)
    assert [t.id for t in asc] == ["t000", "t001"]
    asc2, _ = await store.list_tasks(oldest_first=True, limit=2, cursor=cur)
    assert [t.id for t in asc2] == ["t002", "t003"]
    with pytest.raises(StoreError):
        await store.list_tasks(cursor="garbage")


async def test_count_tasks_by_state(store):
    assert await store.count_tasks_by_state() == {}
    for i, state in enumerate(["queued", "queued", "running", "succeeded", "queued"]):
        await store.create_task(rec(i, state=state), ev(f"t{i:03d}"))
    assert await store.count_tasks_by_state() == {"queued": 3, "running": 1, "succeeded": 1}
    await store.update_task("t000", expect_state="queued", changes={"state": "scheduled"})
    assert await store.count_tasks_by_state() == {"queued": 2, "scheduled": 1, "running": 1, "succeeded": 1}


async def test_update_is_compare_and_set(store):
    await store.create_task(rec(1), ev("t001"))
    res = await store.update_task(
        "t001", expect_state="queued", changes={"state": "scheduled", "node_id": "n1"}, event=ev("t001", "state")
    )
    assert res is not None and res[0].state == "scheduled" and res[1].seq == 2 and res[0].last_seq == 2
    assert await store.update_task("t001", expect_state="queued", changes={"state": "running"}) is None
    assert await store.update_task("nope", expect_state=None, changes={"state": "running"}) is None
    assert (await store.get_task("t001")).state == "scheduled"
    with pytest.raises(StoreError):
        await store.update_task("t001", expect_state=None, changes={"owner": "evil"})
    res = await store.update_task("t001", expect_state=None, changes={"usage": Usage(1, 2, 3, 4), "is_error": True})
    assert res[0].usage == Usage(1, 2, 3, 4) and res[0].is_error is True and res[1] is None
    # a refused compare-and-set writes no event
    assert [e.seq for e in await store.events_after("t001", 0)] == [1, 2]


async def test_concurrent_compare_and_set_has_one_winner(store):
    await store.create_task(rec(1), ev("t001"))
    wins = []

    async def claim(node):
        r = await store.update_task(
            "t001", expect_state="queued", changes={"state": "scheduled", "node_id": node}, event=ev("t001", "state")
        )
        if r is not None:
            wins.append(node)

    async with trio.open_nursery() as n:
        for i in range(8):
            n.start_soon(claim, f"n{i}")
    assert len(wins) == 1
    got = await store.get_task("t001")
    assert got.node_id == wins[0] and got.last_seq == 2


async def test_update_with_an_event_that_carries_node_seq(store):
    await store.create_task(rec(1), ev("t001"))
    await store.update_task("t001", expect_state=None, changes={"node_id": "n1"})
    r = await store.update_task(
        "t001", expect_state=None, changes={"state": "running"}, event=ev("t001", node_seq=3, node_id="n1")
    )
    assert r[1].seq == 2 and r[0].last_node_seq == 3 and r[0].last_seq == 2
    r = await store.update_task(
        "t001", expect_state=None, changes={"message": "m"}, event=ev("t001", node_seq=3, node_id="n1")
    )
    assert r[1] is None and r[0].message == "m" and r[0].last_seq == 2


async def test_event_sequence_and_node_seq_dedupe(store):
    await store.create_task(rec(1), ev("t001"))
    await store.update_task("t001", expect_state=None, changes={"node_id": "n1"})
    out = await store.append_events(
        [
            ev("t001", node_seq=5, node_id="n1"),
            ev("t001", node_seq=5, node_id="n1"),
            ev("t001", node_seq=4, node_id="n1"),
            ev("t001", node_seq=6, node_id="n1"),
            ev("t001", node_seq=7, node_id="other-node"),
        ]
    )
    assert [o.seq if o else None for o in out] == [2, None, None, 3, None]
    evs = await store.events_after("t001", 0)
    assert [e.seq for e in evs] == [1, 2, 3]
    assert [e.seq for e in await store.events_after("t001", 2)] == [3]
    assert await store.events_after("t001", 1, limit=1) == evs[1:2]
    assert (await store.get_task("t001")).last_node_seq == 6
    assert await store.append_events([]) == []
    assert await store.append_events([ev("no-such-task")]) == [None]


async def test_events_keep_their_bytes(store):
    await store.create_task(rec(1), ev("t001"))
    body = b'{"type":"text","text":"\\u00e9 \xe2\x9c\x93 \\n"}' + bytes(range(256))
    [e] = await store.append_events([ev("t001", "text", body=body)])
    [back] = await store.events_after("t001", 1)
    assert back == e and back.data == body and back.kind == "text"


async def test_concurrent_appends_get_unique_gapless_sequences(store):
    await store.create_task(rec(1), ev("t001"))

    async def writer(w):
        for i in range(20):
            if i % 5 == 4:
                await store.append_events([ev("t001"), ev("t001"), ev("t001")])
            else:
                await store.append_events([ev("t001")])

    async with trio.open_nursery() as n:
        for w in range(6):
            n.start_soon(writer, w)
    seqs = [e.seq for e in await store.events_after("t001", 0, limit=1000)]
    assert seqs == list(range(1, 1 + 1 + 6 * (16 + 4 * 3)))
    assert (await store.get_task("t001")).last_seq == seqs[-1]


async def test_ledger_rows_ride_with_their_event_exactly_once(store):
    await store.create_task(rec(1), ev("t001"))
    await store.update_task("t001", expect_state=None, changes={"node_id": "n1"})
    l1, l2 = ledger(ts=1001.0), ledger(ts=1002.0, inp=100, out=50, cost=0.5)
    out = await store.append_events(
        [
            ev("t001", "usage", node_seq=1, node_id="n1", ledger=l1),
            ev("t001", "usage", node_seq=1, node_id="n1", ledger=l1),  # replayed: no second row
            ev("t001", "usage", node_seq=2, node_id="n1", ledger=l2),
        ]
    )
    assert [o.seq if o else None for o in out] == [2, None, 3]
    assert await store.ledger_rows("t001") == [l1, l2]
    usage, cost = await store.ledger_totals("t001")
    assert usage == Usage(110, 55, 2, 4) and cost == pytest.approx(0.51)
    assert await store.ledger_totals("nothing") == (Usage(), 0.0)


async def test_server_tool_requests_are_kept_in_the_ledger_and_summed(store):
    await store.create_task(rec(1), ev("t001"))
    import msgspec

    searched = msgspec.structs.replace(ledger(ts=1001.0, cost=0.04), web_search_requests=3, web_fetch_requests=2)
    await store.append_events([ev("t001", "usage", ledger=searched), ev("t001", "usage", ledger=ledger(ts=1002.0))])
    assert await store.ledger_rows("t001") == [searched, ledger(ts=1002.0)]
    usage, cost = await store.ledger_totals("t001")
    assert (usage.web_search_requests, usage.web_fetch_requests) == (3, 2) and cost == pytest.approx(0.05)
    (total,) = await store.usage_summary(user_id=None, since=0, by="total")
    assert (total.web_search_requests, total.web_fetch_requests, total.requests) == (3, 2, 2)


async def test_usage_summary(store):
    day1, day2 = 86400.0 * 20000 + 10, 86400.0 * 20001 + 10  # 2024-10-04, 2024-10-05 UTC
    for i, (owner, ts) in enumerate([("u1", day1), ("u1", day2), ("u2", day2)]):
        r = rec(i, owner=owner)
        r.created_at = ts
        await store.create_task(r, ev(f"t{i:03d}"))
        await store.update_task(f"t{i:03d}", expect_state=None, changes={"compute_s": 1.5 * (i + 1)})
        await store.append_events(
            [ev(f"t{i:03d}", "usage", ledger=ledger(task_id=f"t{i:03d}", user=owner, ts=ts, model=f"m{i % 2}"))]
        )
    total = await store.usage_summary(user_id=None, since=0, by="total")
    assert len(total) == 1 and total[0].key == "total"
    assert total[0].requests == 3 and total[0].input_tokens == 30 and total[0].tasks == 3
    assert total[0].compute_s == pytest.approx(9.0) and total[0].cost_usd == pytest.approx(0.03)
    days = await store.usage_summary(user_id=None, since=0, by="day")
    assert [(b.key, b.requests) for b in days] == [("2024-10-04", 1), ("2024-10-05", 2)]
    mine = await store.usage_summary(user_id="u1", since=0, by="task")
    assert [(b.key, b.compute_s) for b in mine] == [("t000", 1.5), ("t001", 3.0)]
    models = await store.usage_summary(user_id=None, since=day2, by="model")
    assert [(b.key, b.requests) for b in models] == [("m0", 1), ("m1", 1)]
    users = await store.usage_summary(user_id=None, since=0, by="user")
    assert [(b.key, b.requests, b.compute_s) for b in users] == [("u1", 2, 4.5), ("u2", 1, 4.5)]


async def test_artifacts(store):
    await store.create_task(rec(1), ev("t001"))
    assert await store.get_artifact("t001", "diff") is None
    await store.put_artifact("t001", "diff", b"patch")
    await store.put_artifact("t001", "diff", b"patch2")
    await store.put_artifact("t001", "bundle", bytes(range(256)) * 100)
    assert await store.get_artifact("t001", "diff") == b"patch2"
    assert await store.get_artifact("t001", "bundle") == bytes(range(256)) * 100


async def test_users_keys_and_sessions(store):
    first = await store.create_user(User(id="u1", email="a@x", password_hash="h1", admin=True))
    second = await store.create_user(User(id="u2", email="b@x", password_hash="h2"))
    assert first.admin and not second.admin and await store.count_users() == 2
    with pytest.raises(Conflict):
        await store.create_user(User(id="u3", email="a@x", password_hash="h3"))
    assert await store.count_users() == 2
    assert (await store.get_user_by_email("b@x")).id == "u2"
    assert await store.get_user("nope") is None and await store.get_user_by_email("nope") is None
    await store.set_github_token("u1", "ghp_x")
    sealed = (await store.get_user("u1")).github_token
    assert sealed.startswith("mse1:") and "ghp_x" not in sealed  # users come back with the ciphertext only
    assert await store.github_token("u1") == "ghp_x"
    await store.set_github_token("u1", None)
    assert (await store.get_user("u1")).github_token is None and await store.github_token("u1") is None

    k = await store.create_api_key(ApiKey(id="k1", user_id="u1", name="ci", prefix="mk_ab", key_hash="kh1"))
    assert k.created_at > 0
    await store.create_api_key(ApiKey(id="k2", user_id="u1", name="two", prefix="mk_cd", key_hash="kh2"))
    assert [x.id for x in await store.list_api_keys("u1")] == ["k1", "k2"]
    key, user = await store.find_api_key("kh1")
    assert key.name == "ci" and user.email == "a@x" and user.admin
    assert await store.revoke_api_key("u2", "k1") is False  # not theirs
    assert await store.revoke_api_key("u1", "k1") is True
    assert await store.revoke_api_key("u1", "k1") is False
    assert await store.find_api_key("kh1") is None
    assert (await store.list_api_keys("u1"))[0].revoked_at is not None

    import time

    now = time.time()
    await store.create_session(Session(token_hash="s1", user_id="u2", created_at=now, expires_at=now + 60))
    await store.create_session(Session(token_hash="s2", user_id="u2", created_at=now, expires_at=now - 1))
    sess, user = await store.find_session("s1")
    assert sess.expires_at == now + 60 and user.id == "u2"
    assert await store.find_session("s2") is None  # expired
    await store.revoke_session("s1")
    assert await store.find_session("s1") is None


async def test_nobody_becomes_administrator_by_coming_first(store):
    made = []

    async def register(i):
        made.append(await store.create_user(User(id=f"u{i}", email=f"{i}@x", password_hash="h")))

    async with trio.open_nursery() as n:
        for i in range(6):
            n.start_soon(register, i)
    assert len(made) == 6 and not any(u.admin for u in made)
    assert not any(u.admin for u in await store.list_users())


async def test_account_lifecycle_disable_expiry_last_used_and_purge(store):
    import time

    now = time.time()
    await store.create_user(User(id="u1", email="a@x", password_hash="h", admin=True))
    await store.create_user(User(id="u2", email="b@x", password_hash="h"))
    assert [u.email for u in await store.list_users()] == ["a@x", "b@x"]
    assert not any(u.disabled for u in await store.list_users())

    # keys: an expired one is not found; one with a future expiry is
    await store.create_api_key(ApiKey(id="k1", user_id="u2", name="n", prefix="p", key_hash="kh1", expires_at=now - 1))
    await store.create_api_key(ApiKey(id="k2", user_id="u2", name="n", prefix="p", key_hash="kh2", expires_at=now + 60))
    assert await store.find_api_key("kh1") is None
    key, user = await store.find_api_key("kh2")
    assert key.expires_at == now + 60 and key.last_used_at is None and not user.disabled

    # last_used_at: written, then not again within the interval, then again after it
    await store.touch_api_key("k2", now, 60)
    assert (await store.find_api_key("kh2"))[0].last_used_at == now
    await store.touch_api_key("k2", now + 30, 60)
    assert (await store.find_api_key("kh2"))[0].last_used_at == now
    await store.touch_api_key("k2", now + 61, 60)
    assert (await store.find_api_key("kh2"))[0].last_used_at == now + 61

    # disabling: the user row says so (keys are refused by whoever authenticates), sessions go
    await store.create_session(Session(token_hash="s1", user_id="u2", created_at=now, expires_at=now + 60))
    await store.create_session(Session(token_hash="s9", user_id="u1", created_at=now, expires_at=now + 60))
    u = await store.set_user_disabled("u2", True)
    assert u is not None and u.disabled and u.disabled_at >= now
    assert (await store.find_api_key("kh2"))[1].disabled
    assert await store.find_session("s1") is None
    assert await store.find_session("s9") is not None  # another user's session stays
    again = await store.set_user_disabled("u2", True)  # disabling twice keeps the first time
    assert again.disabled_at == u.disabled_at
    assert not (await store.set_user_disabled("u2", False)).disabled
    assert await store.set_user_disabled("nobody", True) is None

    # an administrator revokes anyone's key (user_id None)
    assert await store.revoke_api_key(None, "k2") is True
    assert await store.revoke_api_key(None, "k2") is False
    assert await store.find_api_key("kh2") is None

    # purge: expired sessions go in bounded batches, live ones stay
    for i in range(7):
        await store.create_session(Session(token_hash=f"old{i}", user_id="u1", created_at=now, expires_at=now - 10))
    assert await store.purge_sessions(now, 5) == 5
    assert await store.purge_sessions(now, 5) == 2
    assert await store.purge_sessions(now, 5) == 0
    assert await store.find_session("s9") is not None


async def test_survives_reopen(store_url, tmp_path):
    s = await open_store(store_url, str(tmp_path))
    await s.create_task(rec(1), ev("t001"))
    await s.close()
    s = await open_store(store_url, str(tmp_path))
    got = await s.get_task("t001")
    assert got is not None and got.id == "t001"
    assert len(await s.events_after("t001", 0)) == 1
    await s.close()


async def test_join_tokens_are_spent_once_and_node_ids_stay_bound(store):
    from marathon.store.models import JoinToken, NodeCredential

    await store.create_join_token(JoinToken(id="t1", token_hash="h1", created_at=1.0, expires_at=2e9, max_slots=2))
    await store.create_join_token(JoinToken(id="t2", token_hash="h2", created_at=1.0, expires_at=5.0, max_slots=2))
    assert (await store.get_join_token("t1")).token_hash == "h1"
    assert await store.get_join_token("nope") is None
    results = []

    async def spend(node):
        results.append(await store.use_join_token("t1", node, 100.0))

    async with trio.open_nursery() as nursery:
        for n in ("a", "b", "c"):
            nursery.start_soon(spend, n)
    assert sorted(results) == [False, False, True]
    assert (await store.get_join_token("t1")).used_by in {"a", "b", "c"}
    assert not await store.use_join_token("t2", "a", 100.0)  # expired

    cred = NodeCredential(node_id="n1", public_key="aa", server_key="bb", max_slots=2, created_at=1.0)
    assert await store.enroll_node(cred)
    assert not await store.enroll_node(msgspec.structs.replace(cred, public_key="cc"))  # taken
    assert (await store.get_node_credential("n1")).public_key == "aa"
    assert await store.revoke_node_credential("n1", 50.0)
    assert not await store.revoke_node_credential("n1", 51.0)
    assert (await store.get_node_credential("n1")).revoked_at == 50.0
    assert await store.enroll_node(msgspec.structs.replace(cred, public_key="cc"))  # re-enrolled after a revoke
    again = await store.get_node_credential("n1")
    assert again.public_key == "cc" and again.revoked_at is None


async def test_a_large_artifact_goes_in_and_out_in_parts(store, tmp_path):
    """A file stored part by part under a manifest written last, read back part by part; an
    artifact stored whole reads as one part."""
    from marathon.store import artifacts

    await store.create_task(rec(1), ev("t001"))
    data = os.urandom(3 * 1000 + 7)
    path = tmp_path / "bundle"
    path.write_bytes(data)
    made = await artifacts.put_file(store, "t001", "bundle", str(path), part=1000)
    assert made.parts == 4 and made.size == len(data)
    found = await artifacts.manifest(store, "t001", "bundle")
    assert isinstance(found, artifacts.Manifest)
    parts = [p async for p in artifacts.read_parts(store, "t001", "bundle", found)]
    assert [len(p) for p in parts] == [1000, 1000, 1000, 7] and b"".join(parts) == data
    assert hashlib.sha256(data).hexdigest() == found.sha256
    # replaced by a smaller one: only its own parts are read
    path.write_bytes(b"small")
    await artifacts.put_file(store, "t001", "bundle", str(path), part=1000)
    found = await artifacts.manifest(store, "t001", "bundle")
    assert found is not None
    assert b"".join([p async for p in artifacts.read_parts(store, "t001", "bundle", found)]) == b"small"
    # stored whole (small artifacts, older versions): one part
    await store.put_artifact("t001", "memory", b"notes")
    whole = await artifacts.manifest(store, "t001", "memory")
    assert whole == b"notes"
    assert [p async for p in artifacts.read_parts(store, "t001", "memory", whole)] == [b"notes"]
    assert await artifacts.manifest(store, "t001", "nothing") is None
