"""The node gateway against a node we script message by message: attempts, acknowledgements,
reconnects and late answers."""

from __future__ import annotations

import os

import pytest
import trio

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
        self.fs: FramedStream | None = None

    async def connect(self, running: dict[str, int] | None = None, slots: int = 1) -> m.Welcome:
        self.fs = FramedStream(await open_stream(self.gateway), m.GatewayMessage)
        await self.fs.handshake("node", "test", initiator=True, timeout=5)
        challenge = await self.fs.receive()
        nonce = os.urandom(32)
        await self.fs.send(
            m.Authenticate(
                node_id=self.node_id,
                name="scripted",
                mac=node_mac(self.secret, challenge.nonce, self.node_id),
                capacity=m.Capacity(slots=slots),
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
        fs = FramedStream(stream, m.GatewayMessage)
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
