"""etcd v3 through its JSON gRPC gateway, with httpx (no gRPC, no protobuf).

Keys and values are base64 in JSON; 64-bit integers come back as strings.  The gateway's
path prefix is ``/v3`` on etcd 3.4 and 3.5+ (3.4 also serves ``/v3beta``, which 3.3 used
and 3.5 dropped); the client starts with ``/v3`` and falls back to ``/v3beta`` on an
endpoint that does not route it.  Several endpoints: a request that cannot connect moves
on to the next one.  Every request is bounded by ``timeout``; failures are ``Unavailable``.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import trio

from marathon.errors import Unavailable
from marathon.registry.core import Compacted, KeyValue, KVRegistry, WatchEvent

log = logging.getLogger("marathon.registry.etcd")

PREFIXES = ("/v3", "/v3beta")
GRPC_NOT_FOUND, GRPC_OUT_OF_RANGE = 5, 11


def b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def unb64(s: str | None) -> bytes:
    return base64.b64decode(s) if s else b""


def prefix_end(prefix: str) -> str:
    """etcd's range_end for "every key starting with prefix"."""
    raw = bytearray(prefix.encode())
    while raw and raw[-1] == 0xFF:
        raw.pop()
    if not raw:
        return b64(b"\0")
    raw[-1] += 1
    return b64(bytes(raw))


def _kv(d: dict[str, Any]) -> KeyValue:
    return KeyValue(
        key=unb64(d.get("key")).decode(),
        value=unb64(d.get("value")),
        create_revision=int(d.get("create_revision", 0)),
        mod_revision=int(d.get("mod_revision", 0)),
        lease=int(d.get("lease", 0)),
    )


class EtcdError(Unavailable):
    def __init__(self, message: str, code: int = 0):
        super().__init__(message)
        self.grpc_code = code


