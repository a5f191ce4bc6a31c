"""Two orchestrator replicas on one PostgreSQL, Redis and etcd, a node connected to each: tasks
submitted through either replica run once, on either node; a task is followed through the
replica that does not hold its node; a cancel through one replica stops the task on a node the
other holds; /v1/cluster shows both replicas, one leader, and which replica holds each node."""

from __future__ import annotations

import os
import secrets
import sys
from contextlib import asynccontextmanager

import pytest
import trio

from bench.common import prepare_claude_stub
from marathon.cli.serve import serve_role
from marathon.secretbox import new_key
from tests.harness import marathon_config, run_marathon, scratch_dir
from tests.polling import until

pytestmark = pytest.mark.slow


def shared_settings(pg_url: str, redis_url: str, etcd_endpoint: str) -> dict:
    return dict(
        store=pg_url,
        redis_url=redis_url,
        etcd_endpoints=etcd_endpoint,
        etcd_prefix=f"/marathon-{secrets.token_hex(4)}/",  # this test's own keys on the shared etcd
        node_secret=secrets.token_urlsafe(32),
        secrets_key=new_key(),
        lease_ttl=2.0,
        leader_ttl=2.0,
        bus_poll_interval=1.0,
        claude_bin=prepare_claude_stub(),
    )


@asynccontextmanager
async def two_replicas(pg_url: str, redis_url: str, etcd_endpoint: str):
    tmp = scratch_dir()
    shared = shared_settings(pg_url, redis_url, etcd_endpoint)
    async with (
        run_marathon(marathon_config(os.path.join(tmp, "a"), **shared), role="orchestrator") as a,
        run_marathon(marathon_config(os.path.join(tmp, "b"), **shared), role="orchestrator") as b,
        trio.open_nursery() as nursery,
    ):
        nodes = []
        for name, replica in (("n1", a), ("n2", b)):
            cfg = marathon_config(
                os.path.join(tmp, name), **shared, orchestrator=replica.gateway, node_name=name, slots=2
            )
            os.makedirs(cfg.data_dir, mode=0o711, exist_ok=True)
            _, node = await nursery.start(serve_role, "node", cfg)
            with trio.fail_after(20):
                await node.connected.wait()
            nodes.append(node)
        try:
            yield a, b, nodes
        finally:
            nursery.cancel_scope.cancel()


async def cluster_of(mt) -> dict:
    r = await mt.client.get("/v1/cluster")
    assert r.status_code == 200, r.text
    return r.json()


