"""Node gateway: nodes dial in over TCP, prove the shared secret, then exchange
heartbeats, assignments, events and results.  One bad node never affects another."""

from __future__ import annotations

import logging
import secrets
import time

import trio

from marathon import __version__
from marathon.config import Config
from marathon.errors import AuthError, ConnectionClosed, ProtocolError
from marathon.orchestrator.lifecycle import State
from marathon.orchestrator.nodes import NodeRegistry, NodeSession
from marathon.orchestrator.tasks import TaskService
from marathon.protocol import FramedStream
from marathon.protocol import messages as m
from marathon.protocol.auth import verify_node_mac
from marathon.protocol.transports import listener_address, open_listeners

log = logging.getLogger("marathon.gateway")


def _peer(stream) -> str:
    try:
        addr = stream.socket.getpeername()
        return f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr or "local")
    except Exception:
        return "?"


class Gateway:
    def __init__(self, config: Config, tasks: TaskService, nodes: NodeRegistry, secret: str):
        self.config, self.tasks, self.nodes, self.secret = config, tasks, nodes, secret
        self.cancel_deadlines: dict[str, float] = {}

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await open_listeners(self.config.gateway_listen)
        addrs = [listener_address(lis) for lis in listeners]
        log.info("node gateway listening on %s", ", ".join(addrs))
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self.handle, listeners)
            task_status.started(addrs)

    async def handle(self, stream: trio.abc.Stream) -> None:
        peer = _peer(stream)
        fs = FramedStream(stream, m.GatewayMessage)
        session: NodeSession | None = None
        try:
            session = await self._handshake(fs, peer)
            await self._loop(fs, session)
        except AuthError as exc:
            log.warning("node from %s refused: %s", peer, exc)
            await fs.send_error(AuthError.code, str(exc))
        except ProtocolError as exc:
            log.warning("closing node connection from %s: %s", peer, exc)
            await fs.send_error(exc.code, str(exc))
        except ConnectionClosed as exc:
            log.info("node connection from %s closed: %s", peer, exc)
        except trio.TooSlowError:
            log.warning("node connection from %s timed out", peer)
            await fs.send_error("timeout", "no heartbeat within node_timeout")
        except Exception as exc:  # a store error or a bug ends this node's connection, not the orchestrator
            log.exception("node connection from %s failed", peer)
            await fs.send_error("internal", f"orchestrator error: {type(exc).__name__}")
        finally:
            if session is not None and self.nodes.get(session.node_id) is session:
                self.nodes.detach(session)
                log.warning("node %s (%s) disconnected; its tasks wait %.0fs for it", session.name, session.node_id, self.config.node_grace)
                await self.tasks.bus.notify("scheduler")
            await fs.aclose()

    async def _handshake(self, fs: FramedStream, peer: str) -> NodeSession:
        hello = await fs.handshake("orchestrator", __version__, initiator=False, timeout=self.config.connect_timeout)
        if hello.role != "node":
            raise ProtocolError(f"expected a node, got role {hello.role!r}")
        nonce = secrets.token_bytes(32)
        await fs.send(m.Challenge(nonce=nonce))
        with trio.fail_after(self.config.connect_timeout):
            auth = await fs.receive()
        if not isinstance(auth, m.Authenticate):
            raise ProtocolError(f"expected authenticate, got {type(auth).__name__}")
        if not auth.node_id or len(auth.node_id) > 128:
            raise ProtocolError("bad node id")
        if not verify_node_mac(self.secret, nonce, auth.node_id, auth.mac):
            raise AuthError(f"node {auth.name!r} ({auth.node_id}) presented a wrong node secret")
        session = NodeSession(auth.node_id, auth.name, fs, auth.capacity, peer=peer)
        old = self.nodes.attach(session)
        if old is not None and old.stream is not None and old.stream is not fs:
            await old.stream.aclose()
        await fs.send(m.Welcome(node_id=auth.node_id, heartbeat_interval=self.config.heartbeat_interval))
        log.info("node %s (%s) connected from %s: %d slots, backend %s", auth.name, auth.node_id, peer, auth.capacity.slots, auth.capacity.backend)
        await self._reconcile(session, set(auth.running))
        await self.tasks.bus.notify("scheduler")
        return session

    async def _reconcile(self, session: NodeSession, running: set[str]) -> None:
        """After a (re)connect: keep what the node still runs, cancel what it should not."""
        for task_id in running:
            rec = await self.tasks.store.get_task(task_id)
            if rec is None or rec.node_id != session.node_id or rec.state not in (State.STARTING, State.RUNNING):
                await session.send(m.Cancel(task_id=task_id, reason="no longer assigned to this node"))
            else:
                session.assigned[task_id] = None
        for task_id in list(session.assigned):
            if task_id not in running:
                session.assigned.pop(task_id)
                rec = await self.tasks.store.get_task(task_id)
                if rec is not None and rec.node_id == session.node_id and rec.state in (State.SCHEDULED, State.STARTING, State.RUNNING):
                    await self.tasks.requeue_or_fail(rec, "node_lost", f"node {session.name} restarted without the task")

    async def _loop(self, fs: FramedStream, session: NodeSession) -> None:
        while True:
            with trio.fail_after(self.config.node_timeout):
                msg = await fs.receive()
            session.last_seen = time.time()
            if isinstance(msg, m.TaskEvent):
                batch = [msg]
                # take whatever else is already buffered, to write it in one transaction
                while (more := fs.receive_buffered()) is not None:
                    if not isinstance(more, m.TaskEvent):
                        await self._record(session, batch)
                        batch = []
                        await self._handle(session, more)
                        break
                    batch.append(more)
                if batch:
                    await self._record(session, batch)
            else:
                await self._handle(session, msg)

    async def _record(self, session: NodeSession, batch: list[m.TaskEvent]) -> None:
        await self.tasks.record_events(session.node_id, batch)
        session.acked = max(session.acked, batch[-1].node_seq)

    async def _handle(self, session: NodeSession, msg) -> None:
        nid = session.node_id
        if isinstance(msg, m.Heartbeat):
            session.capacity = msg.capacity
            await session.send(m.HeartbeatAck(acked=session.acked))
        elif isinstance(msg, m.Accepted):
            if msg.task_id in session.assigned:
                session.assigned[msg.task_id] = None
            await self.tasks.move(msg.task_id, State.STARTING, expect={State.SCHEDULED}, expect_node=nid)
        elif isinstance(msg, m.Rejected):
            session.assigned.pop(msg.task_id, None)
            rec = await self.tasks.store.get_task(msg.task_id)
            if rec is not None and rec.node_id == nid and rec.state == State.SCHEDULED:
                await self.tasks.requeue_or_fail(rec, "node_rejected", f"node {session.name} rejected the task: {msg.reason}")
        elif isinstance(msg, m.TaskBlob):
            await self.tasks.record_blob(nid, msg)
            session.acked = max(session.acked, msg.node_seq)
        elif isinstance(msg, m.TaskResult):
            session.assigned.pop(msg.task_id, None)
            self.cancel_deadlines.pop(msg.task_id, None)
            await self.tasks.record_outcome(nid, msg)
            session.acked = max(session.acked, msg.node_seq)
        elif isinstance(msg, m.Error):
            raise ConnectionClosed(f"node says {msg.code}: {msg.message}")
        else:
            raise ProtocolError(f"unexpected {type(msg).__name__} from a node")

    async def send_cancel(self, node_id: str, task_id: str) -> bool:
        session = self.nodes.get(node_id)
        if session is None or not await session.send(m.Cancel(task_id=task_id, reason="cancelled by user")):
            return False
        self.cancel_deadlines[task_id] = time.time() + self.config.assign_timeout
        return True
