"""The store contract.  Runs against every implementation (PostgreSQL joins with the distributed issue)."""

import os

import pytest
import trio

from marathon.errors import StoreError
from marathon.protocol.messages import Usage
from marathon.store import EventIn, TaskRecord, TaskRequest
from marathon.store.sqlite import SqliteStore


@pytest.fixture
async def store(tmp_path):
    s = await SqliteStore.open(os.path.join(tmp_path, "t.db"))
    yield s
    await s.close()


def rec(i: int, state="queued", owner="u1") -> TaskRecord:
    return TaskRecord(
        id=f"t{i:03d}", owner=owner, state=state, request=TaskRequest(prompt=f"p{i}"), created_at=1000.0 + i
    )


def ev(task_id, kind="log", node_seq=None, node_id=None, body=b'{"type":"log","message":"x"}'):
    return EventIn(task_id, kind, body, node_seq, node_id)


async def test_create_get_and_first_event(store):
    r, first = await store.create_task(rec(1), ev("t001", "state"))
    assert first.seq == 1 and r.last_seq == 1
    got = await store.get_task("t001")
    assert got.request.prompt == "p1" and got.state == "queued" and got.usage == Usage()
    assert await store.get_task("nope") is None


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
    asc, _ = await store.list_tasks(oldest_first=True, limit=2)
    assert [t.id for t in asc] == ["t000", "t001"]
    with pytest.raises(StoreError):
        await store.list_tasks(cursor="garbage")


async def test_update_is_compare_and_set(store):
    await store.create_task(rec(1), ev("t001"))
    res = await store.update_task(
        "t001", expect_state="queued", changes={"state": "scheduled", "node_id": "n1"}, event=ev("t001", "state")
    )
    assert res is not None and res[0].state == "scheduled" and res[1].seq == 2
    assert await store.update_task("t001", expect_state="queued", changes={"state": "running"}) is None
    assert (await store.get_task("t001")).state == "scheduled"
    with pytest.raises(StoreError):
        await store.update_task("t001", expect_state=None, changes={"owner": "evil"})
    res = await store.update_task("t001", expect_state=None, changes={"usage": Usage(1, 2, 3, 4), "is_error": True})
    assert res[0].usage == Usage(1, 2, 3, 4) and res[0].is_error is True


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


async def test_concurrent_appends_get_unique_gapless_sequences(store):
    await store.create_task(rec(1), ev("t001"))

    async def writer():
        for _ in range(20):
            await store.append_events([ev("t001")])

    async with trio.open_nursery() as n:
        for _ in range(5):
            n.start_soon(writer)
    seqs = [e.seq for e in await store.events_after("t001", 0, limit=1000)]
    assert seqs == list(range(1, 102))


async def test_artifacts(store):
    await store.create_task(rec(1), ev("t001"))
    assert await store.get_artifact("t001", "diff") is None
    await store.put_artifact("t001", "diff", b"patch")
    await store.put_artifact("t001", "diff", b"patch2")
    assert await store.get_artifact("t001", "diff") == b"patch2"


async def test_survives_reopen(tmp_path):
    path = os.path.join(tmp_path, "t.db")
    s = await SqliteStore.open(path)
    await s.create_task(rec(1), ev("t001"))
    await s.close()
    s = await SqliteStore.open(path)
    reopened = await s.get_task("t001")
    assert reopened is not None and reopened.id == "t001"
    assert len(await s.events_after("t001", 0)) == 1
    await s.close()
