"""The registry's logic, written once over a small etcd-shaped key-value interface (``KV``)
that the in-process model (memory.py) and the etcd client (etcd.py) both implement: leases
kept alive and re-granted, elections by transaction, views kept by resumable watches.

Time is trio's clock (``trio.current_time``), so tests of the memory registry run leases,
renewals and expiries on ``autojump_clock``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

import msgspec
import trio

from marathon.errors import Unavailable
from marathon.registry import Leader, Member

log = logging.getLogger("marathon.registry")


class KeyValue(msgspec.Struct, frozen=True):
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int = 0


class WatchEvent(msgspec.Struct, frozen=True):
    type: str  # "PUT" | "DELETE"
    kv: KeyValue  # for DELETE: key and mod_revision (the deletion's revision) only


class Compacted(Exception):
    """The revision a watch asked for is gone: re-list, then watch from the new revision."""

    def __init__(self, revision: int):
        super().__init__(f"revision compacted (now at {revision})")
        self.revision = revision


class KV(Protocol):
    """The slice of etcd v3 the registry uses.  Every call may raise ``Unavailable``."""

    async def grant(self, ttl: int) -> int: ...

    async def keepalive(self, lease: int) -> int:
        """The lease's TTL after renewal; 0 when it no longer exists."""
        ...

    async def revoke(self, lease: int) -> None: ...

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """Returns the revision of the write; ``Unavailable`` too if the lease is gone."""
        ...

    async def delete(self, key: str) -> int: ...

    async def get(self, key: str) -> KeyValue | None: ...

    async def range_prefix(self, prefix: str) -> tuple[list[KeyValue], int]: ...

    async def create(self, key: str, value: bytes, lease: int) -> tuple[bool, KeyValue | None, int]:
        """Put ``key`` only if it does not exist (one transaction).  (created, the existing
        record when not, revision after the transaction)."""
        ...

    async def delete_if_created(self, key: str, create_revision: int) -> bool:
        """Delete ``key`` only if it is still the one created at ``create_revision``."""
        ...

    def watch(
        self, key: str, *, prefix: bool, start_revision: int
    ) -> AbstractAsyncContextManager[AsyncIterator[list[WatchEvent]]]:
        """Events from ``start_revision`` on; raises ``Compacted`` if that is gone."""
        ...


def ttl_seconds(ttl: float) -> int:
    return max(2, math.ceil(ttl))


def step_down_margin(ttl: int) -> float:
    """How long before its lease could expire on the server a leader that cannot renew
    stops acting as the leader (clock rates differ a little; requests take time)."""
    return max(0.5, ttl * 0.1)


# ---------------------------------------------------------------------- leases


class KVLease:
    def __init__(self, kv: KV, prefix: str, ttl: float):
        self._kv, self._prefix = kv, prefix
        self.ttl = float(ttl_seconds(ttl))
        self.id = 0
        self.alive = False
        self._records: dict[str, bytes] = {}  # key -> value, what this lease should hold
        self._dirty: set[str] = set()  # keys whose put / delete has not reached the registry yet
        self._wake = trio.Event()

    def _key(self, kind: str, id: str) -> str:
        return f"{self._prefix}{kind}/{id}"

    async def put(self, kind: str, id: str, data: bytes) -> None:
        key = self._key(kind, id)
        self._records[key] = data
        self._dirty.add(key)
        await self._flush_one(key)

    async def delete(self, kind: str, id: str) -> None:
        key = self._key(kind, id)
        self._records.pop(key, None)
        self._dirty.add(key)
        await self._flush_one(key)

    async def _flush_one(self, key: str) -> None:
        try:
            if key in self._records:
                await self._kv.put(key, self._records[key], self.id)
            else:
                await self._kv.delete(key)
        except Unavailable:
            self._wake.set()  # the keeper retries
            raise
        self._dirty.discard(key)

    async def _flush(self) -> None:
        for key in list(self._dirty):
            await self._flush_one(key)

    async def _grant(self) -> None:
        self.id = await self._kv.grant(int(self.ttl))
        self.alive = True
        self._dirty |= set(self._records)

    async def keep(self) -> None:
        """Renew every ttl/3; re-grant (and put everything again) after an expiry."""
        ttl = int(self.ttl)
        deadline = trio.current_time() + ttl
        while True:
            with trio.move_on_after(ttl / 3):
                await self._wake.wait()
            self._wake = trio.Event()
            try:
                sent = trio.current_time()
                left = await self._kv.keepalive(self.id)
                if left <= 0:
                    self.alive = False
                    log.warning("registry: lease %x expired; granting a new one and writing its records again", self.id)
                    await self._grant()
                    left = ttl
                deadline = sent + left
                self.alive = True
                await self._flush()
            except Unavailable as exc:
                if trio.current_time() >= deadline and self.alive:
                    log.warning("registry: cannot renew lease %x for longer than its TTL: %s", self.id, exc)
                    self.alive = False
                await trio.sleep(min(1.0, ttl / 6))
                self._wake.set()

    async def revoke(self) -> None:
        if self.id:
            await self._kv.revoke(self.id)


