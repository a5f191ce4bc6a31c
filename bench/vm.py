"""MicroVM start-up, side by side: QEMU cold boot -> agent ready vs restore from a snapshot
-> agent ready (p50 over N), warm-pool claim vs cold start, and idle memory per sandbox.

    .venv/bin/python -m bench.vm [RUNS]
"""

from __future__ import annotations

import os
import sys
import time

import trio

from bench.common import describe, pct
from marathon.cli.serve import make_backend
from marathon.node.pool import WarmPool
from marathon.node.procs import descendants
from marathon.node.supervisor import connect_agent
from tests.harness import marathon_config, scratch_dir


def rss_kib(pids: set[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return total


async def main(runs: int) -> None:
    tmp = scratch_dir("marathon-bench-")
    cfg = marathon_config(os.path.join(tmp, "data"), sandbox="qemu", vm_mem_mib=768, log_level="warning")
    qemu = make_backend(cfg)
    cold, restore, claim, idle_vm = [], [], [], []
    snap = None
    for i in range(runs):
        t0 = time.monotonic()
        sb = await qemu.create(f"cold{i}", os.path.join(tmp, f"cold{i}"))
        fs = await connect_agent(sb, 600)
        cold.append(time.monotonic() - t0)
        await trio.sleep(1)
        idle_vm.append(rss_kib({sb.pid}))
        await fs.aclose()
        if snap is None:
            snap = await qemu.snapshot(sb, os.path.join(tmp, "snap"))
        else:
            await sb.destroy()
    for i in range(runs):
        t0 = time.monotonic()
        sb = await qemu.restore(f"warm{i}", os.path.join(tmp, f"warm{i}"), snap)
        fs = await connect_agent(sb, 600)
        restore.append(time.monotonic() - t0)
        await fs.aclose()
        await sb.destroy()
    # the pool: what a task waits for when a warm sandbox is ready (claim) vs when it is not (cold)
    pool = WarmPool(
        qemu,
        target=1,
        slots=1,
        active=lambda: 0,
        root=os.path.join(tmp, "pool"),
        connect=connect_agent,
        connect_timeout=600,
    )
    async with trio.open_nursery() as n:
        await n.start(pool.run)
        for _ in range(min(runs, 5)):
            await pool.wait_ready(1)
            t0 = time.perf_counter()
            warm = pool.claim()
            claim.append(time.perf_counter() - t0)
            assert warm is not None
            await warm.channel.aclose()
            await warm.sandbox.destroy()
        n.cancel_scope.cancel()
    # the process backend, for comparison
    proc_cfg = marathon_config(os.path.join(tmp, "pdata"), log_level="warning")
    pb = make_backend(proc_cfg)
    proc_start, idle_proc = [], []
    for i in range(runs):
        t0 = time.monotonic()
        sb = await pb.create(f"p{i}", os.path.join(tmp, f"prun{i}"))
        try:
            fs = await connect_agent(sb, 60)
            proc_start.append(time.monotonic() - t0)
            await trio.sleep(0.5)
            root = sb._child.pid
            idle_proc.append(rss_kib(descendants(root) | {root}))
            await fs.aclose()
        finally:
            await sb.destroy()

    print(f"QEMU microvm ({qemu.accel.upper()}, {qemu.vcpus} vCPU, {qemu.mem_mib} MiB), {runs} runs each")
    print(describe("cold boot -> agent ready", cold, "s", 1))
    print(describe("restore from snapshot -> agent ready", restore, "s", 1))
    print(f"ratio cold/restore p50: {pct(cold, 50) / pct(restore, 50):.1f}x")
    print(describe("warm pool claim (a task's wait)", claim, "ms"))
    print(f"ratio cold start / warm claim p50: {pct(cold, 50) / pct(claim, 50):,.0f}x")
    print(describe("process sandbox start -> agent ready", proc_start, "s", 1))
    print(
        f"idle memory per sandbox (RSS): qemu VM {pct(idle_vm, 50) / 1024:.0f} MiB, "
        f"process sandbox {pct(idle_proc, 50) / 1024:.0f} MiB"
    )


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING)
    trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 10)
