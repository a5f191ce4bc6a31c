"""Distributed mode, measured side by side in one run (orchestrators and nodes in processes of
their own, on local PostgreSQL, Redis and etcd servers started for the run):

- submissions accepted through the API (tasks/s): SQLite with one replica, PostgreSQL with one,
  PostgreSQL + Redis + etcd with two (the client alternates between them);
- the scheduler's decision (``scheduler.plan``) for 1,000 and 10,000 nodes: time per decision;
- failover: SIGKILL the leading replica, time until the other one leads (p50 over RUNS);
- event latency: a task's events followed through the replica holding its node vs through the
  other one (time from the store's stamp of each event to its arrival at the client).

    .venv/bin/python -m bench.cluster [SUBMISSIONS] [RUNS]
"""

from __future__ import annotations

import os
import sys
import time

import httpx
import trio

from bench.common import describe, pct
from marathon.orchestrator.scheduler import NodeView, TaskView, plan
from tests.fleet import Fleet, admin_key, client, cluster, submit, wait_nodes
from tests.polling import until
from tests.servers import EtcdServer, PostgresServer, RedisServer

CONCURRENCY = 32
FAST = {"submit_rate": 10_000_000, "submit_burst": 1_000_000}  # the limits are not what is measured


async def _submissions(apis: list[str], key: str, n: int) -> float:
    """n submissions from CONCURRENCY clients, alternating over ``apis``; tasks/s."""
    it = iter(range(n))
    async with httpx.AsyncClient(timeout=60, trust_env=False, headers={"Authorization": f"Bearer {key}"}) as c:

        async def worker() -> None:
            for i in it:
                r = await c.post(apis[i % len(apis)] + "/v1/tasks", json={"prompt": "noop"})
                assert r.status_code == 201, r.text

        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(CONCURRENCY):
                nursery.start_soon(worker)
        return n / (time.perf_counter() - t0)


async def submissions(pg: PostgresServer, redis: RedisServer, etcd: EtcdServer, n: int, out) -> dict[str, float]:
    rates: dict[str, float] = {}
    setups = [
        ("SQLite, 1 replica", None, 1),
        ("PostgreSQL, 1 replica", pg.create_database("bench"), 1),
        ("PostgreSQL, 2 replicas", pg.create_database("bench"), 2),
    ]
    for name, pg_url, replicas in setups:
        f = Fleet(pg_url or "", redis.url, etcd.endpoint)
        f.shared.update(FAST)
        if pg_url is None:  # the embedded default: its own database and bus, nothing shared
            for k in ("store", "redis_url", "etcd_endpoints"):
                f.shared.pop(k)
        try:
            for i in range(replicas):
                await f.replica(f"r{i}")
            key = await admin_key(f, data_dir=os.path.join(f.tmp, "r0") if pg_url is None else None)
            await _submissions([api for _, api, _ in f.replicas.values()], key, min(200, n))  # warm up
            rates[name] = await _submissions([api for _, api, _ in f.replicas.values()], key, n)
        finally:
            await f.close()
    base = rates["SQLite, 1 replica"]
    out(f"submissions through the API: {n} tasks, {CONCURRENCY} concurrent clients (one client process)")
    for name, rate in rates.items():
        out(f"  {name:<26}{rate:10,.0f} tasks/s  {rate / base:5.2f}x SQLite")
    return rates


def decisions(out) -> dict[int, float]:
    """plan() for 200 queued tasks over N nodes with free slots: time per placement."""
    per: dict[int, float] = {}
    for n_nodes in (1_000, 10_000):
        nodes = [NodeView(f"n{i}", 4, i % 4, i % 3, False) for i in range(n_nodes)]
        tasks = [TaskView(f"t{i}", float(i), frozenset()) for i in range(200)]
        runs = []
        for _ in range(5):
            t0 = time.perf_counter()
            placed = plan(tasks, nodes)
            runs.append((time.perf_counter() - t0) / max(1, len(placed)))
        per[n_nodes] = pct(runs, 50)
    out("scheduler decision (plan, 200 queued tasks)")
    for n_nodes, t in per.items():
        out(f"  {n_nodes:>6} nodes: {t * 1e3:8.3f} ms per placement (goal <= 1 ms at 10,000)")
    return per


