"""Control-plane latency: submit -> the agent has the task and starts Claude Code.

Marathon path: POST /v1/tasks -> scheduler -> gateway -> node -> clone -> bubblewrap sandbox
-> agent -> `running` event persisted.  Baseline, side by side: the same node-side steps
called directly (prepare the repository bundle, start the same sandbox, dial the agent, send
Start and the bundle, the agent's first state event).
Claude Code itself is replaced by a stub (bench/fake_claude.sh): this measures Marathon.

    .venv/bin/python -m bench.control_plane [N]
"""

from __future__ import annotations

import os
import shutil
import sys
import time

import trio

from bench.common import describe, pct, prepare_claude_stub
from marathon.cli.serve import make_backend
from marathon.config import Config
from marathon.node.git import MirrorCache
from marathon.node.repo import prepare
from marathon.node.sandbox import SandboxOptions
from marathon.node.supervisor import connect_agent
from marathon.protocol import messages as m
from marathon.protocol.blobs import send_file
from tests.harness import make_git_repo, marathon_config, run_marathon, scratch_dir


async def marathon_path(config, repo: str, n: int) -> list[float]:
    out = []
    async with run_marathon(config) as mt:
        for _ in range(n):
            t0 = time.time()
            task = await mt.submit("noop", repo=repo)
            await mt.wait_state(task["id"], {"running"})
            evs = await mt.events(task["id"], follow=False)
            running = next(e for e in evs if e["event"] == "state" and e["data"]["state"] == "running")
            # the store's timestamp of the running event: when the orchestrator persisted it
            t_run = (await mt.client.get(f"/v1/tasks/{task['id']}")).json()["started_at"]
            out.append(t_run - t0)
            await mt.finish(task["id"])
            assert running
    return out


async def direct_path(config: Config, repo: str, n: int) -> list[float]:
    backend = make_backend(config)
    cache = MirrorCache(os.path.join(config.data_dir, "direct-mirrors"))
    out = []
    for i in range(n):
        spec = m.TaskSpec(
            task_id=f"{time.monotonic_ns() % 16**12:012x}",
            request=m.TaskRequest(prompt="noop", repo=repo),
            trusted_repo=True,
        )
        root = os.path.join(config.data_dir, "direct", spec.task_id)
        os.makedirs(root, mode=0o711)
        t0 = time.time()
        prep = await prepare(spec, config, cache, root, token=None, resume_bundle=None)
        sb = await backend.create(
            f"d{i}", os.path.join(root, "run"), SandboxOptions(uid=config.sandbox_uid, gid=config.sandbox_uid)
        )
        try:
            fs = await connect_agent(sb, 20)
            await fs.send(m.Start(task=spec, workspace=sb.workspace, base_branch=prep.branch, api_key="x",
                                  **sb.start_fields))  # fmt: skip
            await send_file(fs, "repo", prep.bundle)
            while True:
                msg = await fs.receive()
                if isinstance(msg, m.AgentEvent) and isinstance(msg.event, m.StateEvent):
                    out.append(time.time() - t0)
                    break
            while not isinstance(await fs.receive(), m.AgentResult):
                pass
            await fs.aclose()
        finally:
            await sb.destroy()
            shutil.rmtree(root, ignore_errors=True)
    return out


async def main(n: int, warmup: int = 3) -> None:
    tmp = scratch_dir("marathon-bench-")
    repo = make_git_repo(os.path.join(tmp, "repo"))
    config = marathon_config(
        os.path.join(tmp, "data"),
        claude_bin=prepare_claude_stub(),
        log_level="warning",
        submit_burst=n + 10,  # one user submits every task: the rate limit is not what is measured
    )
    os.makedirs(config.data_dir, mode=0o711, exist_ok=True)
    await direct_path(config, repo, warmup)  # warm caches
    base = await direct_path(config, repo, n)
    mar = await marathon_path(config, repo, n)
    print(f"control plane: submit -> agent running ({n} tasks each, sequential, bubblewrap sandbox)")
    print(describe("baseline: same sandbox spawned directly", base))
    print(describe("marathon: submit via API", mar))
    print(f"ratio marathon/baseline: p50 {pct(mar, 50) / pct(base, 50):.2f}x  p99 {pct(mar, 99) / pct(base, 99):.2f}x")
    print(f"orchestration overhead p50: {(pct(mar, 50) - pct(base, 50)) * 1000:.1f} ms")


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING)
    trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 50)
