"""Node gateway: nodes dial in over TCP, prove who they are (their own enrolled key, a join
token, or the shared secret: ``identity``), then exchange heartbeats, assignments, events and
results.  One bad node never affects another.

Before a node has authenticated, what it can make us hold is small: frames of at most
PREAUTH_MAX_FRAME, ``handshake_timeout`` to get through, and at most
``gateway_max_unauthenticated`` such connections at once (more are closed at once)."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from typing import assert_never

import trio

from marathon import __version__
from marathon.config import Config
from marathon.errors import AuthError, ConnectionClosed, ProtocolError, StoreError, describe, leaves
from marathon.logs import log_context
from marathon.orchestrator.ingest import Ingest
from marathon.orchestrator.lifecycle import TERMINAL, State
from marathon.orchestrator.nodes import NodeRegistry, NodeSession
from marathon.orchestrator.reconcile import Adopt, Fail, Keep, NodeAction, Requeue, SendCancel, reconcile_node
from marathon.orchestrator.tasks import CANCEL_TOPIC, SCHED_TOPIC, TaskService, active_task
from marathon.orchestrator.uploads import SessionUploads, clear_uploads
from marathon.protocol import messages as m
from marathon.orchestrator.identity import Admission, NodeIdentities, capped
from marathon.protocol.auth import orchestrator_mac
from marathon.protocol.framing import DEFAULT_MAX_FRAME, FramedStream
from marathon.protocol.transports import listener_address, open_listeners, server_tls
from marathon.store import TaskRecord, artifacts

log = logging.getLogger("marathon.gateway")
SEND_TIMEOUT = 60.0  # a node that reads nothing for this long is dropped (it reconnects)
PREAUTH_MAX_FRAME = 64 * 1024  # largest frame from a node that has not authenticated yet
REFUSAL_LOG_INTERVAL = 10.0  # connections over the cap are logged at most this often


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
        self.identities = NodeIdentities(tasks.store, secret, default_max_slots=config.node_max_slots)
        self.ingest = Ingest(tasks)
        self.unauthenticated = 0  # connections still in their handshake
        self.refused_over_cap = 0
        self._refusal_logged = -REFUSAL_LOG_INTERVAL
        self.cancel_deadlines: dict[str, float] = {}  # task id -> when a cancel is taken as done (trio clock)
        self.nodes_changed: Callable[[], None] = lambda: None  # a node came, went, or its capacity changed
        self._nursery: trio.Nursery | None = None

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        tls = None
        if self.config.gateway_listen.startswith("tls:"):
            tls = server_tls(self.config.gateway_tls_cert, self.config.gateway_tls_key)
        await trio.to_thread.run_sync(clear_uploads, self.config.data_dir)
        listeners = await open_listeners(self.config.gateway_listen, tls=tls)
        addrs = [listener_address(lis) for lis in listeners]
        log.info("node gateway listening on %s", ", ".join(addrs))
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(trio.serve_listeners, self.handle, listeners)
            await nursery.start(self._stop_what_ended_elsewhere)
            task_status.started(addrs)

    async def deliver(self, session: NodeSession, assign: m.Assign, bundle: artifacts.Manifest | bytes | None) -> None:
        """Send an assignment.  A resumed task's last bundle goes first, read from the store and
        queued at the node's pace (``send_chunk``) in a task of its own: a large one neither
        holds the scheduler nor sits whole in memory."""
        if bundle is None:
            await session.send(assign)
        elif self._nursery is None:
            await self._send_with_bundle(session, assign, bundle)
        else:
            self._nursery.start_soon(self._send_with_bundle, session, assign, bundle)

    async def _send_with_bundle(
        self, session: NodeSession, assign: m.Assign, bundle: artifacts.Manifest | bytes
    ) -> None:
        task_id = assign.task.task_id
        try:
            async for chunk in self.tasks.bundle_chunks(task_id, bundle):
                if not await session.send_chunk(chunk):
                    return  # gone: the acknowledgement deadline gives the task back
        except StoreError as exc:
            log.warning("task %s: its bundle could not be read for node %s: %s", task_id, session.name, exc)
            return
        if session.assigned.get(task_id) is not None:  # the deadline counts from the assignment itself
            session.assigned[task_id] = trio.current_time() + self.config.assign_timeout
        await session.send(assign)

    async def _stop_what_ended_elsewhere(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Another replica cancelled (or otherwise ended) a task that runs on a node connected
        here: tell the node to stop that attempt.  Woken by CANCEL_TOPIC; looks at the store."""
        async with self.tasks.bus.watch(CANCEL_TOPIC) as watch:
            task_status.started()
            while True:
                watch.arm()
                for session in self.nodes.connected():
                    for task_id in list(session.assigned):
                        try:
                            rec = await self.tasks.store.get_task(task_id)
                        except StoreError:
                            break
                        if rec is None or rec.state in TERMINAL or rec.node_id != session.node_id:
                            session.assigned.pop(task_id, None)
                            attempt = rec.attempt if rec is not None else 0
                            await session.send(m.Cancel(task_id=task_id, attempt=attempt, reason="cancelled"))
                await watch.wait()

    async def handle(self, stream: trio.abc.Stream) -> None:
        if self.unauthenticated >= self.config.gateway_max_unauthenticated:
            self.refused_over_cap += 1
            if trio.current_time() - self._refusal_logged >= REFUSAL_LOG_INTERVAL:
                self._refusal_logged = trio.current_time()
                log.warning(
                    "node gateway: %d connections are authenticating already (gateway_max_unauthenticated): "
                    "closing new ones (%d so far)",
                    self.unauthenticated,
                    self.refused_over_cap,
                )
            await trio.aclose_forcefully(stream)
            return
        self.unauthenticated += 1
        authenticating = True
        peer = _peer(stream)
        fs: FramedStream[m.FromNode] = FramedStream(
            stream, m.FromNode, send_timeout=SEND_TIMEOUT, max_frame=PREAUTH_MAX_FRAME
        )
        session: NodeSession | None = None
        try:
            with trio.fail_after(self.config.handshake_timeout):
                auth, admission = await self._authenticate(fs)
            self.unauthenticated -= 1
            authenticating = False
            fs.max_frame = DEFAULT_MAX_FRAME
            session = await self._attach(fs, peer, auth, admission)
            with log_context(node_id=session.node_id):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(session.write_queued)
                    await self._loop(fs, session)
        # every error is handled, whichever task of the connection raised it (the first is told to the node)
        except* AuthError as group:
            log.warning("node from %s refused: %s", peer, describe(group))
            await fs.send_error(AuthError.code, describe(group))
        except* ProtocolError as group:
            log.warning("closing node connection from %s: %s", peer, describe(group))
            await fs.send_error(getattr(leaves(group)[0], "code", ProtocolError.code), describe(group))
        except* ConnectionClosed as group:
            log.info("node connection from %s closed: %s", peer, describe(group))
        except* trio.TooSlowError:
            log.warning("node connection from %s timed out", peer)
            await fs.send_error(
                "timeout", "no heartbeat within node_timeout" if session else "no handshake within handshake_timeout"
            )
        except* Exception as group:  # a store error or a bug ends this node's connection, not the orchestrator
            log.error("node connection from %s failed", peer, exc_info=group)
            await fs.send_error("internal", f"orchestrator error: {type(leaves(group)[0]).__name__}")
        finally:
            if authenticating:
                self.unauthenticated -= 1
            if session is not None:
                session.uploads.close()  # what it left half-sent: it sends it again from the start
            if session is not None and self.nodes.get(session.node_id) is session:
                self.nodes.detach(session)
                self.nodes_changed()
                if session.revoked:  # as a lost node whose grace is over: its tasks are given back now
                    session.lost_since = trio.current_time() - self.config.node_grace
                log.warning(
                    "node %s (%s) disconnected; its tasks wait %.0fs for it",
                    session.name,
                    session.node_id,
                    self.config.node_grace,
                )
                await self.tasks.bus.notify(SCHED_TOPIC)
            await fs.aclose()

    async def _authenticate(self, fs: FramedStream[m.FromNode]) -> tuple[m.Authenticate, Admission]:
        """Hello, Challenge, Authenticate: who the node is (``identity.NodeIdentities.admit``)."""
        hello = await fs.handshake("orchestrator", __version__, initiator=False, timeout=self.config.connect_timeout)
        if hello.role != "node":
            raise ProtocolError(f"expected a node, got role {hello.role!r}")
        nonce = secrets.token_bytes(32)
        await fs.send(m.Challenge(nonce=nonce))
        auth = await fs.receive()
        if not isinstance(auth, m.Authenticate):
            raise ProtocolError(f"expected authenticate, got {type(auth).__name__}")
        if not auth.node_id or len(auth.node_id) > 128:
            raise ProtocolError("bad node id")
        return auth, await self.identities.admit(auth, nonce)

    async def _attach(
        self, fs: FramedStream[m.FromNode], peer: str, auth: m.Authenticate, admission: Admission
    ) -> NodeSession:
        capacity = capped(auth.capacity, admission.max_slots)
        session = NodeSession(auth.node_id, auth.name, fs, capacity, peer=peer, max_slots=admission.max_slots)
        session.uploads = SessionUploads(self.config.data_dir, self.config.max_artifact)
        old = self.nodes.attach(session)
        self.nodes_changed()
        try:  # attached: until the handshake is through, a failure must detach it again
            if old is not None and old.stream is not None and old.stream is not fs:
                await old.stream.aclose()
            await fs.send(
                m.Welcome(
                    node_id=auth.node_id,
                    heartbeat_interval=self.config.heartbeat_interval,
                    mac=orchestrator_mac(admission.proof_key, auth.nonce, auth.node_id),
                    server_key=admission.server_key,
                    max_slots=admission.max_slots or 0,
                )
            )
            log.info(
                "node %s (%s) connected from %s (%s): %d slots%s, backend %s%s",
                auth.name,
                auth.node_id,
                peer,
                {"secret": "node secret", "credential": "its own key", "join": "enrolled now with a join token"}[
                    admission.mode
                ],
                capacity.slots,
                f" (claimed {auth.capacity.slots}, enrolled for at most {admission.max_slots})"
                if capacity.slots != auth.capacity.slots
                else "",
                auth.capacity.backend,
                "; draining" if session.draining else "",
            )
            if session.drain_requested:  # an administrator drained it before it (re)connected
                await session.send(m.Drain())
            await self._reconcile(session, auth.running)
            await self.tasks.bus.notify(SCHED_TOPIC)
        except BaseException:
            if self.nodes.get(session.node_id) is session:  # never leave a session no one serves
                self.nodes.detach(session)
                self.nodes_changed()
            raise
        return session

    async def _reconcile(self, session: NodeSession, running: dict[str, int]) -> None:
        """After a (re)connect — of the node, or of us after a restart — make the store and the
        node agree (``reconcile.reconcile_node`` decides)."""
        records: dict[str, TaskRecord | None] = {}
        for task_id in running:
            records[task_id] = await self.tasks.store.get_task(task_id)
        active, _ = await self.tasks.store.list_tasks(
            states=[State.SCHEDULED, State.STARTING, State.RUNNING], limit=100_000, oldest_first=True
        )
        here = {r.id: r for r in active if r.node_id == session.node_id}
        actions = reconcile_node(
            session.node_id,
            session.name,
            running,
            {tid: active_task(rec) if rec is not None else None for tid, rec in records.items()},
            [active_task(r) for r in here.values()],
            self.config.max_attempts,
        )
        for action in actions:
            await self._execute(session, action, here)

    async def _execute(self, session: NodeSession, action: NodeAction, here: dict[str, TaskRecord]) -> None:
        match action:
            case Adopt(task_id=task_id):
                await self.tasks.move(task_id, State.STARTING, expect={State.SCHEDULED}, expect_node=session.node_id)
                session.assigned[task_id] = None
            case Keep(task_id=task_id):
                session.assigned[task_id] = None
            case SendCancel(task_id=task_id, attempt=attempt, reason=reason):
                await session.send(m.Cancel(task_id=task_id, attempt=attempt, reason=reason))
            case Requeue() | Fail():
                session.assigned.pop(action.task_id, None)
                await self.tasks.give_back(here[action.task_id], action)
            case _:
                assert_never(action)

    async def _loop(self, fs: FramedStream[m.FromNode], session: NodeSession) -> None:
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
        await self.ingest.record_events(session.node_id, batch)
        session.acked = max(session.acked, batch[-1].node_seq)

    def ack_point(self, session: NodeSession) -> int:
        """What the node may forget: everything processed, but never a chunk of an artifact that
        is not stored whole yet (after a restart it must be sent again from its first chunk)."""
        floor = min(session.open_blobs.values(), default=None)
        return session.acked if floor is None else min(session.acked, floor - 1)

    async def _handle(self, session: NodeSession, msg: m.FromNode) -> None:
        nid = session.node_id
        match msg:
            case m.Heartbeat():
                before = session.view()
                session.capacity = capped(msg.capacity, session.max_slots)
                await session.send(m.HeartbeatAck(acked=self.ack_point(session)))
                if session.view() != before:  # a slot freed, a sandbox warmed, a drain began or ended
                    self.nodes_changed()
                    if session.draining != before.draining:
                        log.info("node %s %s", session.name, "drains" if session.draining else "takes tasks again")
                    await self.tasks.bus.notify(SCHED_TOPIC)
            case m.TaskEvent():
                await self._record(session, [msg])
            case m.Accepted():
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
            case m.Rejected():
                session.assigned.pop(msg.task_id, None)
                rec = await self.tasks.store.get_task(msg.task_id)
                if (
                    rec is not None
                    and rec.node_id == nid
                    and rec.attempt == msg.attempt
                    and rec.state == State.SCHEDULED
                ):
                    self.nodes.avoid(msg.task_id, nid)  # while another node can take it
                    # a node with no room (its capacity had not reached us yet, or another replica
                    # filled it) costs the task no attempt
                    await self.tasks.requeue_or_fail(
                        rec, "node_rejected", f"node {session.name} rejected the task: {msg.reason}", free=msg.busy
                    )
            case m.TaskBlob():
                key = (msg.task_id, msg.name)
                await self.ingest.record_blob(nid, session.uploads, msg)
                if (msg.task_id, msg.attempt, msg.name) in session.uploads.open:
                    session.open_blobs.setdefault(key, msg.node_seq)  # not acknowledged before it is stored
                else:  # stored, refused or dropped
                    session.open_blobs.pop(key, None)
                session.acked = max(session.acked, msg.node_seq)
            case m.TaskResult():
                session.assigned.pop(msg.task_id, None)
                self.cancel_deadlines.pop(msg.task_id, None)
                self.nodes.task_ended(msg.task_id)
                await self.ingest.record_outcome(nid, msg)
                session.acked = max(session.acked, msg.node_seq)
            case m.Error():
                raise ConnectionClosed(f"node says {msg.code}: {msg.message}")
            case m.Hello() | m.Authenticate():
                raise ProtocolError(f"unexpected {type(msg).__name__} from a node")
            case _:
                assert_never(msg)

    async def send_cancel(self, node_id: str, task_id: str) -> bool:
        session = self.nodes.get(node_id)
        if session is None or not await session.send(m.Cancel(task_id=task_id, reason="cancelled by user")):
            return False
        self.cancel_deadlines[task_id] = trio.current_time() + self.config.assign_timeout
        await self.tasks.bus.notify(SCHED_TOPIC)  # the scheduler wakes at the new deadline
        return True

    async def revoke(self, node_id: str) -> bool:
        """An administrator revokes a node's credential: it is refused from now on, its
        connection is cut, and its tasks are given back as a lost node's (no grace).  False
        when the node had no credential to revoke."""
        revoked = await self.identities.revoke(node_id)
        session = self.nodes.get(node_id)
        if session is not None:
            session.revoked = True
            if session.connected and session.stream is not None:
                await session.stream.send_error(AuthError.code, "this node was revoked by an administrator")
                await session.stream.aclose()  # its reader ends; the handler detaches it
            elif session.lost_since is not None:
                session.lost_since = min(session.lost_since, trio.current_time() - self.config.node_grace)
        log.warning("node %s revoked by an administrator", node_id)
        await self.tasks.bus.notify(SCHED_TOPIC)
        return revoked

    async def set_drain(self, node_id: str, draining: bool) -> None:
        """An administrator drains a node (it takes no new tasks; what runs there goes on) or
        undrains it.  Kept across the node's reconnects."""
        self.nodes.set_drain(node_id, draining)
        session = self.nodes.get(node_id)
        if session is not None and session.connected:
            await session.send(m.Drain() if draining else m.Undrain())
        log.info("node %s %s by an administrator", node_id, "drained" if draining else "undrained")
        await self.tasks.bus.notify(SCHED_TOPIC)
