"""Assignment -> Claude Code start for a ~50 MB repository, with and without the node's
mirror cache (side by side).  Without the cache every task clones the repository; with it,
the second and later tasks only fetch.  Either way the node bundles the branch and the agent
clones the bundle inside the sandbox.

    .venv/bin/python -m bench.repo [RUNS] [MB]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import trio

from bench.common import describe, pct, prepare_claude_stub
from tests.harness import make_git_repo, marathon_config, run_marathon, scratch_dir


def big_repo(path: str, mb: int) -> str:
    make_git_repo(path)
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "b",
        "GIT_AUTHOR_EMAIL": "b@b",
        "GIT_COMMITTER_NAME": "b",
        "GIT_COMMITTER_EMAIL": "b@b",
    }
    for i in range(mb // 5):
        with open(os.path.join(path, f"blob{i}.bin"), "wb") as f:
            f.write(os.urandom(5 * 1024 * 1024))
        subprocess.run(["git", "-C", path, "add", "-A"], check=True, env=env)
        subprocess.run(["git", "-C", path, "commit", "-qm", f"data {i}"], check=True, env=env)
    return path


async def assign_to_start(mt, task_id: str) -> float:
    evs = await mt.info.tasks.store.events_after(task_id, 0)
    ts = {json.loads(e.data).get("state"): e.ts for e in evs if e.kind == "state"}
    return ts["running"] - ts["scheduled"]


async def main(runs: int, mb: int) -> None:
    tmp = scratch_dir("marathon-bench-")
    repo = big_repo(os.path.join(tmp, "repo"), mb)
    size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(os.path.join(repo, ".git")) for f in fs)
    config = marathon_config(os.path.join(tmp, "data"), claude_bin=prepare_claude_stub(), log_level="warning")
    cold, warm = [], []
    async with run_marathon(config) as mt:
        mirrors = mt.node.cache.root
        for _ in range(runs):
            shutil.rmtree(mirrors, ignore_errors=True)  # no cache: this task clones
            t = await mt.submit("noop", repo=repo)
            assert (await mt.finish(t["id"]))["state"] == "succeeded"
            cold.append(await assign_to_start(mt, t["id"]))
            t = await mt.submit("noop", repo=repo)  # the cache is warm now: fetch only
            assert (await mt.finish(t["id"]))["state"] == "succeeded"
            warm.append(await assign_to_start(mt, t["id"]))
    print(
        f"assignment -> Claude Code start, {size / 1e6:.0f} MB repository (.git), local path remote, {runs} runs each"
    )
    print(describe("without the mirror cache (clone)", cold))
    print(describe("with the mirror cache (fetch)", warm))
    print(f"ratio with/without: p50 {pct(warm, 50) / pct(cold, 50):.2f}")


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 5, int(sys.argv[2]) if len(sys.argv) > 2 else 50)