async def failover(pg: PostgresServer, redis: RedisServer, etcd: EtcdServer, runs: int, out) -> list[float]:
    times = []
    for _ in range(runs):
        f = Fleet(pg.create_database("bench"), redis.url, etcd.endpoint)
        try:
            await f.replica("a")
            await f.replica("b")
            key = await admin_key(f)
            async with client(f.replicas["a"][1], key) as ca, client(f.replicas["b"][1], key) as cb:

                async def one_leader(ca=ca) -> bool:
                    return sum(r["leader"] for r in (await cluster(ca))["replicas"]) == 1

                await until(one_leader, timeout=30, interval=0.05)
                leader = next(r for r in (await cluster(ca))["replicas"] if r["leader"])
                dead, survivor = ("a", cb) if leader["url"] == f.replicas["a"][1] else ("b", ca)
                await f.replicas[dead][0].kill()
                t0 = time.perf_counter()

                async def survivor_leads(survivor=survivor) -> bool:
                    try:
                        rs = (await cluster(survivor))["replicas"]
                    except (httpx.HTTPError, AssertionError):
                        return False
                    return any(r["leader"] and r["self"] for r in rs)

                await until(survivor_leads, timeout=30, interval=0.02)
                times.append(time.perf_counter() - t0)
        finally:
            await f.close()
    out(describe(f"failover after SIGKILL (lease_ttl {f.shared['lease_ttl']}s)", times, "s", 1.0))
    return times


async def _arrivals(c: httpx.AsyncClient, task_id: str, into: dict[int, float]) -> None:
    """When each event of the task arrives here (event id -> perf_counter), following it live."""
    async with c.stream("GET", f"/v1/tasks/{task_id}/events", params={"follow": "1"}, timeout=None) as r:
        async for line in r.aiter_lines():
            if line.startswith("id: "):
                into[int(line[4:])] = time.perf_counter()


async def latency(pg: PostgresServer, redis: RedisServer, etcd: EtcdServer, runs: int, out) -> list[float]:
    """One task's events followed at once through replica A (which holds the node) and B: how
    much later each event reaches the client through B (Redis notification, B's store read)."""
    f = Fleet(pg.create_database("bench"), redis.url, etcd.endpoint)
    later: list[float] = []
    totals: dict[str, list[float]] = {"A": [], "B": []}
    try:
        await f.replica("a")
        await f.replica("b")
        await f.node("n1", "a")
        key = await admin_key(f)
        async with client(f.replicas["a"][1], key) as ca, client(f.replicas["b"][1], key) as cb:
            await wait_nodes(ca, 1)
            for _ in range(runs):
                t0 = time.perf_counter()
                tid = await submit(ca, "lines:200")
                seen: dict[str, dict[int, float]] = {"A": {}, "B": {}}
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_arrivals, ca, tid, seen["A"])
                    nursery.start_soon(_arrivals, cb, tid, seen["B"])
                later += [seen["B"][i] - seen["A"][i] for i in seen["A"] if i in seen["B"]]
                for k in totals:
                    totals[k].append(max(seen[k].values()) - t0)
    finally:
        await f.close()
    out(f"event latency: {runs} task(s) of 200 lines followed through replica A (holding the node) and B at once")
    out("  " + describe("submit -> last event, through A", totals["A"]))
    out("  " + describe("submit -> last event, through B", totals["B"]))
    out("  " + describe("each event: B later than A by", later))
    return later


async def main(n: int = 3000, runs: int = 5, out=print) -> dict:
    pg, redis, etcd = PostgresServer(), RedisServer(), EtcdServer()
    servers = [pg, redis, etcd]
    for s in servers:
        await trio.to_thread.run_sync(s.start)
    try:
        return {
            "submissions": await submissions(pg, redis, etcd, n, out),
            "decisions": decisions(out),
            "failover": await failover(pg, redis, etcd, runs, out),
            "latency": await latency(pg, redis, etcd, max(1, runs // 2), out),
        }
    finally:
        for s in servers:
            await trio.to_thread.run_sync(s.remove)


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 3000, int(sys.argv[2]) if len(sys.argv) > 2 else 5)
