"""Distributed mode as deployed: orchestrator replicas and nodes in their own processes on one
PostgreSQL, Redis and etcd, and each part dying in turn.

- the leader replica SIGKILLed mid-run: the other leads within the lease TTL; every task ends
  once, succeeded;
- a node SIGKILLed mid-task: its task is queued again and finishes on another node;
- PostgreSQL, then Redis, then etcd restarted during a run: the API answers 503 (not a hang)
  while the store is down, and every task still succeeds;
- a node stopped (SIGSTOP) past its lease, then resumed: its task ran again elsewhere; the stale
  attempt is refused (fenced by the attempt number) and the task ends once.
"""

from __future__ import annotations

import json
import os
import re
import signal

import httpx
import pytest
import trio

from tests.fleet import (
    Fleet,
    Proc,
    admin_key,
    client,
    cluster,
    finished,
    fleet,
    follow,
    states_of,
    submit,
    wait_nodes,
)
from tests import fake_anthropic as fa
from tests.harness import claude_bin
from tests.polling import until

pytestmark = pytest.mark.slow


async def test_thirty_tasks_through_two_replicas_on_three_nodes_run_once(pg_url, redis_server, etcd_server):
    """The real Claude Code on three node processes; the fake upstream counts each task's requests."""

    def script(body, i):
        return fa.text("done")

    async with fa.open_fake_anthropic(script) as fake, fleet(pg_url, redis_server.url, etcd_server.endpoint) as f:
        key = await admin_key(f)
        await f.replica("a")
        await f.replica("b")
        for name, via in (("n1", ("a", "b")), ("n2", ("b", "a")), ("n3", ("a", "b"))):
            await f.node(name, *via, claude_bin=claude_bin(), anthropic_base_url=fake.url)
        async with client(f.replicas["a"][1], key) as ca, client(f.replicas["b"][1], key) as cb:
            await wait_nodes(ca, 3)
            tasks = {await submit((ca, cb)[i % 2], f"task {i:02d}: say done"): i for i in range(30)}
            done = await finished(cb, list(tasks), timeout=600)
            assert {t["state"] for t in done.values()} == {"succeeded"}, [
                (t["id"], t["state"], t["reason"], t["message"]) for t in done.values() if t["state"] != "succeeded"
            ]
            assert {t["attempt"] for t in done.values()} == {1}
            assert len({t["node_id"] for t in done.values()}) == 3, "every node took tasks"
            asked: dict[int, int] = {}
            for r in fake.main_requests:
                found = re.search(r"task (\d\d): say done", json.dumps(r.body))
                if found:
                    asked[int(found.group(1))] = asked.get(int(found.group(1)), 0) + 1
            assert asked == {i: 1 for i in range(30)}, "each task ran once, with one request upstream"


async def test_the_leader_killed_mid_run(pg_url, redis_server, etcd_server):
    async with fleet(pg_url, redis_server.url, etcd_server.endpoint) as f:
        key = await admin_key(f)
        await f.replica("a")
        await f.replica("b")
        await f.node("n1", "a", "b")
        await f.node("n2", "b", "a")
        await f.node("n3", "a", "b")
        async with client(f.replicas["a"][1], key) as ca, client(f.replicas["b"][1], key) as cb:
            await wait_nodes(ca, 3)
            tasks = [await submit((ca, cb)[i % 2], "sleep:2") for i in range(12)]

            async def some_running() -> bool:
                r = await ca.get("/v1/tasks", params={"state": "running"})
                return r.status_code == 200 and len(r.json()["tasks"]) >= 3

            await until(some_running, timeout=60, interval=0.1)
            leader = next(r for r in (await cluster(ca))["replicas"] if r["leader"])
            dead, survivor, doomed = ("a", cb, ca) if leader["url"] == f.replicas["a"][1] else ("b", ca, cb)
            # a client follows a task through the replica about to die
            drip = await submit(doomed, "drip:100")
            seen: list[dict] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(follow, doomed, drip, seen)
                await until(lambda: sum(e["event"] == "text" for e in seen) >= 10, timeout=60, interval=0.05)
                await f.replicas[dead][0].kill()
                t0 = trio.current_time()
            await follow(survivor, drip, seen, after=seen[-1]["id"])  # resumes with Last-Event-ID
            assert [e["id"] for e in seen] == list(range(1, len(seen) + 1)), "every event once, in order"
            texts = [json.loads(e["data"])["text"] for e in seen if e["event"] == "text"]
            assert texts == [f"drop {i}" for i in range(1, 101)]
            tasks.append(drip)

            async def survivor_leads() -> bool:
                try:
                    rs = (await cluster(survivor))["replicas"]
                except (httpx.HTTPError, AssertionError):
                    return False
                return len(rs) == 1 and rs[0]["leader"] and rs[0]["self"]

            await until(survivor_leads, timeout=30, interval=0.1)
            print(f"failover: the survivor leads {trio.current_time() - t0:.2f}s after the SIGKILL")
            done = await finished(survivor, tasks, timeout=120)
            assert {t["state"] for t in done.values()} == {"succeeded"}, done
            for tid in tasks:
                assert (await states_of(survivor, tid)).count("succeeded") == 1


