"""Prometheus scrape of the orchestrator: ``GET /metrics`` with 10,000 tasks in the store (the
task counts by state are read at scrape time, one grouped query), against ``GET /healthz`` on
the same server as the baseline (the HTTP stack alone), and ``/metrics`` on an empty store.

    .venv/bin/python -m bench.metrics_scrape [TASKS] [RUNS]
"""

from __future__ import annotations

import os
import sys
import time

import httpx
import trio

from bench.common import describe, pct
from marathon.orchestrator.lifecycle import State
from marathon.orchestrator.tasks import event_in, new_task_id
from marathon.protocol import messages as m
from marathon.store import TaskRecord, TaskRequest
from tests.harness import marathon_config, run_marathon, scratch_dir

WARMUP = 5
# what a store that has run for a while holds: mostly ended tasks, some waiting (no node here, so
# none is scheduled: the figures are the scrape's, not the scheduler's churning through fakes)
STATES = [
    State.SUCCEEDED,
    State.SUCCEEDED,
    State.FAILED,
    State.CANCELLED,
    State.TIMED_OUT,
    State.QUEUED,
    State.NEEDS_INPUT,
]


async def fill(store, owner: str, n: int) -> None:
    now = time.time()
    for i in range(n):
        state = STATES[i % len(STATES)]
        rec = TaskRecord(
            id=new_task_id(),
            owner=owner,
            state=state,
            request=TaskRequest(prompt=f"task {i}"),
            created_at=now - (n - i),
            usage=m.Usage(1000 + i, 200 + i),
        )
        await store.create_task(rec, event_in(rec.id, m.StateEvent(state=str(state))))


async def timed_gets(client: httpx.AsyncClient, path: str, runs: int) -> tuple[list[float], int]:
    """Seconds per request, sequential, after a warm-up; and the size of the last body."""
    size = 0
    for _ in range(WARMUP):
        (await client.get(path)).raise_for_status()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        r = await client.get(path)
        out.append(time.perf_counter() - t0)
        r.raise_for_status()
        size = len(r.content)
    return out, size


async def main(n_tasks: int, runs: int = 200) -> None:
    tmp = scratch_dir("marathon-bench-")
    config = marathon_config(os.path.join(tmp, "data"), log_level="warning")
    async with (
        run_marathon(config, role="orchestrator") as mt,
        httpx.AsyncClient(base_url=mt.url, trust_env=False, timeout=30) as prometheus,  # no credentials
    ):
        empty, _ = await timed_gets(prometheus, "/metrics", runs)
        admin = await mt.info.accounts.ensure_local_admin()
        t0 = time.monotonic()
        await fill(mt.info.tasks.store, admin.id, n_tasks)
        print(f"store: {n_tasks} tasks ({len(set(STATES))} states) written in {time.monotonic() - t0:.1f}s")
        health, _ = await timed_gets(prometheus, "/healthz", runs)
        full, size = await timed_gets(prometheus, "/metrics", runs)
        r = await prometheus.get("/metrics")
        counts = {
            line.split('"')[1]: float(line.split()[-1])
            for line in r.text.splitlines()
            if line.startswith("marathon_tasks{")
        }
        assert counts[State.QUEUED] == sum(1 for i in range(n_tasks) if STATES[i % len(STATES)] == State.QUEUED), counts
        assert sum(counts.values()) == n_tasks, counts
    print(f"orchestrator scrape, {runs} sequential requests each (SQLite store, loopback HTTP)")
    print(describe("baseline: GET /healthz", health))
    print(describe("GET /metrics, empty store", empty))
    print(describe(f"GET /metrics, {n_tasks} tasks", full))
    print(
        f"ratio metrics/healthz: p50 {pct(full, 50) / pct(health, 50):.2f}x  p99 {pct(full, 99) / pct(health, 99):.2f}x"
    )
    print(f"ratio {n_tasks} tasks/empty store: p50 {pct(full, 50) / pct(empty, 50):.2f}x")
    print(f"scrape body: {size} bytes")


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING)
    trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 10_000, int(sys.argv[2]) if len(sys.argv) > 2 else 200)
