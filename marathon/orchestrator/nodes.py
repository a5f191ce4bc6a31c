"""Connected nodes as the orchestrator sees them (in-process registry)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import trio

from marathon.errors import ConnectionClosed
from marathon.orchestrator.scheduler import NodeView
from marathon.protocol.framing import FramedStream
from marathon.protocol import messages as m


@dataclass
class NodeSession:
    node_id: str
    name: str
    stream: FramedStream | None
    capacity: m.Capacity
    peer: str = ""
    connected: bool = True
    connected_at: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)
    disconnected_at: float | None = None
    draining: bool = False
    acked: int = 0  # highest node_seq processed on this connection
    open_blobs: dict[tuple[str, str], int] = field(default_factory=dict)  # artifact -> node_seq of its first chunk
    # task_id -> acknowledgement deadline (None once accepted)
    assigned: dict[str, float | None] = field(default_factory=dict)
    # what we send goes through a queue and one writer per connection: a node that stops
    # reading never blocks the scheduler or another node's session
    queue_size: int = 10_000
    _out: tuple | None = None

    def __post_init__(self) -> None:
        self._out = trio.open_memory_channel(self.queue_size)

    async def send(self, msg) -> bool:
        """Queue ``msg`` for the node; False when it is not connected or not keeping up
        (then its connection is dropped: it reconnects and is reconciled)."""
        if not self.connected or self.stream is None:
            return False
        try:
            self._out[0].send_nowait(msg)
        except trio.WouldBlock:
            self.connected = False
            self._out[0].close()
            return False
        except trio.ClosedResourceError:
            return False
        return True

    async def write_queued(self) -> None:
        """The connection's writer: runs beside its reader until either ends."""
        async with self._out[1]:
            async for msg in self._out[1]:
                await self.stream.send(msg)
        raise ConnectionClosed("the node was not reading: its queue overflowed")

    def view(self) -> NodeView:
        active = max(self.capacity.active, len(self.assigned))
        return NodeView(self.node_id, self.capacity.slots, active, self.capacity.warm, self.draining)

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

    def attach(self, session: NodeSession) -> NodeSession | None:
        """Register a (re)connected node; returns the session it replaces, if any."""
        old = self.sessions.get(session.node_id)
        if old is not None:
            session.assigned = old.assigned
            old.connected = False
        self.sessions[session.node_id] = session
        return old

    def detach(self, session: NodeSession) -> None:
        session.connected = False
        session.disconnected_at = time.time()

    def get(self, node_id: str | None) -> NodeSession | None:
        return self.sessions.get(node_id) if node_id else None

    def connected(self) -> list[NodeSession]:
        return [s for s in self.sessions.values() if s.connected]

    def views(self) -> list[NodeView]:
        return [s.view() for s in self.connected()]

    def forget_task(self, task_id: str) -> None:
        for s in self.sessions.values():
            s.assigned.pop(task_id, None)
