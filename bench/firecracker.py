"""Firecracker with the tiny test guest (tests/fc_guest): where the VMM's time goes.

Per run, p50/p99 over N runs:
  spawn -> API ready        process start until ``GET /`` answers (mount namespace, no network)
  configure + InstanceStart boot source, machine config, vsock; the start action returns
  start -> guest output     InstanceStart until the guest's first serial line (guest executing)
  snapshot create (Full)    pause + ``PUT /snapshot/create`` (memory file of --mem MiB)
  load + resume             ``PUT /snapshot/load`` with resume_vm into a fresh spawned VMM
  restore -> next guest tick  load+resume until the restored guest's next timer tick (the
                            guest waits in hlt: bounded by --tick-us, default 1 ms)
  destroy                   kill, remove sockets and directory (shielded cleanup)
plus the VMM's resident memory with the idle guest, and the same with ``--network tap`` /
``--jailer`` when asked.

    .venv/bin/python bench/firecracker.py [--runs 10] [--mem 128] [--network none|tap] [--jailer] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time

import trio

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import describe, pct  # noqa: E402
from marathon.node.sandbox.firecracker import FirecrackerVM, Jailer, find_binary, open_vm  # noqa: E402
from tests.fc_guest.build import BANNER, build_guest  # noqa: E402

TICK = re.compile(r"tick ([0-9a-f]{8})")


async def until(pred, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not pred():  # noqa: ASYNC110  (the guest's serial output is a file: nothing signals it)
            await trio.sleep(0.0005)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        found = re.search(r"VmRSS:\s+(\d+)", f.read())
    assert found, f"no VmRSS for process {pid}"
    return int(found.group(1))


async def one_run(root: str, guest: str, args, jailer: Jailer | None) -> dict[str, float]:
    kw = dict(prefix="mfcb-", network=args.network, jailer=jailer)
    out: dict[str, float] = {}
    vm = FirecrackerVM(os.path.join(root, "a"), **kw)
    try:
        t0 = time.perf_counter()
        await vm.spawn()
        out["spawn -> API ready"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        await vm.configure(kernel=guest, vcpus=1, mem_mib=args.mem, vsock_cid=3)
        await vm.start()
        t1 = time.perf_counter()
        out["configure + InstanceStart"] = t1 - t0
        await until(lambda: BANNER in vm.serial())
        out["start -> guest output"] = time.perf_counter() - t1
        await until(lambda: TICK.search(vm.serial()) is not None)
        assert vm.proc is not None
        out["idle VMM RSS (MiB)"] = rss_kib(vm.proc.pid) / 1024
        t0 = time.perf_counter()
        snap = await vm.snapshot(os.path.join(root, "snap"))
        out["snapshot create (Full)"] = time.perf_counter() - t0
    finally:
        t0 = time.perf_counter()
        await vm.destroy()
        out["destroy"] = time.perf_counter() - t0
    async with open_vm(os.path.join(root, "b"), **kw) as clone:
        t0 = time.perf_counter()
        await clone.restore_from(snap, resume=True)
        t1 = time.perf_counter()
        out["load + resume"] = t1 - t0
        await until(lambda: TICK.search(clone.serial()) is not None)
        out["restore -> next guest tick"] = time.perf_counter() - t1
    return out


async def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Firecracker tiny-guest benchmark")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--mem", type=int, default=128, help="guest memory, MiB (sets the snapshot size)")
    ap.add_argument("--network", default="none", choices=("none", "tap"))
    ap.add_argument("--jailer", action="store_true", help="run each VMM under the jailer (uid 4243)")
    ap.add_argument(
        "--tick-us",
        type=int,
        default=1000,
        help="guest timer period: bounds 'restore -> guest runs' (the guest waits in hlt)",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if not find_binary("firecracker"):
        raise SystemExit("firecracker binary missing: run make firecracker")
    with tempfile.TemporaryDirectory(prefix="fcb", dir="/tmp") as tmp:
        guest = build_guest(os.path.join(tmp, "guest"), period_ns=args.tick_us * 1000)
        jailer = (
            Jailer(binary=find_binary("jailer"), uid=4243, gid=4243, chroot_base=os.path.join(tmp, "j"))
            if args.jailer
            else None
        )
        results: dict[str, list[float]] = {}
        for i in range(args.runs):
            root = os.path.join(tmp, f"r{i}")
            for k, v in (await one_run(root, guest, args, jailer)).items():
                results.setdefault(k, []).append(v)
    if args.json:
        print(json.dumps({k: {"p50": pct(v, 50), "p99": pct(v, 99), "n": len(v)} for k, v in results.items()}))
        return
    setup = f"tiny guest, 1 vCPU, {args.mem} MiB, network {args.network}{', jailer' if args.jailer else ', mount ns'}"
    print(
        f"Firecracker v1.12.1 ({setup}); /dev/kvm: "
        f"{'kvm_pvm (software)' if os.path.isdir('/sys/module/kvm_pvm') else 'kvm'}"
    )
    for name, values in results.items():
        if "MiB" in name:
            print(describe(name, values, unit="MiB", scale=1.0))
        else:
            print(describe(name, values))


if __name__ == "__main__":
    trio.run(main)
