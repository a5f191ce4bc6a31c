"""A node that vanishes mid-task: its task is queued again and finishes elsewhere."""

from __future__ import annotations

import os

import msgspec
import pytest
import trio

from marathon.cli.serve import make_backend
from marathon.node.service import serve_node
from tests import fake_anthropic as fa
from tests.harness import alive, descendants, marathon_config, run_marathon, scratch_dir

pytestmark = pytest.mark.slow


async def test_node_lost_mid_task_requeues_and_another_node_finishes_it():
    tmp = scratch_dir()
    calls = []
    first_request = trio.Event()

    def script(body, i):
        calls.append(i)
        if len(calls) == 1:
            first_request.set()
            return fa.hang()
        return fa.text("done on the second node")

    async with fa.open_fake_anthropic(script) as fake:
        config = marathon_config(os.path.join(tmp, "orch"), anthropic_base_url=fake.url, node_grace=0.5)
        async with run_marathon(config, role="orchestrator") as mt:

            def node_config(name):
                return msgspec.structs.replace(
                    config,
                    data_dir=os.path.join(tmp, name),
                    node_name=name,
                    orchestrator=mt.gateway,
                )

            async with trio.open_nursery() as node_a:
                cfg_a = node_config("node-a")
                svc_a = await node_a.start(serve_node, cfg_a, make_backend(cfg_a), mt.node_secret)
                with trio.fail_after(10):
                    await svc_a.connected.wait()
                task = await mt.submit("survive a node loss")
                with trio.fail_after(60):
                    await first_request.wait()
                assert (await mt.task(task["id"]))["state"] == "running"
                sandbox_procs = descendants(os.getpid())
                node_a.cancel_scope.cancel()  # node A dies: its connection drops, its sandboxes go with it
            assert alive(sandbox_procs) == set()

            async with trio.open_nursery() as node_b:
                cfg_b = node_config("node-b")
                await node_b.start(serve_node, cfg_b, make_backend(cfg_b), mt.node_secret)
                final = await mt.finish(task["id"], timeout=90)
                node_b.cancel_scope.cancel()

            assert final["state"] == "succeeded", final
            assert final["attempt"] == 2
            assert final["final_text"] == "done on the second node"
            events = await mt.events(task["id"], follow=False)
            lost = [e["data"] for e in events if e["event"] == "state" and e["data"].get("reason") == "node_lost"]
            assert lost and lost[0]["state"] == "queued" and "queued again" in lost[0]["message"]
            seqs = [e["id"] for e in events]
            assert seqs == sorted(set(seqs))


async def test_task_fails_after_max_attempts_of_node_loss():
    tmp = scratch_dir()
    requests = trio.Semaphore(0)

    def script(body, i):
        requests.release()
        return fa.hang()

    async with fa.open_fake_anthropic(script) as fake:
        config = marathon_config(os.path.join(tmp, "orch"), anthropic_base_url=fake.url, node_grace=0.3, max_attempts=2)
        async with run_marathon(config, role="orchestrator") as mt:
            task = None
            for attempt in (1, 2):
                cfg = msgspec.structs.replace(
                    config, data_dir=os.path.join(tmp, f"n{attempt}"), node_name=f"n{attempt}", orchestrator=mt.gateway
                )
                async with trio.open_nursery() as n:
                    await n.start(serve_node, cfg, make_backend(cfg), mt.node_secret)
                    if task is None:
                        task = await mt.submit("doomed")
                    with trio.fail_after(60):
                        await requests.acquire()
                    n.cancel_scope.cancel()
            assert task is not None
            final = await mt.finish(task["id"], timeout=30)
            assert final["state"] == "failed" and final["reason"] == "node_lost"
            assert "gave up after 2 attempts" in final["message"]


async def test_a_node_refuses_an_older_attempt_than_it_has_seen():
    """Fencing on the node: an assignment of an attempt older than one it was given already
    (delayed, or sent by a replica that had not seen the newer one) is refused, and what runs
    goes on."""
    from bench.common import prepare_claude_stub
    from marathon.protocol import messages as m

    config = marathon_config(os.path.join(scratch_dir(), "data"), claude_bin=prepare_claude_stub())
    async with run_marathon(config) as mt:
        task = await mt.submit("sleep:30")
        await mt.wait_state(task["id"], {"running"})
        handle = mt.node.tasks[task["id"]]
        sent: list = []

        class Link:
            async def send(self, msg):
                sent.append(msg)

        stale = msgspec.structs.replace(handle.spec, attempt=handle.spec.attempt - 1)
        await mt.node._assign(Link(), m.Assign(task=stale))
        assert len(sent) == 1 and isinstance(sent[0], m.Rejected) and "stale" in sent[0].reason
        assert mt.node.tasks[task["id"]] is handle and not handle.stop.is_set()
        r = await mt.client.post(f"/v1/tasks/{task['id']}/cancel")
        assert r.status_code in (200, 202)
