"""Event throughput: lines/s from the agent to a client following the task over SSE.

The stand-in Claude Code prints N stream-json lines as fast as it can; each becomes an event
that crosses agent -> node -> orchestrator (persisted in SQLite, in batches) -> SSE client.
Baseline, side by side: the same client reading the same events replayed from the store
after the task has ended (no live path).

    .venv/bin/python -m bench.events [N]
"""

from __future__ import annotations

import os
import sys
import time

import trio

from bench.common import prepare_claude_stub
from tests.harness import marathon_config, run_marathon, scratch_dir


async def main(n: int) -> None:
    tmp = scratch_dir("marathon-bench-")
    config = marathon_config(os.path.join(tmp, "data"), claude_bin=prepare_claude_stub(), log_level="warning")
    async with run_marathon(config) as mt:
        task = await mt.submit(f"lines:{n}")
        t0 = time.monotonic()
        first = None
        count = 0

        def seen(e):
            nonlocal first, count
            if e["event"] == "text":
                count += 1
                if first is None:
                    first = time.monotonic()
            return False

        events = await mt.events(task["id"], until=seen)
        t_end = time.monotonic()
        final = await mt.task(task["id"])
        assert final["state"] == "succeeded", final
        assert count == n and first is not None, (count, n)
        live = n / (t_end - first)
        t1 = time.monotonic()
        replay = await mt.events(task["id"], follow=False)
        t_replay = time.monotonic() - t1
        assert len(replay) == len(events)
    print(f"event throughput, {n} lines from the agent to a following SSE client")
    print(
        f"  live (agent -> node -> SQLite -> SSE):   {live:10,.0f} lines/s   ({t_end - first:.2f} s first->last, {t_end - t0:.2f} s submit->last)"
    )
    print(f"  baseline: replay from the store over SSE: {len(replay) / t_replay:10,.0f} events/s ({t_replay:.2f} s)")
    print(f"  ratio live/replay: {live / (len(replay) / t_replay):.2f}")


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING)
    trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
