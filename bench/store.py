"""Store throughput, SQLite vs PostgreSQL side by side, through the Store Protocol.

- submissions: ``create_task`` + its first event (what POST /v1/tasks writes), from
  ``CONCURRENCY`` concurrent callers;
- event appends: one event per call (the live path's worst case) and batches of 50 (what
  the gateway writes when a node streams fast), spread over a few running tasks.

SQLite is the embedded store (WAL, one writer thread); PostgreSQL is a local server with
fsync off, started for the run (or ``MARATHON_BENCH_PG=postgresql://…``), reached over
loopback TCP with the store's default pool of 8 connections.

    .venv/bin/python -m bench.store [TASKS] [EVENTS]
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager

import trio

from marathon.store import EventIn, Store, TaskRecord, TaskRequest, open_store

CONCURRENCY = 16
BATCH = 50
BODY = b'{"type":"text","text":"' + b"x" * 200 + b'"}'


async def _spread(n: int, fn: Callable[[int], Awaitable[object]]) -> float:
    """Run fn(0..n-1) from CONCURRENCY workers; returns the wall time."""
    it = iter(range(n))

    async def worker():
        for i in it:
            await fn(i)

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(CONCURRENCY):
            nursery.start_soon(worker)
    return time.perf_counter() - t0


async def measure(store: Store, n_tasks: int, n_events: int) -> dict[str, float]:
    async def submit(i: int):
        rec = TaskRecord(id=f"b{i:07d}", owner="bench", state="queued", request=TaskRequest(prompt="p"))
        await store.create_task(rec, EventIn(rec.id, "state", b'{"type":"state","state":"queued"}'))

    t_submit = await _spread(n_tasks, submit)
    running = [f"b{i:07d}" for i in range(min(8, n_tasks))]

    async def append_one(i: int):
        await store.append_events([EventIn(running[i % len(running)], "text", BODY)])

    t_one = await _spread(n_events, append_one)

    n_batches = max(1, n_events // BATCH)

    async def append_batch(i: int):
        tid = running[i % len(running)]
        await store.append_events([EventIn(tid, "text", BODY)] * BATCH)

    t_batch = await _spread(n_batches, append_batch)

    # the writes are all there, numbered without gaps
    total = 0
    for tid in running:
        seqs = [e.seq for e in await store.events_after(tid, 0, limit=1_000_000)]
        assert seqs == list(range(1, len(seqs) + 1)), tid
        total += len(seqs)
    assert total == len(running) + n_events + n_batches * BATCH, total
    listed, _ = await store.list_tasks(owner="bench", limit=n_tasks + 1)
    assert len(listed) == n_tasks
    return {
        "submissions/s": n_tasks / t_submit,
        "appends/s (1 per call)": n_events / t_one,
        f"appends/s ({BATCH} per call)": n_batches * BATCH / t_batch,
    }


@asynccontextmanager
async def postgres_url(url: str | None = None):
    url = url or os.environ.get("MARATHON_BENCH_PG")
    if url:
        yield url
        return
    from tests.servers import PostgresServer

    server = PostgresServer()
    try:
        await trio.to_thread.run_sync(server.start)
        yield await trio.to_thread.run_sync(server.create_database, "bench")
    finally:
        await trio.to_thread.run_sync(server.remove)


async def run(n_tasks: int, n_events: int, *, pg_url: str | None = None, out=print) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    tmp = tempfile.mkdtemp(prefix="marathon-bench-store-")
    try:
        store = await open_store(f"sqlite://{os.path.join(tmp, 'bench.db')}", tmp)
        try:
            results["sqlite"] = await measure(store, n_tasks, n_events)
        finally:
            await store.close()
        async with postgres_url(pg_url) as url:
            store = await open_store(url, tmp)
            try:
                results["postgresql"] = await measure(store, n_tasks, n_events)
            finally:
                await store.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    out(f"store throughput: {n_tasks} submissions, {n_events} events, {CONCURRENCY} concurrent callers")
    out(f"  {'':<26}{'SQLite':>12}{'PostgreSQL':>12}{'PG/SQLite':>11}")
    for metric in results["sqlite"]:
        a, b = results["sqlite"][metric], results["postgresql"][metric]
        out(f"  {metric:<26}{a:12,.0f}{b:12,.0f}{b / a:10.2f}x")
    return results


async def main(n_tasks: int = 5000, n_events: int = 20000) -> dict[str, dict[str, float]]:
    return await run(n_tasks, n_events)


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING)
    n_tasks = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    n_events = int(sys.argv[2]) if len(sys.argv) > 2 else 20000
    trio.run(main, n_tasks, n_events)
