"""The node role: dial the orchestrator, take assignments, run each task in its own sandbox.

Everything the node must not lose (task events and results) goes through an outbox with one
sequence counter; the orchestrator acknowledges what it has processed in every heartbeat
reply, and whatever is unacknowledged is sent again after a reconnect (duplicates are
dropped on the other side by that sequence number).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import os
import random
import re
import secrets
import shutil
from collections.abc import Callable
from typing import assert_never

import msgspec

import trio

from marathon import __version__
from marathon.config import Config
from marathon.errors import AuthError, ConfigError, ConnectionClosed, ProtocolError, describe
from marathon.logs import log_context
from marathon.node.disk import reap_mounts
from marathon.node.git import MirrorCache
from marathon.node.git import set_home as set_git_home
from marathon.node.identity import (
    NodeCredential,
    check_welcome,
    credential_path,
    load_credential,
    load_node_id,
    prove,
    save_credential,
)
from marathon.node.metrics import NodeMetrics
from marathon.node.proxy import MeteringProxy
from marathon.node.sandbox import SandboxBackend
from marathon.node.pool import WarmPool
from marathon.node.supervisor import TaskHandle, connect_agent, supervise
from marathon.protocol.framing import FramedStream
from marathon.protocol import messages as m
from marathon.protocol.auth import new_private_key
from marathon.protocol.blobs import BlobWriter, chunks
from marathon.protocol.transports import client_tls, open_stream

log = logging.getLogger("marathon.node")
ATTEMPTS_KEPT = 100_000  # tasks whose newest attempt a node remembers, to refuse older ones

OUTBOX_LIMIT = 200_000
SEND_TIMEOUT = 60.0  # an orchestrator that reads nothing for this long is gone
TASK_ID = re.compile(r"[0-9a-f]{12}")
BACKOFF_MIN, BACKOFF_MAX, BACKOFF_REFUSED = 0.1, 5.0, 5.0  # reconnect delays (seconds, before jitter)
STOP_BOUND = 60.0  # after a shutdown's drain, how long the stopped tasks get to end and clean up
HANDOVER_TIMEOUT = 10.0  # and how long their results get to reach the orchestrator
CLOSE_TIMEOUT = 30.0  # closing the proxy and the backend at the end


Outgoing = m.TaskEvent | m.TaskBlob | m.TaskResult  # what goes through the outbox


def next_backoff(backoff: float) -> float:
    """The reconnect delay after another failed dial: doubling, up to BACKOFF_MAX."""
    return min(max(backoff, BACKOFF_MIN) * 2, BACKOFF_MAX)


def jittered(backoff: float, r: float) -> float:
    """Spread reconnects (``r`` uniform in [0, 1)): between half and one and a half times ``backoff``."""
    return backoff * (0.5 + r)


class NodeService:
    def __init__(self, config: Config, backend: SandboxBackend, proxy: MeteringProxy, secret: str):
        self.config, self.backend, self.proxy, self.secret = config, backend, proxy, secret
        self.node_id = load_node_id(config)
        self.credential = load_credential(config)
        if self.credential is not None and self.credential.node_id != self.node_id:
            raise ConfigError(
                f"{credential_path(config)} is the credential of node {self.credential.node_id}, not of {self.node_id}"
            )
        if self.credential is None and config.join_token:
            # made before the first handshake: if the orchestrator's answer is lost, the same key
            # (the one the token enrolled) is presented again
            self.credential = NodeCredential(self.node_id, new_private_key())
            save_credential(config, self.credential)
        if self.credential is None and not secret:
            raise ConfigError("a node needs a join token (MARATHON_JOIN_TOKEN) or the node secret")
        self.tasks: dict[str, TaskHandle] = {}
        self.draining = False  # no new tasks: told to drain, or shutting down
        self.shutting_down = False
        self._random: Callable[[], float] = random.random  # reconnect jitter (tests fix it)
        self._report = trio.Event()  # set: send a heartbeat now (draining changed, results to hand over)
        self._acked_changed = trio.Event()
        self._seq = itertools.count(1)
        self._outbox: collections.deque[tuple[int, Outgoing]] = collections.deque()
        self._outbox_changed = trio.Event()
        self._acked = 0
        self._link: FramedStream | None = None
        self.connected = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.cache = MirrorCache(os.path.join(config.data_dir, "mirrors"))
        set_git_home(config.git_home or os.path.join(config.data_dir, "git-home"), managed=not config.git_home)
        self.pool: WarmPool | None = None
        target = config.warm_pool_target if config.warm_pool_target >= 0 else config.slots
        if target > 0 and hasattr(backend, "restore") and hasattr(backend, "snapshot"):
            self.pool = WarmPool(
                backend,
                target=min(target, config.slots),
                slots=config.slots,
                active=lambda: len(self.tasks),
                root=os.path.join(config.data_dir, "pool"),
                connect=connect_agent,
                connect_timeout=max(config.connect_timeout, 300.0),
            )
        self._incoming: dict[tuple[str, str], BlobWriter] = {}  # (task, name) -> artifact arriving for an assignment
        self._gateway_turn = 0
        self._attempts: collections.OrderedDict[str, int] = collections.OrderedDict()  # newest attempt seen per task
        self._free_slots = set(range(config.slots))  # slot i runs as sandbox uid sandbox_uid + i
        self._slot_freed = trio.Event()
        self.metrics = NodeMetrics(self)

    # ------------------------------------------------------------------ outbox

    def next_seq(self) -> int:
        return next(self._seq)

    def emit(self, msg: Outgoing) -> None:
        """Queue a TaskEvent/TaskResult for the orchestrator (never blocks, never drops results)."""
        self._outbox.append((msg.node_seq, msg))
        if len(self._outbox) > OUTBOX_LIMIT:
            for i, (_, old) in enumerate(self._outbox):
                if isinstance(old, m.TaskEvent):
                    del self._outbox[i]
                    log.warning("outbox full while disconnected: dropped an old event of task %s", old.task_id)
                    break
        self._outbox_changed.set()

    def _ack(self, acked: int) -> None:
        self._acked = max(self._acked, acked)
        while self._outbox and self._outbox[0][0] <= self._acked:
            self._outbox.popleft()
        self._acked_changed.set()
        self._acked_changed = trio.Event()

    def report_now(self) -> None:
        self._report.set()

    def capacity(self) -> m.Capacity:
        p = self.pool.stats() if self.pool is not None else {}
        return m.Capacity(
            slots=self.config.slots,
            active=len(self.tasks),
            warm=p.get("warm", 0),
            backend=self.backend.name,
            api_key=bool(self.config.anthropic_api_key),
            pool_hits=p.get("hits", 0),
            pool_misses=p.get("misses", 0),
            claim_ms_p50=p.get("claim_ms_p50"),
            pool_note=p.get("disabled"),
            draining=self.draining,
        )

    # ------------------------------------------------------------------ lifecycle

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.pool is not None:
                await nursery.start(self.pool.run)
            nursery.start_soon(self._connection_loop)
            task_status.started(self)

    async def _connection_loop(self) -> None:
        backoff = BACKOFF_MIN
        while True:
            try:
                await self._session()
                backoff = BACKOFF_MIN
            except* AuthError as group:
                log.error("orchestrator refused this node: %s", describe(group))
                backoff = BACKOFF_REFUSED
            except* (OSError, ConnectionClosed, ProtocolError, trio.TooSlowError) as group:
                if self.connected.is_set() or backoff >= 2:
                    log.warning("orchestrator link at %s: %s", self.gateway, describe(group))
                self._gateway_turn += 1  # the next gateway, if there are several (outbox replayed there)
            finally:
                self._link = None
                self.connected = trio.Event()
            await trio.sleep(jittered(backoff, self._random()))
            backoff = next_backoff(backoff)

    async def shutdown(self, drain_timeout: float) -> None:
        """A graceful stop (SIGTERM): take no new tasks and tell the orchestrator so; let what
        runs go on for ``drain_timeout``; then stop it with reason ``node_shutdown`` (the
        orchestrator queues those tasks again at once) and hand the results over.  Every step is
        bounded; the caller then cancels the node, which cleans up what is left."""
        self.shutting_down = self.draining = True
        self.report_now()
        if self.tasks:
            log.info("shutting down: %d task(s) get %.0fs to finish", len(self.tasks), drain_timeout)
        with trio.move_on_after(drain_timeout):
            await self._all_tasks_finished()
        if self.tasks:
            log.warning("shutting down: stopping %d task(s) (%s)", len(self.tasks), m.NODE_SHUTDOWN)
            for handle in list(self.tasks.values()):
                handle.cancel(m.NODE_SHUTDOWN)
            with trio.move_on_after(STOP_BOUND):
                await self._all_tasks_finished()
        with trio.move_on_after(HANDOVER_TIMEOUT) as scope:
            await self._handed_over()
        if scope.cancelled_caught:
            log.warning("shutting down: %d result(s) not acknowledged by the orchestrator", len(self._outbox))

    async def _all_tasks_finished(self) -> None:
        while self.tasks:
            await next(iter(self.tasks.values())).finished.wait()

    async def _handed_over(self) -> None:
        """Until the orchestrator has acknowledged everything in the outbox."""
        while self._outbox:
            if self._link is not None:
                self.report_now()  # its reply carries the acknowledgement
            await self._acked_changed.wait()

    @property
    def gateway(self) -> str:
        """The gateway this node dials now (of the configured ones, in turn after a failure)."""
        gateways = self.config.gateway_list()
        return gateways[self._gateway_turn % len(gateways)]

    async def _session(self) -> None:
        address = self.gateway
        tls = client_tls(self.config.orchestrator_ca) if address.startswith("tls:") else None
        with trio.fail_after(self.config.connect_timeout):
            stream = await open_stream(address, tls=tls)
        fs: FramedStream[m.ToNode] = FramedStream(stream, m.ToNode, send_timeout=SEND_TIMEOUT)
        try:
            await fs.handshake("node", __version__, initiator=True, timeout=self.config.connect_timeout)
            with trio.fail_after(self.config.connect_timeout):
                challenge = await fs.receive()
                if isinstance(challenge, m.Error):
                    raise ProtocolError(f"{challenge.code}: {challenge.message}")
                if not isinstance(challenge, m.Challenge):
                    raise ProtocolError(f"expected challenge, got {type(challenge).__name__}")
                nonce = secrets.token_bytes(32)
                await fs.send(self._authenticate(challenge.nonce, nonce))
                welcome = await fs.receive()
            if isinstance(welcome, m.Error):
                if welcome.code == AuthError.code:
                    raise AuthError(welcome.message)
                raise ProtocolError(f"{welcome.code}: {welcome.message}")
            if not isinstance(welcome, m.Welcome):
                raise ProtocolError(f"expected welcome, got {type(welcome).__name__}")
            self._check_welcome(welcome, nonce)
            log.info("connected to the orchestrator at %s as %s", address, self.node_id)
            self._link = fs
            self.connected.set()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._heartbeat, fs, welcome.heartbeat_interval)
                nursery.start_soon(self._sender, fs)
                await self._receiver(fs)
                nursery.cancel_scope.cancel()
        finally:
            await fs.aclose()

    def _authenticate(self, challenge: bytes, nonce: bytes) -> m.Authenticate:
        auth = m.Authenticate(
            node_id=self.node_id,
            name=self.config.node_name,
            mac=b"",
            capacity=self.capacity(),
            running=self.running(include_outbox=True),
            nonce=nonce,
        )
        return prove(auth, self.config, self.secret, self.credential, challenge)

    def _check_welcome(self, welcome: m.Welcome, nonce: bytes) -> None:
        self.credential = check_welcome(
            welcome, nonce, self.node_id, self.config, self.secret, self.credential, self.gateway
        )

    async def _heartbeat(self, fs: FramedStream, interval: float) -> None:
        while True:
            self._report = trio.Event()
            await fs.send(m.Heartbeat(capacity=self.capacity(), running=self.running()))
            with trio.move_on_after(interval):
                await self._report.wait()

    async def _sender(self, fs: FramedStream) -> None:
        sent = self._acked
        while True:
            pending = [(s, msg) for s, msg in self._outbox if s > sent]
            if not pending:
                self._outbox_changed = trio.Event()
                await self._outbox_changed.wait()
                continue
            batch, size = [], 0
            for s, msg in pending:  # writes of a few MiB at most, whatever is queued
                batch.append(msg)
                size += len(getattr(msg, "data", b"")) + 256
                if size >= 4 * 1024 * 1024:
                    await fs.send_many(batch)
                    sent, batch, size = s, [], 0
            if batch:
                await fs.send_many(batch)
                sent = pending[-1][0]

    async def _receiver(self, fs: FramedStream[m.ToNode]) -> None:
        timeout = max(self.config.node_timeout, 3 * self.config.heartbeat_interval)
        while True:
            with trio.fail_after(timeout):
                msg = await fs.receive()
            match msg:
                case m.HeartbeatAck():
                    self._ack(msg.acked)
                case m.AssignBlob():
                    self._receive_blob(msg)
                case m.Assign():
                    await self._assign(fs, msg)
                case m.Cancel():
                    handle = self.tasks.get(msg.task_id)
                    if handle is not None and msg.attempt in (0, handle.spec.attempt):
                        handle.cancel(msg.reason if msg.reason == "timeout" else "cancelled")
                case m.Drain():
                    if not self.draining:
                        log.info("draining: no new tasks")
                    self.draining = True
                    self.report_now()
                case m.Undrain():
                    if self.draining and not self.shutting_down:
                        log.info("undrained: taking tasks again")
                        self.draining = False
                        self.report_now()
                case m.Error():
                    raise ConnectionClosed(f"orchestrator says {msg.code}: {msg.message}")
                case m.Hello() | m.Challenge() | m.Welcome():
                    raise ProtocolError(f"unexpected {type(msg).__name__} from the orchestrator")
                case _:
                    assert_never(msg)

    def _receive_blob(self, msg: m.AssignBlob) -> None:
        if not TASK_ID.fullmatch(msg.task_id) or msg.name != "bundle":
            raise ProtocolError(f"unexpected assignment blob {msg.name[:20]!r} for task {msg.task_id[:20]!r}")
        key = (msg.task_id, msg.name)
        if key not in self._incoming or msg.offset == 0:
            d = os.path.join(self.config.data_dir, "incoming")
            os.makedirs(d, mode=0o700, exist_ok=True)
            self._incoming[key] = BlobWriter(os.path.join(d, f"{msg.task_id}.{msg.name}"))
        self._incoming[key].add(msg)

    async def _assign(self, fs: FramedStream[m.ToNode], assign: m.Assign) -> None:
        spec = assign.task
        if not TASK_ID.fullmatch(spec.task_id):  # it becomes a path on this node
            await fs.send(m.Rejected(task_id=spec.task_id[:64], reason="bad task id"))
            return
        task_id, attempt = spec.task_id, spec.attempt
        newest = self._attempts.get(task_id, 0)
        if attempt < newest:
            # fenced: a newer attempt of this task was assigned here already (this one was delayed,
            # or sent by a replica that had not seen the newer one); never run an older one again
            log.warning("task %s: refused stale attempt %d (attempt %d was assigned here)", task_id, attempt, newest)
            await fs.send(
                m.Rejected(task_id=task_id, reason=f"stale assignment (attempt {newest} seen)", attempt=attempt)
            )
            return
        self._attempts[task_id] = attempt
        self._attempts.move_to_end(task_id)
        while len(self._attempts) > ATTEMPTS_KEPT:
            self._attempts.popitem(last=False)
        previous = self.tasks.get(spec.task_id)
        if previous is not None and previous.spec.attempt == spec.attempt:
            await fs.send(m.Accepted(task_id=task_id, attempt=attempt))  # a repeated assignment
            return
        blob = self._incoming.pop((spec.task_id, "bundle"), None)
        reason = None
        if self.draining:
            reason = "node is draining"
        elif previous is None and len(self.tasks) >= self.config.slots:
            reason = "no free slot"
        elif spec.resume and (blob is None or not blob.done):
            reason = "the task's bundle did not arrive"
        if reason:
            if blob is not None:
                with contextlib.suppress(OSError):
                    os.unlink(blob.path)
            busy = reason in ("node is draining", "no free slot")
            await fs.send(m.Rejected(task_id=task_id, reason=reason, attempt=attempt, busy=busy))
            return
        handle = TaskHandle(spec)
        handle.github_token = assign.github_token or None
        handle.resume_bundle = blob.path if spec.resume and blob is not None else None
        if previous is not None:  # an older attempt still stopping here: the new one waits for it
            previous.cancel("superseded")
            handle.after = previous
        self.tasks[spec.task_id] = handle
        await fs.send(m.Accepted(task_id=task_id, attempt=attempt))
        assert self._nursery is not None
        self._nursery.start_soon(self._run_task, handle)

    def running(self, *, include_outbox: bool = False) -> dict[str, int]:
        """task id -> attempt: what runs here (and, after a reconnect, what has unsent results)."""
        out = {tid: h.spec.attempt for tid, h in self.tasks.items()}
        if include_outbox:
            for _, msg in self._outbox:
                out.setdefault(msg.task_id, msg.attempt)
        return out

    async def _run_task(self, handle: TaskHandle) -> None:
        with log_context(task_id=handle.spec.task_id, node_id=self.node_id):
            task_id, attempt = handle.spec.task_id, handle.spec.attempt

            def emit_event(ev: m.Event) -> None:
                self.emit(m.TaskEvent(task_id=task_id, node_seq=self.next_seq(), event=ev, attempt=attempt))

            async def upload(name: str, path: str) -> None:
                async for p in chunks(path):
                    self.emit(
                        m.TaskBlob(task_id=task_id, node_seq=self.next_seq(), attempt=attempt, name=name, **p.fields())
                    )

            slot = None
            try:
                if handle.after is not None:
                    await handle.after.finished.wait()
                while not self._free_slots:  # only when an attempt being superseded still holds one
                    self._slot_freed = trio.Event()
                    await self._slot_freed.wait()
                slot = min(self._free_slots)
                self._free_slots.discard(slot)
                handle.slot = slot
                outcome = await supervise(
                    handle, self.config, self.backend, self.proxy, emit_event, upload, self.cache, self.pool,
                    metrics=self.metrics,
                )  # fmt: skip
            finally:
                if slot is not None:
                    self._free_slots.add(slot)
                    self._slot_freed.set()
                handle.finished.set()
                if self.tasks.get(task_id) is handle:
                    del self.tasks[task_id]
                if self.pool is not None:
                    self.pool.poke()
                if handle.resume_bundle:
                    with contextlib.suppress(OSError):
                        os.unlink(handle.resume_bundle)
            if handle.stop_reason == m.NODE_SHUTDOWN and outcome.state == m.State.CANCELLED:
                # however far it got, the task stopped because this node shuts down: say so, so that
                # the orchestrator queues it again at once
                outcome = msgspec.structs.replace(outcome, reason=m.NODE_SHUTDOWN, message="the node shut down")
            self.emit(m.TaskResult(task_id=task_id, node_seq=self.next_seq(), outcome=outcome, attempt=attempt))
            log.info("task %s ended %s%s", task_id, outcome.state, f" ({outcome.reason})" if outcome.reason else "")


def _entries(path: str) -> list[str]:
    return os.listdir(path) if os.path.isdir(path) else []


async def reap(config: Config, backend: SandboxBackend) -> None:
    """At node start, before any task: nothing of a previous run (a crash) may survive —
    VMMs, their sockets, disks, jails, network namespaces, and sandbox directories."""
    roots = [os.path.join(config.data_dir, d) for d in ("sandboxes", "pool", "incoming")]
    removed: list[str] = []
    cgroups = getattr(backend, "cgroups", None)
    if cgroups is not None:  # processes first: whatever a crashed run left is killed with its cgroup
        removed += [f"cgroup {name}" for name in await cgroups.reap()]
    removed += [f"mount {point}" for point in await reap_mounts(roots[0])]  # task disks, before deleting below them
    if backend.name == "qemu":
        from marathon.node.sandbox import qemu

        for root in roots[:2]:
            removed += await qemu.reap_leftovers(root)
    elif backend.name == "firecracker":
        from marathon.node.sandbox import firecracker

        for root in roots[:2]:
            removed += await firecracker.reap_leftovers(root)
    for root in roots:
        for name in await trio.to_thread.run_sync(_entries, root):
            removed.append(os.path.join(root, name))
            await trio.to_thread.run_sync(shutil.rmtree, os.path.join(root, name), True)
    if removed:
        log.warning("removed %d leftovers of a previous run: %s", len(removed), ", ".join(removed[:5]))


async def serve_node(
    config: Config, backend: SandboxBackend, secret: str, *, task_status=trio.TASK_STATUS_IGNORED
) -> None:
    await reap(config, backend)
    proxy = MeteringProxy(config.anthropic_base_url, config.anthropic_api_key)
    try:
        service = NodeService(config, backend, proxy, secret)
        proxy.observe = service.metrics.proxy_request
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            if config.metrics_listen:
                from marathon.node.status import node_routes, serve_status

                service.metrics.url = await nursery.start(serve_status, config.metrics_listen, node_routes(service))
            task_status.started(service)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT) as scope:
            await proxy.aclose()
            await backend.aclose()
        if scope.cancelled_caught:
            log.warning(
                "node: closing the proxy and the sandbox backend took over %.0fs; left to the next start", CLOSE_TIMEOUT
            )
