"""Resource limits hold: a memory hog, a bounded fork bomb and a disk filler each stay inside
their task (the right event, the right reason), while another task on the same node succeeds
and the orchestrator keeps answering.  Real Claude Code, real bwrap, real cgroups and a real
loop-mounted task disk."""

from __future__ import annotations

import json
import os

import pytest

from marathon.node.cgroups import Cgroups
from tests import fake_anthropic as fa
from tests.harness import make_git_repo, marathon_config, run_marathon, scratch_dir

pytestmark = pytest.mark.slow

HOG = 'python3 -c "b = []\nwhile True: b.append(bytearray(64 * 1024 * 1024))"'
FORKER = (
    'python3 -c "import os, signal, time\nn, kids = 0, []\nwhile n < 5000:\n    try:\n        pid = os.fork()\n'
    "    except OSError as e:\n        print('fork refused after', n, e)\n        break\n"
    "    if pid == 0:\n        time.sleep(3)\n        os._exit(0)\n    kids.append(pid)\n    n += 1\n"
    # then the children go at once: Claude Code shares the pids budget, and a thread it cannot
    # start ends it without a result (SIGABRT) — the window with the budget spent stays short
    "for pid in kids:\n    os.kill(pid, signal.SIGKILL)\nfor pid in kids:\n    os.waitpid(pid, 0)\n"
    "print('reaped', len(kids))\""
)
FILL = "head -c 400M /dev/urandom > fill.bin; ls -la; df -h ."


def enforced() -> set[str]:
    return set(Cgroups.detect("probe", setup=False).enforced)


def prompt_text(body: dict) -> str:
    return json.dumps(body["messages"][0]["content"])


def script(body, i):
    p = prompt_text(body)
    if "hog" in p:
        return [fa.tool_use("Bash", {"command": HOG, "description": "allocate"}), fa.text("the hog is gone")][i]
    if "forker" in p:
        return [fa.tool_use("Bash", {"command": FORKER, "description": "fork"}), fa.text("forked")][i]
    if "filler" in p:
        if "iteration 2" in p:  # the second iteration fills the disk
            return [fa.tool_use("Bash", {"command": FILL, "description": "fill"}), fa.text("filled")][i]
        return [fa.tool_use("Write", {"file_path": "kept.txt", "content": "work of iteration 1\n"}), fa.text("one")][i]
    return [fa.tool_use("Write", {"file_path": "ok.txt", "content": "fine\n"}), fa.text("done")][i]


async def events_of(mt, task_id: str) -> list[dict]:
    return await mt.events(task_id, follow=False)


@pytest.fixture
def cgroup_limits():
    missing = {"memory", "pids"} - enforced()
    if missing:
        pytest.fail(
            f"this host must enforce memory and pids limits for these tests: {Cgroups.detect('x', setup=False).describe()}"
        )


async def test_abusive_tasks_stay_inside_their_sandbox(cgroup_limits):
    tmp = scratch_dir()
    repo = make_git_repo(os.path.join(tmp, "repo"))
    async with fa.open_fake_anthropic(script) as fake:
        config = marathon_config(os.path.join(tmp, "data"), anthropic_base_url=fake.url, slots=2, default_pids=256)
        async with run_marathon(config) as mt:
            for abuse, extra in (
                ("hog", {"memory_limit": "768MiB"}),
                ("forker", {}),
                ("filler", {"disk_limit": "64MiB", "max_iterations": 2, "promise": "DONE"}),
            ):
                bad = await mt.submit(abuse, repo=repo, **extra)
                good = await mt.submit("an ordinary task", repo=repo)
                bad_final = await mt.finish(bad["id"], timeout=240)
                good_final = await mt.finish(good["id"], timeout=240)
                assert good_final["state"] == "succeeded", (abuse, good_final)
                assert (await mt.client.get("/healthz")).status_code == 200
                logs = [e["data"]["message"] for e in await events_of(mt, bad["id"]) if e["event"] == "log"]
                if abuse == "hog":
                    # the hog was killed inside its sandbox; Claude Code saw it die and finished
                    assert any(msg.startswith("out of memory: the kernel killed") for msg in logs), logs
                    assert any("memory 768 MiB" in msg for msg in logs if msg.startswith("limits:")), logs
                    assert bad_final["state"] == "succeeded", (bad_final["reason"], bad_final["message"])
                elif abuse == "forker":
                    assert any(msg.startswith("process limit reached") for msg in logs), logs
                    assert bad_final["state"] == "succeeded", (bad_final["reason"], bad_final["message"])
                else:
                    # iteration 2 filled the task's disk: its commit failed; iteration 1's work is kept
                    assert bad_final["state"] == "failed" and bad_final["reason"] == "disk_exhausted", bad_final
                    assert bad_final["commits"] == 1, bad_final
                    diff = (await mt.client.get(f"/v1/tasks/{bad['id']}/diff")).text
                    assert "+work of iteration 1" in diff
                    bundle = await mt.client.get(f"/v1/tasks/{bad['id']}/bundle")
                    assert bundle.status_code == 200 and bundle.content.startswith(b"# v2 git bundle")
            # the node's data dir and the orchestrator's database were never touched: still writable
            t = await mt.finish((await mt.submit("an ordinary task", repo=repo))["id"])
            assert t["state"] == "succeeded"


async def test_claude_code_killed_for_memory_ends_memory_exhausted(cgroup_limits):
    tmp = scratch_dir()
    async with fa.open_fake_anthropic(script) as fake:
        config = marathon_config(os.path.join(tmp, "data"), anthropic_base_url=fake.url)
        async with run_marathon(config) as mt:
            task = await mt.submit("a task in too little memory", memory_limit="48MiB")
            final = await mt.finish(task["id"], timeout=120)
            assert final["state"] == "failed" and final["reason"] == "memory_exhausted", final
            logs = [e["data"]["message"] for e in await events_of(mt, task["id"]) if e["event"] == "log"]
            assert any(msg.startswith("out of memory") for msg in logs), logs
            ok = await mt.finish((await mt.submit("an ordinary task"))["id"])
            assert ok["state"] == "succeeded"