class EtcdKV:
    def __init__(
        self, endpoints: list[str], *, timeout: float = 5.0, transport: httpx.AsyncBaseTransport | None = None
    ):
        if not endpoints:
            raise ValueError("no etcd endpoints")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.timeout = timeout
        self._current = 0
        self._api: dict[str, str] = {}  # endpoint -> gateway prefix that works there
        self._client = httpx.AsyncClient(timeout=timeout, transport=transport)

    async def aclose(self) -> None:
        await self._client.aclose()

    def _order(self) -> list[str]:
        n = len(self.endpoints)
        return [self.endpoints[(self._current + i) % n] for i in range(n)]

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        last: Exception | None = None
        for i, ep in enumerate(self._order()):
            try:
                with trio.fail_after(self.timeout):
                    data = await self._post_to(ep, path, body)
                if i:
                    self._current = self.endpoints.index(ep)
                return data
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # not sent: safe to try another
                last = exc
            except (httpx.HTTPError, trio.TooSlowError) as exc:
                raise Unavailable(f"etcd {ep}{path}: {exc or type(exc).__name__}") from None
        raise Unavailable(f"etcd unreachable ({', '.join(self.endpoints)}): {last}")

    async def _post_to(self, ep: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        for api in [self._api[ep]] if ep in self._api else PREFIXES:
            r = await self._client.post(f"{ep}{api}{path}", json=body)
            data = _json_or_none(r)
            if r.status_code == 404 and (data is None or "code" not in data):
                continue  # this gateway prefix is not routed here: try the next
            self._api[ep] = api
            if r.status_code != 200:
                msg = (data or {}).get("message") or r.text[:200]
                raise EtcdError(f"etcd {path}: {msg}", int((data or {}).get("code", 0)))
            if data is None:
                raise Unavailable(f"etcd {path}: not JSON")
            return data
        raise Unavailable(f"etcd at {ep} serves no v3 JSON gateway ({' or '.join(PREFIXES)})")

    # ------------------------------------------------------------------ leases

    async def grant(self, ttl: int) -> int:
        return int((await self._post("/lease/grant", {"TTL": ttl}))["ID"])

    async def keepalive(self, lease: int) -> int:
        data = await self._post("/lease/keepalive", {"ID": str(lease)})
        return int(data.get("result", data).get("TTL", 0))

    async def revoke(self, lease: int) -> None:
        try:
            await self._post("/lease/revoke", {"ID": str(lease)})
        except EtcdError as exc:
            if exc.grpc_code != GRPC_NOT_FOUND:
                raise

    # ------------------------------------------------------------------ keys

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        body: dict[str, Any] = {"key": b64(key), "value": b64(value)}
        if lease:
            body["lease"] = str(lease)
        return int((await self._post("/kv/put", body))["header"]["revision"])

    async def delete(self, key: str) -> int:
        return int((await self._post("/kv/deleterange", {"key": b64(key)}))["header"]["revision"])

    async def get(self, key: str) -> KeyValue | None:
        kvs = (await self._post("/kv/range", {"key": b64(key)})).get("kvs") or []
        return _kv(kvs[0]) if kvs else None

    async def range_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        data = await self._post("/kv/range", {"key": b64(prefix), "range_end": prefix_end(prefix)})
        return [_kv(d) for d in data.get("kvs") or []], int(data["header"]["revision"])

    async def create(self, key: str, value: bytes, lease: int) -> tuple[bool, KeyValue | None, int]:
        put: dict[str, Any] = {"key": b64(key), "value": b64(value)}
        if lease:
            put["lease"] = str(lease)
        data = await self._post(
            "/kv/txn",
            {
                "compare": [{"key": b64(key), "result": "EQUAL", "target": "CREATE", "create_revision": "0"}],
                "success": [{"request_put": put}],
                "failure": [{"request_range": {"key": b64(key)}}],
            },
        )
        rev = int(data["header"]["revision"])
        if data.get("succeeded"):
            return True, None, rev
        kvs = ((data.get("responses") or [{}])[0].get("response_range") or {}).get("kvs") or []
        return False, (_kv(kvs[0]) if kvs else None), rev

    async def delete_if_created(self, key: str, create_revision: int) -> bool:
        data = await self._post(
            "/kv/txn",
            {
                "compare": [
                    {"key": b64(key), "result": "EQUAL", "target": "CREATE", "create_revision": str(create_revision)}
                ],
                "success": [{"request_delete_range": {"key": b64(key)}}],
            },
        )
        return bool(data.get("succeeded"))

    async def compact(self, revision: int) -> None:
        await self._post("/kv/compaction", {"revision": str(revision), "physical": True})

    # ------------------------------------------------------------------ watch

    @asynccontextmanager
    async def watch(
        self, key: str, *, prefix: bool, start_revision: int
    ) -> AsyncIterator[AsyncIterator[list[WatchEvent]]]:
        req: dict[str, Any] = {"key": b64(key), "start_revision": str(max(0, start_revision))}
        if prefix:
            req["range_end"] = prefix_end(key)
        ep = self._order()[0]
        if ep not in self._api:  # learn which gateway prefix this endpoint routes
            await self._post("/kv/range", {"key": b64(key), "limit": 1})
            ep = self._order()[0]
        api = self._api.get(ep, PREFIXES[0])
        timeout = httpx.Timeout(self.timeout, read=None)  # a watch waits for events as long as it takes
        try:
            with trio.fail_after(self.timeout):
                cm = self._client.stream("POST", f"{ep}{api}/watch", json={"create_request": req}, timeout=timeout)
                resp = await cm.__aenter__()
        except (httpx.HTTPError, trio.TooSlowError) as exc:
            if len(self.endpoints) > 1:
                self._current = (self._current + 1) % len(self.endpoints)
            raise Unavailable(f"etcd watch at {ep}: {exc or type(exc).__name__}") from None
        try:
            if resp.status_code != 200:
                await resp.aread()
                raise Unavailable(f"etcd watch at {ep}: HTTP {resp.status_code} {resp.text[:200]}")
            events = _watch_events(resp)
            try:
                yield events
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    await events.aclose()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await cm.__aexit__(None, None, None)


async def _watch_events(resp: httpx.Response) -> AsyncGenerator[list[WatchEvent]]:
    try:
        async for line in resp.aiter_lines():
            if not line.strip():
                continue
            msg = json.loads(line)
            if "error" in msg:
                err = msg["error"]
                raise Unavailable(f"etcd watch: {err.get('message', err) if isinstance(err, dict) else err}")
            res = msg.get("result") or {}
            if int(res.get("compact_revision", 0) or 0):
                raise Compacted(int(res["compact_revision"]))
            if res.get("canceled"):
                raise Unavailable(f"etcd watch cancelled: {res.get('cancel_reason', '')}")
            events = res.get("events") or []
            if events:
                yield [WatchEvent(e.get("type", "PUT"), _kv(e["kv"])) for e in events]
    except (httpx.HTTPError, ValueError) as exc:
        raise Unavailable(f"etcd watch stream: {exc or type(exc).__name__}") from None
    raise Unavailable("etcd watch stream ended")


def _json_or_none(r: httpx.Response) -> dict[str, Any] | None:
    try:
        data = r.json()
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


@asynccontextmanager
async def open_etcd_registry(
    endpoints: list[str],
    *,
    prefix: str = "/marathon/",
    timeout: float = 5.0,
    transport: httpx.AsyncBaseTransport | None = None,
) -> AsyncIterator[KVRegistry]:
    kv = EtcdKV(endpoints, timeout=timeout, transport=transport)
    try:
        yield KVRegistry(kv, prefix=prefix)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await kv.aclose()
