"""Membership and leadership: which replicas and nodes are alive, and which replica schedules.

Records live under leases: a holder keeps its lease alive; when it dies (or cannot reach the
registry) for longer than the TTL, the lease expires and its records vanish, so there are no
stale "available" nodes.  The scheduler leader is elected by a transaction on a key held by a
lease: at most one leader at a time, a new one within the TTL after the old one dies or stops
renewing, and every term has an **epoch** (the leader key's create revision) that strictly
increases from term to term: assignments carry it as a fencing token.

One Protocol, two implementations behind one core (registry/core.py): in-process
(registry/memory.py, leases on trio's clock) and etcd v3 over its JSON gateway
(registry/etcd.py).  ``open_registry(config)`` picks one.

Usage, as a replica::

    async with open_registry(config) as registry:
        async with registry.lease(config.lease_ttl) as lease:
            await lease.put("replica", replica_id, info_json)
            await lease.put("node", node_id, node_json)     # nodes connected to this replica
            ...
        async with registry.follow("node") as nodes:          # every replica's view of the nodes
            version = nodes.version; members = nodes.members   # {id: Member}
            await nodes.changed(version)                      # until something changes
        while True:
            async with registry.elect("scheduler", replica_id, ttl=config.leader_ttl) as term:
                await run_scheduler(epoch=term.epoch)          # cancelled when the lead is lost
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Protocol

import msgspec
import trio

if TYPE_CHECKING:
    from marathon.config import Config

__all__ = ["Member", "Leader", "Lease", "Term", "MemberView", "Registry", "open_registry"]


class Member(msgspec.Struct, frozen=True):
    kind: str  # "replica", "node", … (a key prefix)
    id: str
    data: bytes  # the holder's record, opaque here (JSON by convention)
    revision: int  # registry revision of its last write: a newer record has a higher one
    lease: int  # the lease that keeps it


class Leader(msgspec.Struct, frozen=True):
    name: str  # what is led ("scheduler")
    candidate: str  # who leads (a replica id)
    epoch: int  # fencing token of this term: strictly increases from one term to the next


class Lease(Protocol):
    """A lease kept alive in the background while its ``async with`` lasts; revoked at the
    end (its records vanish at once).  If it expires anyway (the registry was unreachable
    for longer than the TTL) a new one is granted and every record put again."""

    id: int  # current lease id (changes when re-granted)
    ttl: float
    alive: bool  # False while the lease may have expired on the server

    async def put(self, kind: str, id: str, data: bytes) -> None:
        """Create or replace the record, held by this lease.  ``Unavailable`` if the registry
        cannot be reached now; the record is still written when it can be."""
        ...

    async def delete(self, kind: str, id: str) -> None:
        """Remove the record (also retried in the background when the registry is back)."""
        ...


class Term(Protocol):
    """One term of leadership, for the body of ``elect``."""

    name: str
    candidate: str
    epoch: int
    lost: trio.Event  # set when the lead ended without the body asking (renewal failed, key gone)


class MemberView(Protocol):
    """A live view of one kind's records, kept current by a watch that resumes from the last
    revision it saw and re-lists after a compaction."""

    members: dict[str, Member]  # id -> record; a new dict at every change (never mutated)
    revision: int  # the registry revision the view reflects
    version: int  # +1 at every change applied to ``members``

    async def changed(self, version: int) -> None:
        """Return once ``self.version > version``."""
        ...


class Registry(Protocol):
    def lease(self, ttl: float) -> AbstractAsyncContextManager[Lease]:
        """Grant a lease (``Unavailable`` if the registry cannot be reached) and keep it alive."""
        ...

    def elect(self, name: str, candidate: str, *, ttl: float) -> AbstractAsyncContextManager[Term]:
        """Campaign until ``candidate`` leads ``name``, then run the body as the leader.
        The body is cancelled when the lead is lost (``term.lost`` set; the ``async with``
        then ends normally: campaign again in a loop).  Leaving the body resigns at once.
        A leader that cannot renew steps down before its lease can expire on the server, so
        two leaders never overlap; another candidate leads within ``ttl`` of the last renewal."""
        ...

    async def leader(self, name: str) -> Leader | None:
        """Who leads ``name`` now (``Unavailable`` if the registry cannot be reached)."""
        ...

    async def members(self, kind: str) -> tuple[dict[str, Member], int]:
        """The records of one kind now, and the registry revision they were read at."""
        ...

    def follow(self, kind: str) -> AbstractAsyncContextManager[MemberView]:
        """A view of one kind's records, kept current while the ``async with`` lasts."""
        ...


@asynccontextmanager
async def open_registry(config: Config) -> AsyncIterator[Registry]:
    """The in-process registry, or etcd when ``etcd_endpoints`` is set (several replicas)."""
    endpoints = config.etcd_endpoint_list()
    if not endpoints:
        from marathon.registry.memory import open_memory_registry

        async with open_memory_registry() as reg:
            yield reg
        return
    from marathon.registry.etcd import open_etcd_registry

    async with open_etcd_registry(endpoints, prefix=config.etcd_prefix, timeout=config.etcd_timeout) as reg:
        yield reg
