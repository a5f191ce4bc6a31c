"""The node gateway against a node we script message by message: attempts, acknowledgements,
reconnects and late answers."""

from __future__ import annotations

import os
from typing import Any

import pytest
import trio
import trio.testing

from marathon.errors import AuthError
from marathon.protocol.framing import FramedStream
from marathon.protocol import messages as m
from marathon.protocol.auth import node_mac, orchestrator_mac
from marathon.protocol.transports import open_stream
from tests.harness import marathon_config, run_marathon, scratch_dir


class ScriptedNode:
    def __init__(self, gateway: str, secret: str, node_id: str = "n-scripted"):
        self.gateway, self.secret, self.node_id = gateway, secret, node_id
        self.seq = 0
        self._fs: FramedStream[Any] | None = None

    @property
    def fs(self) -> FramedStream[Any]:
        assert self._fs is not None, "not connected"
        return self._fs

    async def connect(self, running: dict[str, int] | None = None, slots: int = 1, warm: int = 0) -> m.Welcome:
        self._fs = FramedStream(await open_stream(self.gateway), m.GatewayMessage)
        await self.fs.handshake("node", "test", initiator=True, timeout=5)
        challenge = await self.fs.receive()
        nonce = os.urandom(32)
        await self.fs.send(
            m.Authenticate(
                node_id=self.node_id,
                name="scripted",
                mac=node_mac(self.secret, challenge.nonce, self.node_id),
                capacity=m.Capacity(slots=slots, warm=warm),
                running=running or {},
                nonce=nonce,
            )
        )
        welcome = await self.fs.receive()
        assert welcome.mac == orchestrator_mac(self.secret, nonce, self.node_id)  # the orchestrator proved it, too
        return welcome

    async def expect(self, kind, timeout: float = 10):
        with trio.fail_after(timeout):
            while True:
                msg = await self.fs.receive()
                if isinstance(msg, kind):
                    return msg

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    async def event(self, task_id: str, attempt: int, ev) -> None:
        await self.fs.send(m.TaskEvent(task_id=task_id, node_seq=self.next_seq(), event=ev, attempt=attempt))

    async def result(self, task_id: str, attempt: int, state: str, **kw) -> None:
        await self.fs.send(
            m.TaskResult(
                task_id=task_id, node_seq=self.next_seq(), attempt=attempt, outcome=m.TaskOutcome(state=state, **kw)
            )
        )

    async def close(self) -> None:
        await self.fs.aclose()


@pytest.fixture
async def orchestrator():
    tmp = scratch_dir()
    config = marathon_config(os.path.join(tmp, "data"), node_grace=0.3, heartbeat_interval=0.2, assign_timeout=1.0)
    async with run_marathon(config, role="orchestrator") as mt:
        yield mt


async def test_a_stale_attempt_cannot_end_the_current_one(orchestrator):
    mt = orchestrator
    node = ScriptedNode(mt.gateway, mt.node_secret)
    await node.connect()
    task = await mt.submit("x")
    assign = await node.expect(m.Assign)
    assert assign.task.attempt == 1
    await node.fs.send(m.Accepted(task_id=task["id"], attempt=1))
    await node.event(task["id"], 1, m.StateEvent(state="running"))
    await mt.wait_state(task["id"], {"running"})
    await node.close()  # the node vanishes; after node_grace the task is queued again

    await mt.events(task["id"], until=lambda e: e["event"] == "state" and e["data"].get("reason") == "node_lost")
    await node.connect(running={task["id"]: 1})  # it comes back still running the old attempt
    cancel = await node.expect(m.Cancel)
    assert cancel.task_id == task["id"] and cancel.attempt == 1
    assign = await node.expect(m.Assign)
    assert assign.task.attempt == 2
    await node.fs.send(m.Accepted(task_id=task["id"], attempt=2))
    # the old attempt's events and its cancelled result arrive late: both ignored
    await node.event(task["id"], 1, m.TextEvent(text="from attempt 1"))
    await node.result(task["id"], 1, "cancelled", reason="cancelled")
    await node.event(task["id"], 2, m.StateEvent(state="running"))
    await node.event(task["id"], 2, m.TextEvent(text="from attempt 2"))
    await node.result(task["id"], 2, "succeeded", final_text="done")
    final = await mt.finish(task["id"], timeout=20)
    assert final["state"] == "succeeded" and final["attempt"] == 2 and final["final_text"] == "done"
    texts = [e["data"]["text"] for e in await mt.events(task["id"], follow=False) if e["event"] == "text"]
    assert texts == ["from attempt 2"]


