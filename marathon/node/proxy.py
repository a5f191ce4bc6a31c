"""The metering proxy: Claude Code's API calls from inside a sandbox arrive here (through
the agent's tunnel), are authenticated with the task's token, get the real key, go to the
upstream, and stream back byte for byte while their usage is read.

h11 rather than hypercorn: connections arrive as tunnel streams, not sockets, and the proxy
must pass the upstream's bytes through unchanged as they arrive — a plain HTTP/1.1 state
machine over any trio Stream does both with no ASGI layer in between.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
from dataclasses import dataclass
from collections.abc import Callable

import h11
import httpx
import trio

from marathon.node.budget import Budget, Reservation
from marathon.node.meter import UsageMeter
from marathon.protocol.messages import Usage

log = logging.getLogger("marathon.proxy")

MAX_BODY = 32 * 1024 * 1024
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "accept-encoding",
}
ALLOWED_PATHS = ("/v1/messages", "/v1/messages/count_tokens")
_QUERY = re.compile(r"[A-Za-z0-9_.~=&%-]*")
DRAIN_LIMIT = 16 * 1024 * 1024  # after the client left: read at most this much more to meter
DRAIN_TIME = 120.0


@dataclass
class RequestRecord:
    task_id: str
    path: str
    model: str | None
    status: int
    usage: Usage
    tool_calls: int
    request_bytes: int
    response_bytes: int
    duration_s: float
    ttft_s: float | None
    streamed: bool
    complete: bool
    error: str | None = None


@dataclass
class ProxyGrant:
    """What one task may do through the proxy.  With a ``budget``, every request reserves
    before it is forwarded and settles when its response ends (see marathon/node/budget.py
    for the rule and the bound); ``on_record`` is called after the settlement."""

    task_id: str
    token: str
    on_record: Callable[[RequestRecord], None]
    budget: Budget | None = None
    expires_at: float | None = None


def _error_body(kind: str, message: str) -> bytes:
    return json.dumps({"type": "error", "error": {"type": kind, "message": message}}).encode()


class MeteringProxy:
    def __init__(
        self,
        upstream: str,
        api_key: str,
        *,
        client: httpx.AsyncClient | None = None,
        max_body: int = MAX_BODY,
        timeout: float = 600.0,
    ):
        self.upstream = upstream.rstrip("/")
        self._base = httpx.URL(self.upstream)
        self._api_key = api_key
        self.max_body = max_body
        self.observe: Callable[[RequestRecord], None] | None = None  # every forwarded request (metrics)
        self._client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=30.0),
            follow_redirects=False,
            trust_env=False,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def handle(self, stream: trio.abc.Stream, grant: ProxyGrant) -> None:
        """Serve HTTP/1.1 requests on one connection until it closes."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        try:
            while True:
                req, body = await self._read_request(conn, stream)
                if req is None:
                    return
                await self._serve_one(conn, stream, grant, req, body)
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                try:
                    conn.start_next_cycle()
                except h11.ProtocolError:
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError) as exc:
            log.debug("proxy connection for %s ended: %s", grant.task_id, exc)
        except Exception:  # whatever a sandbox sends, it costs it this connection and nothing more
            log.exception("proxy: unexpected error on a connection of task %s; closing it", grant.task_id)
        finally:
            await trio.aclose_forcefully(stream)

    def upstream_url(self, target: str) -> httpx.URL | None:
        """The upstream URL for a request target, or None when the target is not one we proxy.
        Only the exact Messages API paths, with a plain query; the host is always the upstream's."""
        path, _, query = target.partition("?")
        if path not in ALLOWED_PATHS or not _QUERY.fullmatch(query):
            return None
        url = self._base.copy_with(path=self._base.path.rstrip("/") + path, query=query.encode() or None)
        if (url.scheme, url.host, url.port) != (self._base.scheme, self._base.host, self._base.port):
            return None
        return url

    async def _next(self, conn: h11.Connection, stream: trio.abc.Stream):
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(65536)))
                continue
            return event

    async def _read_request(self, conn, stream):
        try:
            event = await self._next(conn, stream)
        except h11.RemoteProtocolError as exc:
            await self._send_simple(conn, stream, exc.error_status_hint, "invalid_request_error", str(exc))
            return None, b""
        if isinstance(event, (h11.ConnectionClosed,)) or event is h11.PAUSED:
            return None, b""
        if not isinstance(event, h11.Request):
            return None, b""
        declared = next((int(v) for k, v in event.headers if k == b"content-length" and v.isdigit()), None)
        if declared is not None and declared > self.max_body:
            await self._send_simple(
                conn,
                stream,
                413,
                "request_too_large",
                f"request body exceeds {self.max_body} bytes",
                extra=[("connection", "close")],
            )
            await self._discard(stream, declared)
            return None, b""
        body = bytearray()
        while True:
            ev = await self._next(conn, stream)
            if isinstance(ev, h11.Data):
                body += ev.data
                if len(body) > self.max_body:
                    await self._send_simple(
                        conn,
                        stream,
                        413,
                        "request_too_large",
                        f"request body exceeds {self.max_body} bytes",
                        extra=[("connection", "close")],
                    )
                    await self._discard(stream, self.max_body)
                    return None, b""
            elif isinstance(ev, h11.EndOfMessage):
                return event, bytes(body)
            else:
                return None, b""

    @staticmethod
    async def _discard(stream: trio.abc.Stream, limit: int) -> None:
        """Read (and drop) what the client is still sending before we close, so the kernel
        does not answer its unread bytes with a reset that destroys our error response."""
        got = 0
        with trio.move_on_after(2):
            while got < limit:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                got += len(chunk)

    async def _send_simple(self, conn, stream, status: int, kind: str, message: str, extra=()) -> None:
        body = _error_body(kind, message)
        headers = [("content-type", "application/json"), ("content-length", str(len(body))), *extra]
        try:
            await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
            await stream.send_all(conn.send(h11.Data(data=body)))
            await stream.send_all(conn.send(h11.EndOfMessage()))
        except h11.LocalProtocolError:
            pass

    async def _serve_one(self, conn, stream, grant: ProxyGrant, req: h11.Request, body: bytes) -> None:
        target = req.target.decode("latin-1")
        path = target.split("?", 1)[0]
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in req.headers}
        presented = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not presented or not hmac.compare_digest(presented.encode(), grant.token.encode()):
            log.warning("proxy: task %s presented a wrong API token", grant.task_id)
            return await self._send_simple(conn, stream, 401, "authentication_error", "invalid task token")
        if grant.expires_at is not None and time.time() > grant.expires_at:
            return await self._send_simple(conn, stream, 401, "authentication_error", "task token expired")
        url = self.upstream_url(target) if req.method == b"POST" else None
        if url is None:
            return await self._send_simple(
                conn, stream, 404, "not_found_error", f"{req.method.decode()} {path[:200]} is not proxied"
            )
        try:
            parsed = json.loads(body) if body else None
        except (ValueError, RecursionError):
            parsed = None
        if not isinstance(parsed, dict):
            parsed = {}
        is_stream = bool(parsed.get("stream"))
        model = parsed.get("model") if isinstance(parsed.get("model"), str) else None
        fwd = [(k, v) for k, v in headers.items() if k not in HOP_BY_HOP and k not in ("x-api-key", "authorization")]
        fwd += [("x-api-key", self._api_key), ("accept-encoding", "identity")]
        started = time.monotonic()
        status, sent, ttft, complete, error = 502, 0, None, False, None
        client_gone = False

        async def deliver(data: bytes) -> None:
            """To the client while it listens; after it left, keep metering (bounded): the
            upstream bills the whole answer whether or not the sandbox reads it."""
            nonlocal client_gone
            if client_gone:
                return
            try:
                await stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                client_gone = True

        meter = UsageMeter()
        res: Reservation | None = None
        if grant.budget is not None:
            # count_tokens is free: it reserves nothing, but is refused too once the budget is reached
            got = grant.budget.reserve(model, 0 if path.endswith("/count_tokens") else parsed.get("max_tokens"))
            if isinstance(got, str):
                return await self._send_simple(conn, stream, 402, "budget_exhausted", got)
            res = got
            res.live = lambda: meter.usage
        try:  # from here on, the finally clause settles the reservation whatever happens
            async with self._client.stream("POST", url, content=body, headers=fwd) as resp:
                status = resp.status_code
                out_headers = [
                    (k, v)
                    for k, v in resp.headers.multi_items()
                    if k.lower() not in HOP_BY_HOP and k.lower() != "content-encoding"
                ]
                await deliver(
                    conn.send(h11.Response(status_code=status, headers=out_headers, reason=resp.reason_phrase.encode()))
                )
                nonstream = bytearray()
                ctype = resp.headers.get("content-type", "")
                drained = 0
                with trio.move_on_after(DRAIN_TIME) as drain_scope:
                    drain_scope.deadline = float("inf")
                    async for chunk in resp.aiter_raw():
                        if ttft is None:
                            ttft = time.monotonic() - started
                        sent += len(chunk)
                        if "text/event-stream" in ctype:
                            meter.feed(chunk)
                        elif len(nonstream) < 8 * 1024 * 1024:
                            nonstream += chunk
                        if client_gone:
                            drained += len(chunk)
                            if drained > DRAIN_LIMIT:
                                break
                            if drain_scope.deadline == float("inf"):
                                drain_scope.deadline = trio.current_time() + DRAIN_TIME
                        await deliver(conn.send(h11.Data(data=chunk)))
                if nonstream and "json" in ctype:
                    try:
                        meter.message(json.loads(nonstream))
                    except (ValueError, RecursionError, AttributeError):
                        pass
                await deliver(conn.send(h11.EndOfMessage()))
                complete = not client_gone
                if client_gone:
                    raise trio.BrokenResourceError("the client left; the answer was metered to its end")
        except httpx.HTTPError as exc:
            error = f"upstream: {type(exc).__name__}: {exc}"
            log.warning("proxy: task %s: %s", grant.task_id, error)
            if status == 502 and sent == 0 and conn.our_state is h11.SEND_RESPONSE:
                if res is not None and grant.budget is not None:
                    # nothing was used: release before answering, so whoever sees the 502 sees nothing held
                    grant.budget.settle(res, meter.usage, meter.model or model)
                await self._send_simple(conn, stream, 502, "api_error", "upstream unreachable")
            else:
                raise trio.BrokenResourceError(error) from None  # cut the client off mid-stream
        finally:
            if res is not None and grant.budget is not None:
                grant.budget.settle(res, meter.usage, meter.model or model)
            rec = RequestRecord(
                task_id=grant.task_id,
                path=path,
                model=meter.model,
                status=status,
                usage=meter.usage,
                tool_calls=meter.tool_calls,
                request_bytes=len(body),
                response_bytes=sent,
                duration_s=time.monotonic() - started,
                ttft_s=ttft,
                streamed=is_stream,
                complete=complete and (meter.saw_stop or not is_stream),
                error=error or meter.error,
            )
            grant.on_record(rec)
            if self.observe is not None:
                self.observe(rec)
