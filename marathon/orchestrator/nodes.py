"""Connected nodes as the orchestrator sees them (in-process registry)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import trio

from marathon.errors import ConnectionClosed
from marathon.orchestrator.reconcile import SessionView
from marathon.orchestrator.scheduler import NodeView
from marathon.orchestrator.uploads import SessionUploads
from marathon.protocol import messages as m
from marathon.protocol.framing import FramedStream

AVOID_LIMIT = 10_000
CHUNK_BYTES = (
    8 * 1024 * 1024
)  # chunk data a session queues for its node at most  # tasks whose rejecting nodes are remembered (the oldest are forgotten first)


@dataclass
class NodeSession:
    node_id: str
    name: str
    stream: FramedStream[m.FromNode] | None
    capacity: m.Capacity
    peer: str = ""
    connected: bool = True
    # wall-clock times, for people (marathon nodes)
    connected_at: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)
    disconnected_at: float | None = None
    # deadlines run on trio's clock
    lost_since: float | None = None
    drain_requested: bool = False  # an administrator drains this node
    max_slots: int | None = None  # what it was enrolled with (None: the shared secret, not capped)
    revoked: bool = False  # an administrator revoked its credential
    acked: int = 0  # highest node_seq processed on this connection
    open_blobs: dict[tuple[str, str], int] = field(default_factory=dict)  # artifact -> node_seq of its first chunk
    uploads: SessionUploads = field(default_factory=lambda: SessionUploads("", 0))  # the gateway sets its own
    # task_id -> acknowledgement deadline on trio's clock (None once accepted)
    assigned: dict[str, float | None] = field(default_factory=dict)
    # what we send goes through a queue and one writer per connection: a node that stops
    # reading never blocks the scheduler or another node's session
    queue_size: int = 10_000
    _send_ch: trio.MemorySendChannel[m.ToNode] = field(init=False, repr=False)
    _recv_ch: trio.MemoryReceiveChannel[m.ToNode] = field(init=False, repr=False)

    queued_bytes: int = 0  # chunk data waiting in the queue (send_chunk keeps it under CHUNK_BYTES)
    _drained: trio.Event = field(default_factory=trio.Event, repr=False)

    def __post_init__(self) -> None:
        self._send_ch, self._recv_ch = trio.open_memory_channel[m.ToNode](self.queue_size)

    async def send_chunk(self, msg: m.AssignBlob) -> bool:
        """Queue a chunk of a file for the node once no more than CHUNK_BYTES of chunks wait:
        a large bundle goes out at the node's pace, never whole in memory."""
        while self.connected and self.queued_bytes > CHUNK_BYTES:
            self._drained = trio.Event()
            await self._drained.wait()
        if not await self.send(msg):
            return False
        self.queued_bytes += len(msg.data)
        return True

    @property
    def draining(self) -> bool:
        """Takes no new tasks: drained by an administrator, or draining itself (shutting down)."""
        return self.drain_requested or self.capacity.draining

    async def send(self, msg: m.ToNode) -> bool:
        """Queue ``msg`` for the node; False when it is not connected or not keeping up
        (then its connection is dropped: it reconnects and is reconciled)."""
        if not self.connected or self.stream is None:
            return False
        try:
            self._send_ch.send_nowait(msg)
        except trio.WouldBlock:
            self.connected = False
            self._send_ch.close()
            return False
        except trio.BrokenResourceError:  # its writer is gone: the connection is ending
            self.connected = False
            return False
        except trio.ClosedResourceError:
            return False
        return True

    async def write_queued(self) -> None:
        """The connection's writer: runs beside its reader until either ends."""
        assert self.stream is not None
        async with self._recv_ch:
            async for msg in self._recv_ch:
                await self.stream.send(msg)
                if isinstance(msg, m.AssignBlob):
                    self.queued_bytes -= len(msg.data)
                    self._drained.set()
        raise ConnectionClosed("the node was not reading: its queue overflowed")

    def view(self) -> NodeView:
        active = max(self.capacity.active, len(self.assigned))
        return NodeView(self.node_id, self.capacity.slots, active, self.capacity.warm, self.draining)

    def facts(self) -> SessionView:
        return SessionView(self.node_id, self.name, self.connected, self.lost_since, dict(self.assigned))

    def public(self) -> dict:
        return {
            "id": self.node_id,
            "name": self.name,
            "connected": self.connected,
            "slots": self.capacity.slots,
            "active": self.view().active,
            "warm": self.capacity.warm,
            "backend": self.capacity.backend,
            "draining": self.draining,
            "drain": "administrator" if self.drain_requested else ("node" if self.capacity.draining else None),
            "peer": self.peer,
            "pool": {
                "hits": self.capacity.pool_hits,
                "misses": self.capacity.pool_misses,
                "claim_ms_p50": self.capacity.claim_ms_p50,
                "note": self.capacity.pool_note,
            },
            "connected_at": self.connected_at,
            "last_seen": self.last_seen,
            "disconnected_at": self.disconnected_at,
            "tasks": sorted(self.assigned),
        }


class NodeRegistry:
    def __init__(self) -> None:
        self.sessions: dict[str, NodeSession] = {}
        self.drained: set[str] = set()  # node ids administrators drained (kept across reconnects)
        self._avoid: dict[str, set[str]] = {}  # task id -> nodes that rejected it

    def attach(self, session: NodeSession) -> NodeSession | None:
        """Register a (re)connected node; returns the session it replaces, if any."""
        old = self.sessions.get(session.node_id)
        if old is not None:
            session.assigned = old.assigned
            old.connected = False
        session.drain_requested = session.node_id in self.drained
        self.sessions[session.node_id] = session
        return old

    def detach(self, session: NodeSession) -> None:
        session.connected = False
        session._drained.set()  # a chunk waiting to be queued for it gives up
        session.disconnected_at = time.time()
        session.lost_since = trio.current_time()

    def get(self, node_id: str | None) -> NodeSession | None:
        return self.sessions.get(node_id) if node_id else None

    def find(self, key: str) -> NodeSession | None:
        """A node by id, or by name when one node has that name."""
        if key in self.sessions:
            return self.sessions[key]
        named = [s for s in self.sessions.values() if s.name == key]
        return named[0] if len(named) == 1 else None

    def connected(self) -> list[NodeSession]:
        return [s for s in self.sessions.values() if s.connected]

    def views(self) -> list[NodeView]:
        return [s.view() for s in self.connected()]

    def facts(self) -> dict[str, SessionView]:
        return {node_id: s.facts() for node_id, s in self.sessions.items()}

    def forget_task(self, task_id: str) -> None:
        for s in self.sessions.values():
            s.assigned.pop(task_id, None)

    def set_drain(self, node_id: str, draining: bool) -> None:
        if draining:
            self.drained.add(node_id)
        else:
            self.drained.discard(node_id)
        session = self.sessions.get(node_id)
        if session is not None:
            session.drain_requested = draining

    # a node that rejected a task is avoided for it while another node can take it
    def avoid(self, task_id: str, node_id: str) -> None:
        self._avoid.setdefault(task_id, set()).add(node_id)
        while len(self._avoid) > AVOID_LIMIT:
            del self._avoid[next(iter(self._avoid))]

    def avoided(self, task_id: str) -> frozenset[str]:
        return frozenset(self._avoid.get(task_id, ()))

    def task_ended(self, task_id: str) -> None:
        self._avoid.pop(task_id, None)
