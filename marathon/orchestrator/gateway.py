"""Node gateway: nodes dial in over TCP, prove the shared secret, then exchange
heartbeats, assignments, events and results.  One bad node never affects another."""

from __future__ import annotations

import logging
import secrets
import time

import trio

from marathon import __version__
from marathon.config import Config
from marathon.errors import AuthError, ConnectionClosed, ProtocolError, single_errors
from marathon.logs import log_context
from marathon.orchestrator.lifecycle import TERMINAL, State
from marathon.orchestrator.nodes import NodeRegistry, NodeSession
from marathon.orchestrator.tasks import TaskService
from marathon.protocol.framing import FramedStream
from marathon.protocol import messages as m
from marathon.protocol.auth import orchestrator_mac, verify_node_mac
from marathon.protocol.transports import listener_address, open_listeners, server_tls

log = logging.getLogger("marathon.gateway")
SEND_TIMEOUT = 60.0  # a node that reads nothing for this long is dropped (it reconnects)


def _peer(stream) -> str:
    stream = getattr(stream, "transport_stream", stream)  # under TLS
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
        tls = None
        if self.config.gateway_listen.startswith("tls:"):
            tls = server_tls(self.config.gateway_tls_cert, self.config.gateway_tls_key)
        listeners = await open_listeners(self.config.gateway_listen, tls=tls)
        addrs = [listener_address(lis) for lis in listeners]
        log.info("node gateway listening on %s", ", ".join(addrs))
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self.handle, listeners)
            task_status.started(addrs)

    async def handle(self, stream: trio.abc.Stream) -> None:
        peer = _peer(stream)
        fs = FramedStream(stream, m.GatewayMessage, send_timeout=SEND_TIMEOUT)
        session: NodeSession | None = None
        try:
            session = await self._handshake(fs, peer)
            with log_context(node_id=session.node_id), single_errors():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(session.write_queued)
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
                log.warning(
                    "node %s (%s) disconnected; its tasks wait %.0fs for it",
                    session.name,
                    session.node_id,
                    self.config.node_grace,
                )
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
        await fs.send(
            m.Welcome(
                node_id=auth.node_id,
                heartbeat_interval=self.config.heartbeat_interval,
                mac=orchestrator_mac(self.secret, auth.nonce, auth.node_id),
            )
        )
        log.info(
            "node %s (%s) connected from %s: %d slots, backend %s",
            auth.name,
            auth.node_id,
            peer,
            auth.capacity.slots,
            auth.capacity.backend,
        )
        await self._reconcile(session, auth.running)
        await self.tasks.bus.notify("scheduler")
        return session

    async def _reconcile(self, session: NodeSession, running: dict[str, int]) -> None:
        """After a (re)connect — of the node, or of us after a restart — make the store and the
        node agree: what the node runs of its current assignments it keeps (an assignment whose
        acknowledgement was lost counts as accepted); what it runs otherwise is cancelled; what
        the store has on this node and the node does not run goes back to the queue."""
        for task_id, attempt in running.items():
            rec = await self.tasks.store.get_task(task_id)
            ours = rec is not None and rec.node_id == session.node_id and rec.attempt == attempt
            if ours and rec.state == State.SCHEDULED:
                await self.tasks.move(task_id, State.STARTING, expect={State.SCHEDULED}, expect_node=session.node_id)
                session.assigned[task_id] = None
            elif ours and rec.state in (State.STARTING, State.RUNNING):
                session.assigned[task_id] = None
            elif not ours or rec.state not in TERMINAL:
                await session.send(m.Cancel(task_id=task_id, attempt=attempt, reason="no longer assigned to this node"))
        active, _ = await self.tasks.store.list_tasks(
            states=[State.SCHEDULED, State.STARTING, State.RUNNING], limit=100_000, oldest_first=True
        )
        for rec in active:
            if rec.node_id == session.node_id and rec.id not in running:
                session.assigned.pop(rec.id, None)
                await self.tasks.requeue_or_fail(rec, "node_lost", f"node {session.name} came back without the task")

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

    def ack_point(self, session: NodeSession) -> int:
        """What the node may forget: everything processed, but never a chunk of an artifact that
        is not stored whole yet (after a restart it must be sent again from its first chunk)."""
        floor = min(session.open_blobs.values(), default=None)
        return session.acked if floor is None else min(session.acked, floor - 1)

    async def _handle(self, session: NodeSession, msg) -> None:
        nid = session.node_id
        if isinstance(msg, m.Heartbeat):
            session.capacity = msg.capacity
            await session.send(m.HeartbeatAck(acked=self.ack_point(session)))
        elif isinstance(msg, m.Accepted):
            moved = await self.tasks.move(
                msg.task_id, State.STARTING, expect={State.SCHEDULED}, expect_node=nid, expect_attempt=msg.attempt
            )
            rec = moved or await self.tasks.store.get_task(msg.task_id)
            if (
                rec is not None
                and rec.node_id == nid
                and rec.attempt == msg.attempt
                and rec.state in (State.STARTING, State.RUNNING)
            ):
                session.assigned[msg.task_id] = None
            else:  # too late: the task went back to the queue (or elsewhere) meanwhile
                await session.send(m.Cancel(task_id=msg.task_id, attempt=msg.attempt, reason="assignment expired"))
        elif isinstance(msg, m.Rejected):
            session.assigned.pop(msg.task_id, None)
            rec = await self.tasks.store.get_task(msg.task_id)
            if rec is not None and rec.node_id == nid and rec.attempt == msg.attempt and rec.state == State.SCHEDULED:
                await self.tasks.requeue_or_fail(
                    rec, "node_rejected", f"node {session.name} rejected the task: {msg.reason}"
                )
        elif isinstance(msg, m.TaskBlob):
            key = (msg.task_id, msg.name)
            if msg.offset == 0:
                session.open_blobs[key] = msg.node_seq
            if await self.tasks.record_blob(nid, msg) or msg.last:
                session.open_blobs.pop(key, None)
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
