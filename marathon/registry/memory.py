"""In-process registry: a small model of etcd v3 (revisions, leases, transactions, watches
with history and compaction) on trio's clock, behind the same core as etcd.

One ``MemoryKVServer`` is the "cluster"; each ``MemoryKV`` is one replica's connection to
it (``partitioned = True`` makes every new request fail, as if that replica lost its
network: tests use it to stop a leader renewing).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from marathon.errors import Unavailable
from marathon.registry.core import Compacted, KeyValue, KVRegistry, WatchEvent


class _Watcher:
    def __init__(self, key: str, prefix: bool, buffer: int):
        self.key, self.prefix = key, prefix
        self.send, self.receive = trio.open_memory_channel[list[WatchEvent]](buffer)
        self.overflowed = False

    def matches(self, key: str) -> bool:
        return key.startswith(self.key) if self.prefix else key == self.key


class _Events:
    def __init__(self, server: MemoryKVServer, watcher: _Watcher):
        self._server, self._w = server, watcher

    def __aiter__(self) -> _Events:
        return self

    async def __anext__(self) -> list[WatchEvent]:
        try:
            batch = await self._w.receive.receive()
        except trio.EndOfChannel:
            raise Compacted(self._server.revision) from None  # it fell behind: list again
        return batch


class MemoryKVServer:
    def __init__(self, *, history_limit: int = 10_000, watch_buffer: int = 1_000):
        self.revision = 1
        self.compacted = 0  # history below this revision is gone
        self._kvs: dict[str, KeyValue] = {}
        self._leases: dict[int, tuple[int, float]] = {}  # id -> (ttl, deadline)
        self._ids = itertools.count(0x694D_0000_0001)
        self._history: list[tuple[int, list[WatchEvent]]] = []
        self._history_limit = history_limit
        self._watch_buffer = watch_buffer
        self._watchers: set[_Watcher] = set()
        self._lease_changed = trio.Event()

    # ------------------------------------------------------------------ lease expiry

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            now = trio.current_time()
            for lid, (_, deadline) in list(self._leases.items()):
                if deadline <= now:
                    self.revoke(lid)
            nxt = min((d for _, d in self._leases.values()), default=now + 3600)
            self._lease_changed = trio.Event()
            with trio.move_on_at(nxt):
                await self._lease_changed.wait()

    # ------------------------------------------------------------------ writes

    def _commit(self, events: list[WatchEvent]) -> int:
        self._history.append((self.revision, events))
        if len(self._history) > self._history_limit:
            drop = len(self._history) - self._history_limit
            self.compacted = self._history[drop][0]
            del self._history[:drop]
        for w in list(self._watchers):
            mine = [e for e in events if w.matches(e.kv.key)]
            if mine and not w.overflowed:
                try:
                    w.send.send_nowait(mine)
                except trio.WouldBlock:
                    w.overflowed = True
                    w.send.close()
        return self.revision

    def _next(self) -> int:
        self.revision += 1
        return self.revision

    def grant(self, ttl: int) -> int:
        lid = next(self._ids)
        self._leases[lid] = (ttl, trio.current_time() + ttl)
        self._lease_changed.set()
        return lid

    def keepalive(self, lease: int) -> int:
        if lease not in self._leases:
            return 0
        ttl, _ = self._leases[lease]
        self._leases[lease] = (ttl, trio.current_time() + ttl)
        return ttl

    def revoke(self, lease: int) -> None:
        if self._leases.pop(lease, None) is None:
            return
        self._lease_changed.set()
        doomed = [k for k, kv in self._kvs.items() if kv.lease == lease]
        if doomed:
            rev = self._next()
            events = [WatchEvent("DELETE", KeyValue(k, b"", 0, rev)) for k in doomed]
            for k in doomed:
                del self._kvs[k]
            self._commit(events)

    def put(self, key: str, value: bytes, lease: int = 0) -> int:
        if lease and lease not in self._leases:
            raise Unavailable("etcdserver: requested lease not found")
        rev = self._next()
        old = self._kvs.get(key)
        kv = KeyValue(key, value, old.create_revision if old else rev, rev, lease)
        self._kvs[key] = kv
        return self._commit([WatchEvent("PUT", kv)])

    def delete(self, key: str) -> int:
        if key not in self._kvs:
            return self.revision
        del self._kvs[key]
        rev = self._next()
        return self._commit([WatchEvent("DELETE", KeyValue(key, b"", 0, rev))])

    def create(self, key: str, value: bytes, lease: int) -> tuple[bool, KeyValue | None, int]:
        if key in self._kvs:
            return False, self._kvs[key], self.revision
        return True, None, self.put(key, value, lease)

    def delete_if_created(self, key: str, create_revision: int) -> bool:
        kv = self._kvs.get(key)
        if kv is None or kv.create_revision != create_revision:
            return False
        self.delete(key)
        return True

    def compact(self, revision: int) -> None:
        self._history = [(r, e) for r, e in self._history if r >= revision]
        self.compacted = max(self.compacted, revision)

    # ------------------------------------------------------------------ reads

    def get(self, key: str) -> KeyValue | None:
        return self._kvs.get(key)

    def range_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        return [kv for k, kv in sorted(self._kvs.items()) if k.startswith(prefix)], self.revision

    @asynccontextmanager
    async def watch(self, key: str, *, prefix: bool, start_revision: int) -> AsyncIterator[_Events]:
        if 0 < start_revision < self.compacted:
            raise Compacted(self.compacted)
        w = _Watcher(key, prefix, self._watch_buffer)
        for rev, events in self._history:
            if rev >= start_revision:
                mine = [e for e in events if w.matches(e.kv.key)]
                if mine:
                    try:
                        w.send.send_nowait(mine)
                    except trio.WouldBlock:  # too far behind to replay: list again
                        raise Compacted(self.revision) from None
        self._watchers.add(w)
        try:
            yield _Events(self, w)
        finally:
            self._watchers.discard(w)
            w.send.close()


class MemoryKV:
    """One replica's connection to the in-process "cluster"."""

    def __init__(self, server: MemoryKVServer):
        self.server = server
        self.partitioned = False  # tests: this replica cannot reach the registry

    async def _up(self) -> MemoryKVServer:
        await trio.lowlevel.checkpoint()
        if self.partitioned:
            raise Unavailable("registry unreachable (partitioned)")
        return self.server

    async def grant(self, ttl: int) -> int:
        return (await self._up()).grant(ttl)

    async def keepalive(self, lease: int) -> int:
        return (await self._up()).keepalive(lease)

    async def revoke(self, lease: int) -> None:
        (await self._up()).revoke(lease)

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        return (await self._up()).put(key, value, lease)

    async def delete(self, key: str) -> int:
        return (await self._up()).delete(key)

    async def get(self, key: str) -> KeyValue | None:
        return (await self._up()).get(key)

    async def range_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        return (await self._up()).range_prefix(prefix)

    async def create(self, key: str, value: bytes, lease: int) -> tuple[bool, KeyValue | None, int]:
        return (await self._up()).create(key, value, lease)

    async def delete_if_created(self, key: str, create_revision: int) -> bool:
        return (await self._up()).delete_if_created(key, create_revision)

    @asynccontextmanager
    async def watch(self, key: str, *, prefix: bool, start_revision: int) -> AsyncIterator[_Events]:
        server = await self._up()
        async with server.watch(key, prefix=prefix, start_revision=start_revision) as events:
            yield events


@asynccontextmanager
async def open_memory_registry(
    server: MemoryKVServer | None = None, *, prefix: str = "/marathon/"
) -> AsyncIterator[KVRegistry]:
    """A registry on an in-process "cluster" (a new one unless ``server`` is given: tests
    open several replicas' registries on one).  The cluster's lease expiry runs here."""
    own = server is None
    server = server or MemoryKVServer()
    async with trio.open_nursery() as nursery:
        if own:
            await nursery.start(server.serve)
        try:
            yield KVRegistry(MemoryKV(server), prefix=prefix)
        finally:
            nursery.cancel_scope.cancel()