async def test_two_replicas_share_the_work_and_the_streams(pg_url, redis_server, etcd_server):
    async with two_replicas(pg_url, redis_server.url, etcd_server.endpoint) as (a, b, nodes):
        # both replicas, one leader, each node with the replica that holds it
        async def complete() -> bool:
            c = await cluster_of(a)
            return len(c["replicas"]) == 2 and len(c["nodes"]) == 2

        await until(complete, timeout=20)
        for mt in (a, b):
            c = await cluster_of(mt)
            assert sum(r["leader"] for r in c["replicas"]) == 1
            assert {n["name"]: n["replica"] for n in c["nodes"]} == {
                "n1": (await cluster_of(a))["replica"],
                "n2": (await cluster_of(b))["replica"],
            }

        res = await trio.run_process(
            [sys.executable, "-m", "marathon", "cluster"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={**os.environ, "MARATHON_URL": b.url},
        )
        out = res.stdout.decode()
        assert res.returncode == 0, out + res.stderr.decode()
        assert "2 replica(s)" in out and "leader" in out and "this one" in out and "2 node(s)" in out, out

        # tasks submitted alternately through both replicas: each runs once, both nodes work
        submitted = []
        for i in range(12):
            via = (a, b)[i % 2]
            submitted.append((await via.submit(f"lines:{5 + i}"))["id"])
        ran_on = {}
        for i, task_id in enumerate(submitted):
            other = (b, a)[i % 2]  # followed through the replica it was not submitted to
            with trio.fail_after(120):
                events = await other.events(task_id)
            ids = [e["id"] for e in events]
            assert ids == list(range(1, len(ids) + 1)), "every event once, in order"
            assert sum(1 for e in events if e["event"] == "text") == 5 + i
            states = [e["data"]["state"] for e in events if e["event"] == "state"]
            assert states.count("scheduled") == 1 and states[-1] == "succeeded", states
            task = await other.task(task_id)
            assert task["state"] == "succeeded" and task["attempt"] == 1
            ran_on[task_id] = task["node_id"]
        assert len(set(ran_on.values())) == 2, "both nodes took tasks"


async def test_a_cancel_through_one_replica_stops_the_task_on_the_others_node(pg_url, redis_server, etcd_server):
    async with two_replicas(pg_url, redis_server.url, etcd_server.endpoint) as (a, b, nodes):
        by_id = {n.node_id: n for n in nodes}
        holder = {nodes[0].node_id: a, nodes[1].node_id: b}
        task = await a.submit("sleep:120")
        await a.wait_state(task["id"], {"running"})
        node_id = (await a.task(task["id"]))["node_id"]
        elsewhere = b if holder[node_id] is a else a
        r = await elsewhere.client.post(f"/v1/tasks/{task['id']}/cancel")
        assert r.status_code in (200, 202), r.text
        assert (await a.task(task["id"]))["state"] == "cancelled"
        # the node holding it was told, through its own replica, and stops the sandbox
        await until(lambda: task["id"] not in by_id[node_id].tasks, timeout=30)


async def in_background(nursery: trio.Nursery, cm):
    """Enter ``cm`` in a task of its own; returns what it gives and a scope that ends it."""
    scope = trio.CancelScope()

    async def run(*, task_status=trio.TASK_STATUS_IGNORED):
        with scope:
            async with cm as value:
                task_status.started(value)
                await trio.sleep_forever()

    return await nursery.start(run), scope


async def test_a_node_moves_to_the_other_replica_when_its_replica_stops(pg_url, redis_server, etcd_server):
    """The node is given both gateways; its replica stops mid-task: the node connects to the
    other one, replays what was not acknowledged, and the task ends once, in order, there."""
    tmp = scratch_dir()
    shared = shared_settings(pg_url, redis_server.url, etcd_server.endpoint)
    async with trio.open_nursery() as nursery:
        a, stop_a = await in_background(
            nursery, run_marathon(marathon_config(os.path.join(tmp, "a"), **shared), role="orchestrator")
        )
        b, _ = await in_background(
            nursery, run_marathon(marathon_config(os.path.join(tmp, "b"), **shared), role="orchestrator")
        )
        cfg = marathon_config(
            os.path.join(tmp, "n"), **shared, orchestrator=f"{a.gateway},{b.gateway}", node_name="n", slots=2
        )
        os.makedirs(cfg.data_dir, mode=0o711, exist_ok=True)
        _, node = await nursery.start(serve_role, "node", cfg)
        with trio.fail_after(20):
            await node.connected.wait()
        assert node.gateway == a.gateway
        task = await b.submit("sleep:4")
        await b.wait_state(task["id"], {"running"})
        stop_a.cancel()  # replica A goes away while the task runs on its node
        with trio.fail_after(60):
            events = await b.events(task["id"])
        ids = [e["id"] for e in events]
        assert ids == list(range(1, len(ids) + 1)), "every event once, in order"
        done = await b.task(task["id"])
        assert done["state"] == "succeeded" and done["attempt"] == 1, done
        assert node.gateway == b.gateway and node.connected.is_set()
        c = await cluster_of(b)
        assert [r["leader"] for r in c["replicas"]] == [True] and c["nodes"][0]["replica"] == c["replica"]
        nursery.cancel_scope.cancel()