async def test_an_acknowledgement_after_the_deadline_cancels_the_orphan(orchestrator):
    mt = orchestrator
    node = ScriptedNode(mt.gateway, mt.node_secret)
    await node.connect()
    task = await mt.submit("x")
    await node.expect(m.Assign)
    await mt.events(task["id"], until=lambda e: e["event"] == "state" and e["data"].get("reason") == "not_acknowledged")
    await node.fs.send(m.Accepted(task_id=task["id"], attempt=1))  # ...and then it arrives
    cancel = await node.expect(m.Cancel)
    assert cancel.task_id == task["id"] and cancel.attempt == 1


async def test_a_reconnect_keeps_an_assignment_whose_ack_was_lost(orchestrator):
    mt = orchestrator
    node = ScriptedNode(mt.gateway, mt.node_secret)
    await node.connect()
    task = await mt.submit("x")
    assign = await node.expect(m.Assign)
    await node.close()  # the Accepted never made it
    await node.connect(running={task["id"]: assign.task.attempt})
    await mt.wait_state(task["id"], {"starting"})
    await node.event(task["id"], 1, m.StateEvent(state="running"))
    await node.result(task["id"], 1, "succeeded")
    assert (await mt.finish(task["id"]))["state"] == "succeeded"


async def test_a_node_refuses_an_orchestrator_that_cannot_prove_the_secret():
    from marathon.cli.serve import make_backend
    from marathon.node.service import NodeService
    from marathon.node.proxy import MeteringProxy

    tmp = scratch_dir()
    impostor_secret = "not-the-secret"
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def impostor(stream):
        fs: FramedStream[Any] = FramedStream(stream, m.GatewayMessage)
        await fs.handshake("orchestrator", "x", initiator=False, timeout=5)
        await fs.send(m.Challenge(nonce=b"n" * 32))
        auth = await fs.receive()
        await fs.send(
            m.Welcome(
                node_id=auth.node_id,
                heartbeat_interval=1,
                mac=orchestrator_mac(impostor_secret, auth.nonce, auth.node_id),
            )
        )
        await trio.sleep_forever()

    config = marathon_config(os.path.join(tmp, "node"), orchestrator=f"tcp:127.0.0.1:{port}")
    async with trio.open_nursery() as n:
        await n.start(trio.serve_listeners, impostor, listeners)
        svc = NodeService(config, make_backend(config), MeteringProxy("http://127.0.0.1:9", "k"), "the-real-secret")
        with pytest.raises(AuthError, match="did not prove the node secret"):
            await svc._session()
        n.cancel_scope.cancel()


# ----------------------------------------------------------------------------- on trio's virtual clock

# Real sockets and SQLite threads run under the clock, so it jumps only when everything has been
# idle for a moment of real time (a thread at work is not "idle" for long).
AUTOJUMP_AFTER = 0.02


@pytest.fixture
def virtual_clock():
    return trio.testing.MockClock(autojump_threshold=AUTOJUMP_AFTER)


@pytest.fixture
async def slow_orchestrator():
    """Production-sized deadlines, passed in virtual time (the test asks for virtual_clock)."""
    tmp = scratch_dir()
    config = marathon_config(
        os.path.join(tmp, "data"),
        node_grace=30.0,
        heartbeat_interval=20.0,
        node_timeout=120.0,
        assign_timeout=10.0,
        max_attempts=5,
    )
    async with run_marathon(config, role="orchestrator") as mt:
        yield mt, config


async def keep_alive(node: ScriptedNode, interval: float) -> None:
    while True:
        await node.fs.send(m.Heartbeat(capacity=m.Capacity(slots=1)))
        await trio.sleep(interval)


