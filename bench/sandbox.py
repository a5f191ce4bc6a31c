"""What the sandbox's defences cost, and how fast a limit shows.

1. Submit -> agent running (the ``running`` state persisted), p50/p99 over N tasks, one at a
   time, side by side in one run:
   - hardened: the default profile: cgroup limits (memory, pids, cpu), a loop-mounted ext4
     task disk, the seccomp filter, one uid per slot;
   - bare: the same bubblewrap sandbox with limits, the task disk and seccomp off.
2. A memory-limit kill -> its event in the task's stream: the time between the hog's
   disappearance (watched in /proc) and the ``out of memory`` log event reaching an SSE
   follower.

Claude Code is replaced by a stub (bench/fake_claude.sh): this measures Marathon.

    .venv/bin/python -m bench.sandbox [N]
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager

import trio

from bench.common import describe, pct, prepare_claude_stub
from marathon.node import seccomp
from tests.harness import make_git_repo, marathon_config, run_marathon, scratch_dir


@contextmanager
def no_seccomp():
    saved = seccomp.native_abi
    seccomp.native_abi = lambda: None
    try:
        yield
    finally:
        seccomp.native_abi = saved


async def one_task(mt, repo: str) -> float:
    t0 = time.time()
    task = await mt.submit("noop", repo=repo)
    await mt.wait_state(task["id"], {"running"})
    rec = await mt.task(task["id"])
    if rec["started_at"] is None:
        raise RuntimeError(f"task {rec['id']} did not run: {rec['state']} {rec['reason']}: {rec['message']}")
    await mt.finish(task["id"])
    return rec["started_at"] - t0


async def side_by_side(hardened, bare, repo: str, n: int) -> tuple[list[float], list[float]]:
    """Both nodes up at once, tasks alternating between them, so neither gets a quieter machine."""
    h: list[float] = []
    b: list[float] = []
    async with run_marathon(hardened) as mh, run_marathon(bare) as mb:
        for i in range(n):
            for mt, out, plain in ((mh, h, False), (mb, b, True))[:: 1 if i % 2 else -1]:
                if plain:
                    with no_seccomp():
                        out.append(await one_task(mt, repo))
                else:
                    out.append(await one_task(mt, repo))
    return h, b


def _hog_pids() -> set[int]:
    out = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"marathon-bench-hog" in f.read():
                    out.add(int(pid))
        except OSError:
            pass
    return out


async def kill_to_event(config, n: int) -> list[float]:
    out = []
    async with run_marathon(config) as mt:
        for _ in range(n):
            task = await mt.submit("hog", memory_limit="256MiB")
            died = trio.Event()
            gone_at: list[float] = []

            async def watch(died=died, gone_at=gone_at):
                seen: set[int] = set()
                while True:
                    now = _hog_pids()
                    if seen and not (now & seen):
                        gone_at.append(time.time())
                        died.set()
                        return
                    seen |= now
                    await trio.sleep(0.001)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                evs = await mt.events(task["id"], until=lambda e: e["event"] == "log"
                                      and e["data"]["message"].startswith("out of memory"))  # fmt: skip
                arrived = time.time()
                with trio.fail_after(10):
                    await died.wait()
            assert evs and gone_at
            out.append(max(0.0, arrived - gone_at[0]))
            await mt.finish(task["id"])
    return out


async def main(n: int = 50) -> dict:
    tmp = scratch_dir("marathon-bench-")
    repo = make_git_repo(os.path.join(tmp, "repo"))
    stub = prepare_claude_stub()
    hardened = marathon_config(os.path.join(tmp, "hardened"), claude_bin=stub, log_level="warning", submit_rate=1e6)
    bare = marathon_config(os.path.join(tmp, "bare"), claude_bin=stub, log_level="warning", limits="off", submit_rate=1e6,
                           disk_limit="off")  # fmt: skip
    h, b = await side_by_side(hardened, bare, repo, n)
    k = await kill_to_event(marathon_config(os.path.join(tmp, "hog"), claude_bin=stub, log_level="warning"),
                            max(3, n // 10))  # fmt: skip
    print(describe("submit -> running, hardened", h))
    print(describe("submit -> running, bare bwrap", b))
    print(f"{'ratio hardened/bare':<38} p50 {pct(h, 50) / pct(b, 50):.2f}x  p99 {pct(h, 99) / pct(b, 99):.2f}x")
    print(describe("memory kill -> event in the stream", k))
    return {"hardened": h, "bare": b, "kill_to_event": k}


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 50)