# ---------------------------------------------------------------------- election


class KVTerm:
    def __init__(self, name: str, candidate: str, epoch: int):
        self.name, self.candidate, self.epoch = name, candidate, epoch
        self.lost = trio.Event()


class KVMemberView:
    def __init__(self) -> None:
        self.members: dict[str, Member] = {}
        self.revision = 0
        self.version = 0
        self._changed = trio.Event()

    def _set(self, members: dict[str, Member], revision: int) -> None:
        self.revision = revision
        if members != self.members or self.version == 0:
            self.members = members
            self.version += 1
            self._changed.set()
            self._changed = trio.Event()

    async def changed(self, version: int) -> None:
        while self.version <= version:
            await self._changed.wait()


class KVRegistry:
    def __init__(self, kv: KV, *, prefix: str = "/marathon/", retry: float = 0.5):
        self.kv = kv
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.retry = retry  # pause after a failure before trying again

    # ------------------------------------------------------------------ leases

    @asynccontextmanager
    async def lease(self, ttl: float) -> AsyncIterator[KVLease]:
        lease = KVLease(self.kv, self.prefix, ttl)
        await lease._grant()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lease.keep)
                try:
                    yield lease
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                try:
                    await lease.revoke()
                except Unavailable as exc:  # it expires by itself
                    log.info("registry: could not revoke lease %x (it will expire): %s", lease.id, exc)

    # ------------------------------------------------------------------ members

    def _member(self, kind: str, kv: KeyValue) -> Member:
        return Member(
            kind=kind,
            id=kv.key[len(self.prefix) + len(kind) + 1 :],
            data=kv.value,
            revision=kv.mod_revision,
            lease=kv.lease,
        )

    async def members(self, kind: str) -> tuple[dict[str, Member], int]:
        kvs, rev = await self.kv.range_prefix(f"{self.prefix}{kind}/")
        return {m.id: m for m in (self._member(kind, kv) for kv in kvs)}, rev

    @asynccontextmanager
    async def follow(self, kind: str) -> AsyncIterator[KVMemberView]:
        view = KVMemberView()
        async with trio.open_nursery() as nursery:
            await nursery.start(self._keep_view, kind, view)
            try:
                yield view
            finally:
                nursery.cancel_scope.cancel()

    async def _keep_view(
        self, kind: str, view: KVMemberView, *, relist: bool = True, task_status=trio.TASK_STATUS_IGNORED
    ) -> None:
        """List, then watch from the revision after the listing's; after an interruption
        resume from the last revision applied; after a compaction, list again."""
        prefix = f"{self.prefix}{kind}/"
        started = False
        while True:
            try:
                if relist:
                    members, rev = await self.members(kind)
                    view._set(members, rev)
                    relist = False
                if not started:
                    started = True
                    task_status.started()
                # restart the watch now and then: a stream that silently died cannot stall the view
                with trio.move_on_after(60):
                    async with self.kv.watch(prefix, prefix=True, start_revision=view.revision + 1) as events:
                        async for batch in events:
                            members = dict(view.members)
                            rev = view.revision
                            for ev in batch:
                                mid = ev.kv.key[len(prefix) :]
                                if ev.type == "DELETE":
                                    members.pop(mid, None)
                                else:
                                    members[mid] = self._member(kind, ev.kv)
                                rev = max(rev, ev.kv.mod_revision)
                            view._set(members, rev)
            except Compacted as exc:
                log.info("registry: watch on %s: %s; listing again", prefix, exc)
                relist = True
            except Unavailable as exc:
                log.debug("registry: watch on %s interrupted: %s", prefix, exc)
                if not started:  # the first listing failed: a view that only says so
                    started = True
                    task_status.started()
                await trio.sleep(self.retry)

    # ------------------------------------------------------------------ leadership

    def _leader_key(self, name: str) -> str:
        return f"{self.prefix}leader/{name}"

    async def leader(self, name: str) -> Leader | None:
        kv = await self.kv.get(self._leader_key(name))
        if kv is None:
            return None
        return Leader(name=name, candidate=kv.value.decode(), epoch=kv.create_revision)

    @asynccontextmanager
    async def elect(self, name: str, candidate: str, *, ttl: float) -> AsyncIterator[KVTerm]:
        key = self._leader_key(name)
        secs = ttl_seconds(ttl)
        lease, epoch, renewed_at = await self._campaign(key, candidate, secs)
        term = KVTerm(name, candidate, epoch)
        log.info("registry: %s leads %s (epoch %d)", candidate, name, epoch)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._hold, key, lease, term, secs, renewed_at, nursery.cancel_scope)
                try:
                    yield term
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                try:
                    await self.kv.delete_if_created(key, epoch)
                    await self.kv.revoke(lease)
                except Unavailable as exc:
                    log.info("registry: could not resign %s cleanly (the lease will expire): %s", name, exc)
            if term.lost.is_set():
                log.warning("registry: %s lost the lead of %s (epoch %d)", candidate, name, epoch)

    async def _campaign(self, key: str, candidate: str, ttl: int) -> tuple[int, int, float]:
        """Until elected: (lease, epoch, when the lease was last renewed)."""
        while True:
            try:
                existing = await self.kv.get(key)
                if existing is None:
                    sent = trio.current_time()
                    lease = await self.kv.grant(ttl)
                    try:
                        ok, existing, rev = await self.kv.create(key, candidate.encode(), lease)
                    except BaseException:
                        with trio.CancelScope(shield=True), trio.move_on_after(5):
                            try:
                                await self.kv.revoke(lease)
                            except Unavailable:
                                pass
                        raise
                    if ok:
                        return lease, rev, sent
                    await self.kv.revoke(lease)
                if existing is not None:
                    await self._until_deleted(key, existing.mod_revision + 1, ttl)
            except Unavailable as exc:
                log.debug("registry: campaign for %s: %s", key, exc)
                await trio.sleep(self.retry)

    async def _until_deleted(self, key: str, start_revision: int, ttl: int) -> None:
        """Return when ``key`` is deleted (or at the latest after ``ttl``: look again)."""
        with trio.move_on_after(ttl):
            try:
                async with self.kv.watch(key, prefix=False, start_revision=start_revision) as events:
                    async for batch in events:
                        if any(ev.type == "DELETE" for ev in batch):
                            return
            except Compacted:
                return

    async def _hold(
        self, key: str, lease: int, term: KVTerm, ttl: int, renewed_at: float, scope: trio.CancelScope
    ) -> None:
        await self._renew_until_lost(key, lease, term, ttl, renewed_at)
        term.lost.set()  # not reached when the body ends first (this task is cancelled)
        scope.cancel()

    async def _renew_until_lost(self, key: str, lease: int, term: KVTerm, ttl: int, renewed_at: float) -> None:
        """Renew the leader's lease every ttl/3; return as soon as the lead may be lost: no
        successful renewal until ``step_down_margin`` before the lease could expire on the
        server, a renewal that finds the lease gone, or the key no longer this term's."""
        margin = step_down_margin(ttl)
        deadline = renewed_at + ttl - margin
        next_renew = renewed_at + ttl / 3
        while True:
            await trio.sleep_until(min(next_renew, deadline))
            if trio.current_time() >= deadline:
                log.warning("registry: could not renew the lead of %s in time: stepping down", term.name)
                return
            try:
                sent = trio.current_time()
                with trio.move_on_at(deadline):  # a hung request must not outlast the term
                    left = await self.kv.keepalive(lease)
                    if left <= 0:
                        return
                    kv = await self.kv.get(key)
                    if kv is None or kv.create_revision != term.epoch:
                        return
                    deadline = sent + min(left, ttl) - margin
                    next_renew = sent + ttl / 3
            except Unavailable as exc:
                log.debug("registry: renewing the lead of %s: %s", term.name, exc)
                next_renew = trio.current_time() + min(self.retry, ttl / 6)