async def running_task(mt, node: ScriptedNode, **kw) -> dict:
    task = await mt.submit("x", **kw)
    assign = await node.expect(m.Assign)
    await node.fs.send(m.Accepted(task_id=task["id"], attempt=assign.task.attempt))
    await node.event(task["id"], assign.task.attempt, m.StateEvent(state="running"))
    await mt.wait_state(task["id"], {"running"})
    return task


def state_with(reason: str):
    return lambda e: e["event"] == "state" and e["data"].get("reason") == reason


async def test_node_grace_on_the_virtual_clock(virtual_clock, slow_orchestrator):
    mt, config = slow_orchestrator
    node = ScriptedNode(mt.gateway, mt.node_secret)
    await node.connect()
    task = await running_task(mt, node)
    await node.close()
    lost_at = trio.current_time()
    await mt.events(task["id"], until=state_with("node_lost"))
    assert trio.current_time() - lost_at >= config.node_grace - 1e-9  # float sums on the virtual clock
    assert (await mt.task(task["id"]))["state"] == "queued"


async def test_ack_deadline_on_the_virtual_clock(virtual_clock, slow_orchestrator):
    mt, config = slow_orchestrator
    node = ScriptedNode(mt.gateway, mt.node_secret)
    await node.connect()
    async with trio.open_nursery() as n:
        n.start_soon(keep_alive, node, config.heartbeat_interval)
        task = await mt.submit("x")
        await node.expect(m.Assign)
        assigned_at = trio.current_time()
        await mt.events(task["id"], until=state_with("not_acknowledged"))
        assert trio.current_time() - assigned_at >= config.assign_timeout - 1e-9
        n.cancel_scope.cancel()


async def test_cancel_deadline_on_the_virtual_clock(virtual_clock, slow_orchestrator):
    mt, config = slow_orchestrator
    node = ScriptedNode(mt.gateway, mt.node_secret)
    await node.connect()
    async with trio.open_nursery() as n:
        n.start_soon(keep_alive, node, config.heartbeat_interval)
        task = await running_task(mt, node)
        r = await mt.client.post(f"/v1/tasks/{task['id']}/cancel")
        assert r.status_code == 202 and r.json()["state"] == "running"  # sent to the node...
        asked_at = trio.current_time()
        cancel = await node.expect(m.Cancel)
        assert cancel.task_id == task["id"]
        final = await mt.finish(task["id"], timeout=3600)  # ...which never confirms
        assert trio.current_time() - asked_at >= config.assign_timeout - 1e-9
        assert final["state"] == "cancelled" and "did not confirm" in final["message"]
        n.cancel_scope.cancel()


@pytest.mark.slow
async def test_task_timeout_on_the_virtual_clock(virtual_clock, slow_orchestrator):
    mt, config = slow_orchestrator
    node = ScriptedNode(mt.gateway, mt.node_secret)
    await node.connect()
    async with trio.open_nursery() as n:
        n.start_soon(keep_alive, node, config.heartbeat_interval)
        task = await running_task(mt, node, timeout=60)
        started = trio.current_time()
        cancel = await node.expect(m.Cancel, timeout=3600)  # the node never reports an end
        assert cancel.task_id == task["id"] and cancel.reason == "timed out"
        assert trio.current_time() - started >= 60 + config.node_timeout
        final = await mt.finish(task["id"], timeout=60)
        assert final["state"] == "timed_out" and final["reason"] == "timeout"
        n.cancel_scope.cancel()


# ----------------------------------------------------------------------------- drain, rejections


