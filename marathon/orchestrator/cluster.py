"""This replica among the others: its record under a lease, the records of the nodes connected
to it, and a live view of every replica and node in the cluster (``marathon.registry``).

With one orchestrator the registry is in-process and this is bookkeeping; with several
(``etcd_endpoints``) it is how a replica knows that a node it does not hold is connected to
another one — so its tasks are not given back as lost — and what ``/v1/cluster`` shows.
A record lives under the replica's lease: when a replica dies, its records and those of its
nodes vanish after ``lease_ttl``, so no stale node stays "available".
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time

import msgspec
import trio

from marathon import __version__
from marathon.errors import Unavailable
from marathon.orchestrator.nodes import NodeRegistry
from marathon.orchestrator.reconcile import SessionView
from marathon.registry import Member, MemberView, Registry, Term

log = logging.getLogger("marathon.orchestrator")


class ReplicaRecord(msgspec.Struct, frozen=True):
    id: str
    url: str
    gateway: str
    version: str
    started_at: float
    pid: int


class NodeRecord(msgspec.Struct, frozen=True):
    id: str
    name: str
    replica: str  # the replica holding its connection
    slots: int
    active: int
    warm: int
    backend: str
    draining: bool
    connected_at: float


def new_replica_id() -> str:
    return f"{socket.gethostname()[:40]}-{secrets.token_hex(4)}"


class Cluster:
    def __init__(self, registry: Registry, nodes: NodeRegistry, replica_id: str, *, lease_ttl: float):
        self.registry, self.nodes, self.replica_id, self.lease_ttl = registry, nodes, replica_id, lease_ttl
        self.record: ReplicaRecord | None = None
        self.term: Term | None = None
        self._replicas: MemberView | None = None
        self._nodes: MemberView | None = None
        self._published: dict[str, NodeRecord] = {}  # what this replica has put for its nodes
        self._dirty = trio.Event()
        self.started = trio.current_time()
        self._absent_since: dict[str, float] = {}  # node id -> when this replica found it nowhere (trio clock)

    @property
    def leading(self) -> bool:
        return self.term is not None and not self.term.lost.is_set()

    async def lead(self, leader_ttl: float) -> None:
        """Campaign for the cluster-wide duties (giving back the tasks of nodes that are nowhere)
        for as long as this replica runs; lead until the term is lost, then campaign again."""
        while True:
            try:
                async with self.registry.elect("scheduler", self.replica_id, ttl=leader_ttl) as term:
                    self.term = term
                    log.info("cluster: replica %s leads (epoch %d)", self.replica_id, term.epoch)
                    await trio.sleep_forever()
            except Unavailable as exc:
                log.warning("cluster: cannot campaign now: %s", exc)
                await trio.sleep(min(leader_ttl / 2, 5.0))
            finally:
                self.term = None

    async def node_is_nowhere(self, node_id: str) -> bool:
        """A fresh read, before a task is given back as lost: the watch may lag (or this
        replica was stopped for a while), the registry does not."""
        session = self.nodes.get(node_id)
        if session is not None and session.connected:
            return False
        try:
            members, _ = await self.registry.members("node")
        except Unavailable:
            return False  # not now: decided again at the next pass
        return node_id not in members

    def nodes_changed(self) -> None:
        """A local node connected, left, or its capacity changed: publish again."""
        self._dirty.set()

    async def run(self, url: str, gateway: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.record = ReplicaRecord(self.replica_id, url, gateway, __version__, time.time(), os.getpid())
        async with self.registry.lease(self.lease_ttl) as lease:
            await lease.put("replica", self.replica_id, msgspec.json.encode(self.record))
            async with self.registry.follow("replica") as replicas, self.registry.follow("node") as nodes:
                self._replicas, self._nodes = replicas, nodes
                task_status.started()
                while True:
                    self._dirty = trio.Event()
                    await self._publish(lease)
                    with trio.move_on_after(self.lease_ttl / 2):  # also retry what the registry refused
                        await self._dirty.wait()

    async def _publish(self, lease) -> None:
        want = {s.node_id: self._node_record(s) for s in self.nodes.connected()}
        try:
            for node_id, rec in want.items():
                if self._published.get(node_id) != rec:
                    await lease.put("node", node_id, msgspec.json.encode(rec))
                    self._published[node_id] = rec
            for node_id in set(self._published) - set(want):
                # only ours: a node that moved to another replica has its record there now
                held = self._nodes.members.get(node_id) if self._nodes is not None else None
                if held is None or held.lease == lease.id:
                    await lease.delete("node", node_id)
                del self._published[node_id]
        except Unavailable as exc:
            log.warning("cluster: cannot publish this replica's nodes now: %s", exc)

    def _node_record(self, s) -> NodeRecord:
        v = s.view()
        return NodeRecord(
            s.node_id,
            s.name,
            self.replica_id,
            v.slots,
            v.active,
            v.warm,
            s.capacity.backend,
            v.draining,
            s.connected_at,
        )

    # ------------------------------------------------------------------ views

    def replicas(self) -> list[ReplicaRecord]:
        members = self._replicas.members if self._replicas is not None else {}
        return [r for r in (_decode(m, ReplicaRecord) for m in members.values()) if r is not None]

    def remote_nodes(self) -> dict[str, NodeRecord]:
        """Nodes connected to another replica (by their records in the registry)."""
        members = self._nodes.members if self._nodes is not None else {}
        out = {}
        for m in members.values():
            rec = _decode(m, NodeRecord)
            if rec is not None and rec.replica != self.replica_id:
                out[rec.id] = rec
        return out

    def session_facts(self, now: float, node_ids: set[str]) -> dict[str, SessionView]:
        """What the deadline decisions see of the nodes that hold active tasks: a node connected
        here as its session says; one connected to another replica as connected; one that is
        nowhere as lost since this replica first found it so (its start, at the latest)."""
        local = self.nodes.facts()
        remote = self.remote_nodes()
        out: dict[str, SessionView] = {}
        for node_id in node_ids | set(local):
            session = local.get(node_id)
            if session is not None and session.connected:
                out[node_id] = session
            elif node_id in remote:
                out[node_id] = SessionView(node_id, remote[node_id].name, True)
            elif session is not None and session.lost_since is not None:
                out[node_id] = session
            else:
                since = self._absent_since.setdefault(node_id, now)
                out[node_id] = SessionView(node_id, session.name if session else node_id, False, since)
            if out[node_id].connected:
                self._absent_since.pop(node_id, None)
        return out

    async def describe(self) -> dict:
        """What /v1/cluster answers (``Unavailable`` when the registry cannot be reached)."""
        leader = await self.registry.leader("scheduler")
        out = self.public(leader.candidate if leader else None)
        out["epoch"] = leader.epoch if leader else None
        return out

    def public(self, leader: str | None) -> dict:
        nodes = {}
        for s in self.nodes.connected():
            nodes[s.node_id] = {"id": s.node_id, "name": s.name, "replica": self.replica_id}
        for rec in self.remote_nodes().values():
            nodes.setdefault(rec.id, {"id": rec.id, "name": rec.name, "replica": rec.replica})
        return {
            "replica": self.replica_id,
            "replicas": [
                {
                    "id": r.id,
                    "url": r.url,
                    "gateway": r.gateway,
                    "version": r.version,
                    "started_at": r.started_at,
                    "leader": r.id == leader,
                    "self": r.id == self.replica_id,
                }
                for r in sorted(self.replicas(), key=lambda r: r.id)
            ],
            "nodes": sorted(nodes.values(), key=lambda n: n["name"]),
        }


def _decode(m: Member, typ):
    try:
        return msgspec.json.decode(m.data, type=typ)
    except msgspec.DecodeError:
        return None