async def test_a_node_killed_mid_task_hands_its_task_to_another(pg_url, redis_server, etcd_server):
    async with fleet(pg_url, redis_server.url, etcd_server.endpoint) as f:
        key = await admin_key(f)
        await f.replica("a")
        await f.replica("b")
        await f.node("n1", "a", "b")
        await f.node("n2", "b", "a")
        async with client(f.replicas["a"][1], key) as c:
            await wait_nodes(c, 2)
            tid = await submit(c, "sleep:6")
            await until(lambda: _state(c, tid, "running"), timeout=60, interval=0.1)
            first = (await c.get(f"/v1/tasks/{tid}")).json()["node_id"]
            victim = next(p for p in f.nodes.values() if _node_id(f, p) == first)
            await victim.kill()
            done = (await finished(c, [tid], timeout=120))[tid]
            assert done["state"] == "succeeded" and done["attempt"] == 2 and done["node_id"] != first, done
            states = await states_of(c, tid)
            assert states.count("succeeded") == 1 and "queued" in states[1:], states


async def test_store_bus_and_registry_restarts_during_a_run(own_servers):
    pg, redis, etcd = own_servers.postgres(), own_servers.redis(), own_servers.etcd()
    pg_url = pg.create_database()
    async with fleet(pg_url, redis.url, etcd.endpoint) as f:
        key = await admin_key(f)
        await f.replica("a")
        await f.replica("b")
        await f.node("n1", "a", "b")
        await f.node("n2", "b", "a")
        async with client(f.replicas["a"][1], key) as ca, client(f.replicas["b"][1], key) as cb:
            await wait_nodes(ca, 2)
            tasks = [await submit((ca, cb)[i % 2], "sleep:1") for i in range(4)]

            # PostgreSQL down: a clear 503 from either replica, not a hang; back: the run goes on
            await trio.to_thread.run_sync(pg.stop)
            for c in (ca, cb):
                with trio.fail_after(20):
                    r = await c.get("/v1/tasks")
                assert r.status_code == 503, r.text
            await trio.to_thread.run_sync(pg.start)
            tasks += [await _submit_when_up(c, "sleep:1") for c in (ca, cb)]

            # Redis down (rate limits and notifications): an answer at once, 201 or a clear 503
            await trio.to_thread.run_sync(redis.stop)
            for c in (ca, cb):
                with trio.fail_after(20):
                    r = await c.post("/v1/tasks", json={"prompt": "sleep:1"})
                assert r.status_code in (201, 503), r.text
                if r.status_code == 201:
                    tasks.append(r.json()["id"])
            await trio.to_thread.run_sync(redis.start)
            tasks += [await _submit_when_up(c, "sleep:1") for c in (ca, cb)]

            # etcd down: the replicas keep serving what they hold; back: leases and the lead again
            await trio.to_thread.run_sync(etcd.stop)
            tasks += [await _submit_when_up(c, "sleep:1") for c in (ca, cb)]
            await trio.to_thread.run_sync(etcd.start)

            done = await finished(ca, tasks, timeout=180)
            assert {t["state"] for t in done.values()} == {"succeeded"}, [
                (t["id"], t["state"], t["reason"], t["message"]) for t in done.values() if t["state"] != "succeeded"
            ]
            await wait_nodes(cb, 2)  # both nodes are in the registry again
            assert sum(r["leader"] for r in (await cluster(cb))["replicas"]) == 1


async def test_a_node_stopped_past_its_lease_is_fenced_when_it_resumes(pg_url, redis_server, etcd_server):
    async with fleet(pg_url, redis_server.url, etcd_server.endpoint) as f:
        key = await admin_key(f)
        await f.replica("a")
        await f.replica("b")
        await f.node("n1", "a", "b")
        await f.node("n2", "b", "a")
        async with client(f.replicas["b"][1], key) as c:
            await wait_nodes(c, 2)
            tid = await submit(c, "sleep:8")
            await until(lambda: _state(c, tid, "running"), timeout=60, interval=0.1)
            first = (await c.get(f"/v1/tasks/{tid}")).json()["node_id"]
            frozen = next(p for p in f.nodes.values() if _node_id(f, p) == first)
            frozen.signal(signal.SIGSTOP)  # a partition: alive, silent

            async def elsewhere() -> bool:
                t = (await c.get(f"/v1/tasks/{tid}")).json()
                return t["attempt"] == 2 and t["state"] == "running"

            await until(elsewhere, timeout=60, interval=0.1)
            frozen.signal(signal.SIGCONT)  # back: it still runs attempt 1, which is no longer its own
            await frozen.line(r"cancel|no longer assigned", timeout=60)
            done = (await finished(c, [tid], timeout=120))[tid]
            assert done["state"] == "succeeded" and done["attempt"] == 2 and done["node_id"] != first, done
            assert (await states_of(c, tid)).count("succeeded") == 1


async def _state(c: httpx.AsyncClient, tid: str, state: str) -> bool:
    r = await c.get(f"/v1/tasks/{tid}")
    return r.status_code == 200 and r.json()["state"] == state


def _node_id(f: Fleet, p: Proc) -> str:
    with open(os.path.join(f.tmp, p.name, "node_id")) as fh:
        return fh.read().strip()


async def _submit_when_up(c: httpx.AsyncClient, prompt: str) -> str:
    """A submission once the API answers again (a 503 while a dependency comes back is fine)."""
    out: list[str] = []

    async def accepted() -> bool:
        try:
            r = await c.post("/v1/tasks", json={"prompt": prompt})
        except httpx.HTTPError:
            return False
        if r.status_code == 201:
            out.append(r.json()["id"])
            return True
        assert r.status_code == 503, r.text
        return False

    await until(accepted, timeout=60, interval=0.2)
    return out[0]