async def test_drain_and_undrain_a_node(orchestrator):
    mt = orchestrator
    node = ScriptedNode(mt.gateway, mt.node_secret)
    await node.connect()
    r = await mt.client.post("/v1/nodes/scripted/drain")  # by name
    assert r.status_code == 200 and r.json()["draining"] and r.json()["drain"] == "administrator"
    await node.expect(m.Drain)
    task = await mt.submit("x")
    listed = (await mt.client.get("/v1/nodes")).json()["nodes"]
    assert listed[0]["draining"] is True

    from marathon.cli.nodes import node_line

    assert "up, draining" in node_line(listed[0])
    # a drained node is told again when it reconnects, and gets nothing meanwhile
    await node.close()
    await node.connect()
    await node.expect(m.Drain)
    assert (await mt.task(task["id"]))["state"] == "queued"

    r = await mt.client.post(f"/v1/nodes/{node.node_id}/undrain")  # by id
    assert r.status_code == 200 and not r.json()["draining"]
    await node.expect(m.Undrain)
    assign = await node.expect(m.Assign)
    assert assign.task.task_id == task["id"]
    assert (await mt.client.post("/v1/nodes/nope/drain")).status_code == 404


async def test_only_administrators_drain(orchestrator):
    mt = orchestrator
    import httpx

    accounts = mt.info.accounts
    user = await accounts.register("user@example.com", "password123", by_admin=True)
    from marathon.orchestrator.auth import Principal

    key, _ = await accounts.create_key(Principal(user.id, user.email, False), "t")
    async with httpx.AsyncClient(base_url=mt.url, headers={"Authorization": f"Bearer {key}"}) as client:
        r = await client.post("/v1/nodes/anything/drain")
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"


async def test_a_node_that_says_it_drains_gets_no_tasks(orchestrator):
    mt = orchestrator
    node = ScriptedNode(mt.gateway, mt.node_secret)
    await node.connect()
    await node.fs.send(m.Heartbeat(capacity=m.Capacity(slots=1, draining=True)))
    await node.expect(m.HeartbeatAck)  # its capacity is the session's now
    assert (await mt.client.get("/v1/nodes")).json()["nodes"][0]["draining"]
    task = await mt.submit("x")
    await node.fs.send(m.Heartbeat(capacity=m.Capacity(slots=1)))
    assign = await node.expect(m.Assign)  # once it stops draining, it gets the task
    assert assign.task.task_id == task["id"]


async def test_a_rejecting_node_does_not_fail_tasks_a_healthy_node_can_run(orchestrator):
    mt = orchestrator
    bad = ScriptedNode(mt.gateway, mt.node_secret, node_id="n-bad")
    good = ScriptedNode(mt.gateway, mt.node_secret, node_id="n-good")
    await bad.connect(warm=1)  # a warm sandbox: the scheduler prefers it
    await good.connect()
    for _ in range(3):  # more tasks than max_attempts: each would fail if the bad node got it every time
        task = await mt.submit("x")
        assign = await bad.expect(m.Assign)
        assert assign.task.task_id == task["id"]
        await bad.fs.send(m.Rejected(task_id=task["id"], attempt=assign.task.attempt, reason="broken"))
        assign = await good.expect(m.Assign)
        assert assign.task.task_id == task["id"] and assign.task.attempt == 2
        await good.fs.send(m.Accepted(task_id=task["id"], attempt=2))
        await good.event(task["id"], 2, m.StateEvent(state="running"))
        await good.result(task["id"], 2, "succeeded")
        final = await mt.finish(task["id"])
        assert final["state"] == "succeeded" and final["node_id"] == "n-good"


async def test_a_store_error_during_the_handshake_leaves_no_session_behind(orchestrator, monkeypatch):
    """The store fails while a node is being welcomed: the connection ends, and no session
    stays behind looking connected (tasks sent there would never be acknowledged)."""
    mt = orchestrator
    store = mt.info.tasks.store
    real = store.list_tasks

    async def down(*a, **kw):
        from marathon.errors import StoreUnavailable

        raise StoreUnavailable("postgresql: the server is restarting")

    monkeypatch.setattr(store, "list_tasks", down)
    node = ScriptedNode(mt.gateway, mt.node_secret)
    await node.connect()
    error = await node.expect(m.Error)
    assert error.code == "internal"
    assert mt.info.nodes.connected() == []
    monkeypatch.setattr(store, "list_tasks", real)
    await node.connect()  # the store is back: a session that works
    task = await mt.submit("x")
    assert (await node.expect(m.Assign)).task.task_id == task["id"]
