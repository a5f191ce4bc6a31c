"""The web dashboard in headless chromium: how soon things show.

1. Task list: time from navigation to the first rendered page of the list with 1,000 tasks
   in the store (the page's own ``marathon:tasks-rendered`` mark), fresh page load each time.
   Baseline: the same page of the API fetched by a Python client (what the page waits for).
2. Event stream: a finished task of 10,000 text lines; time from navigation until the last
   line is in the DOM (``marathon:events-complete``).  Baseline: reading the same event
   stream with a Python client (no rendering).

    .venv/bin/python -m bench.web [TASKS] [LINES]
"""

from __future__ import annotations

import os
import sys
import time

import httpx
import msgspec
import trio

from bench.common import describe
from marathon.orchestrator.tasks import event_in, new_task_id
from marathon.protocol import messages as m
from marathon.store import EventIn, TaskRecord, TaskRequest
from tests import browser
from tests.harness import marathon_config, run_marathon, scratch_dir

RUNS = 5


async def fill(store, owner: str, n_tasks: int, n_lines: int) -> str:
    await browser.fill_tasks(store, owner, n_tasks)
    # one finished task with a long event stream
    big = TaskRecord(id=new_task_id(), owner=owner, state="queued", request=TaskRequest(prompt="print 10k lines"))
    await store.create_task(big, event_in(big.id, m.StateEvent(state="queued")))
    enc = msgspec.json.Encoder()
    for start in range(0, n_lines, 1000):
        batch = [
            EventIn(big.id, "text", enc.encode(m.TextEvent(text=f"line {k}: " + "x" * 60, iteration=1)))
            for k in range(start, min(start + 1000, n_lines))
        ]
        await store.append_events(batch)
    await store.update_task(
        big.id,
        expect_state=None,
        changes={"state": "succeeded", "finished_at": time.time(), "started_at": time.time() - 5},
        event=event_in(big.id, m.StateEvent(state="succeeded")),
    )
    return big.id


def measure(driver, url: str, token: str, hash_: str, mark: str, timeout: float = 120) -> float:
    """Milliseconds from navigation start to ``mark``, on a fresh page load."""
    driver.get("about:blank")
    driver.get(url + "/ui/favicon.svg")  # same origin, to set the token without the app
    driver.execute_script("localStorage.setItem('marathon.token', arguments[0])", token)
    driver.get(f"{url}/#/{hash_}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        t = driver.execute_script(
            f"const e = performance.getEntriesByName('{mark}'); return e.length ? e[0].startTime : null"
        )
        if t is not None:
            return float(t)
        time.sleep(0.01)
    raise TimeoutError(mark)


async def main(n_tasks: int, n_lines: int) -> None:
    why = browser.missing()
    if why:
        sys.exit(f"bench.web cannot run: {why}")
    tmp = scratch_dir("marathon-bench-")
    config = marathon_config(os.path.join(tmp, "data"), log_level="warning")
    async with run_marathon(config, role="orchestrator") as mt:
        token = mt.client.headers["Authorization"].split()[1]
        admin = await mt.info.accounts.ensure_local_admin()
        t0 = time.monotonic()
        big = await fill(mt.info.tasks.store, admin.id, n_tasks, n_lines)
        print(f"store: {n_tasks} tasks + one of {n_lines} events written in {time.monotonic() - t0:.1f}s")

        api = []
        for _ in range(RUNS):
            t = time.monotonic()
            r = await mt.client.get("/v1/tasks", params={"limit": 50})
            api.append(time.monotonic() - t)
            assert len(r.json()["tasks"]) == 50
        replay = []
        for _ in range(3):
            t = time.monotonic()
            async with mt.client.stream("GET", f"/v1/tasks/{big}/events", timeout=httpx.Timeout(30, read=None)) as s:
                count = len([line async for line in s.aiter_lines() if line.startswith("id: ")])
            replay.append(time.monotonic() - t)
            assert count == n_lines + 2, count

        def run_browser():
            lists, streams = [], []
            with browser.open_chromium() as driver:
                measure(driver, mt.url, token, "tasks", "marathon:tasks-rendered")  # warm the cache once
                for _ in range(RUNS):
                    lists.append(measure(driver, mt.url, token, "tasks", "marathon:tasks-rendered") / 1000)
                for _ in range(3):
                    streams.append(measure(driver, mt.url, token, f"tasks/{big}", "marathon:events-complete") / 1000)
                shown = driver.execute_script("return document.querySelectorAll('.events [data-seq]').length")
                assert shown == n_lines + 2, shown
                errors = browser.console_errors(driver)
                assert not errors, errors
            return lists, streams

        lists, streams = await trio.to_thread.run_sync(run_browser)
    print(f"task list, {n_tasks} tasks in the store (first page of 50), fresh load each time")
    print("  " + describe("navigation -> first render", lists))
    print("  " + describe("baseline: GET /v1/tasks?limit=50", api))
    print(f"event stream, a finished task of {n_lines} lines")
    print("  " + describe("navigation -> last line in the DOM", streams))
    print("  " + describe("baseline: read the SSE stream (Python)", replay))


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING)
    trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 1000, int(sys.argv[2]) if len(sys.argv) > 2 else 10_000)
