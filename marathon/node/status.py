"""The node's local status port (``metrics_listen``): ``/metrics`` (Prometheus text format),
``/healthz`` (alive) and ``/readyz`` (connected to the orchestrator's gateway, the sandbox
backend usable).  GET only, no credentials: bind it to loopback or a management network.

A few routes answered from memory: a plain HTTP/1.1 state machine (h11, as the metering proxy
uses) over trio's listeners, no ASGI stack.  Every read has a timeout; a connection that
misbehaves costs itself and nothing else.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from collections.abc import Callable
from typing import TYPE_CHECKING

import h11
import trio

from marathon import __version__
from marathon.config import parse_listen
from marathon.errors import ConfigError
from marathon.metrics import CONTENT_TYPE

if TYPE_CHECKING:
    from marathon.node.service import NodeService

log = logging.getLogger("marathon.node")

READ_TIMEOUT = 10.0  # a request must arrive whole within this long
IDLE_TIMEOUT = 75.0  # a kept-alive connection with nothing more to ask is closed after this
MAX_CONNECTIONS = 64


Route = Callable[[], tuple[int, str, bytes]]  # -> status, content type, body


def status_routes(
    node_id: str, scrape: Callable[[], bytes], checks: dict[str, Callable[[], str | None]]
) -> dict[str, Route]:
    """The routes: ``checks`` maps a name to a function returning why that part is not ready (or None)."""

    def healthz() -> tuple[int, str, bytes]:
        return 200, "application/json", json.dumps({"ok": True, "version": __version__, "node_id": node_id}).encode()

    def readyz() -> tuple[int, str, bytes]:
        results = {}
        for name, check in checks.items():
            try:
                problem = check()
            except Exception as exc:  # a check that breaks says "not ready", never takes the port down
                problem = f"check failed: {exc}"
            if problem:
                log.info("readyz: %s is not ready: %s", name, problem)
            results[name] = "failed" if problem else "ok"
        ready = all(v == "ok" for v in results.values())
        return 200 if ready else 503, "application/json", json.dumps({"ready": ready, "checks": results}).encode()

    def metrics() -> tuple[int, str, bytes]:
        return 200, CONTENT_TYPE, scrape()

    return {"/healthz": healthz, "/readyz": readyz, "/metrics": metrics}


def node_routes(service: NodeService) -> dict[str, Route]:
    """The node's: ready when connected to the orchestrator and its sandboxes can start."""

    def gateway() -> str | None:
        return None if service.connected.is_set() else "not connected to the orchestrator"

    return status_routes(
        service.node_id, service.metrics.scrape, {"gateway": gateway, "sandbox": service.metrics.sandbox_problem}
    )


async def _respond(stream: trio.abc.Stream, conn: h11.Connection, status: int, ctype: str, body: bytes, *, head: bool):
    headers = [("content-type", ctype), ("content-length", str(len(body))), ("cache-control", "no-store")]
    if status == 405:
        headers.append(("allow", "GET, HEAD"))
    reason = HTTPStatus(status).phrase.encode() if status in HTTPStatus._value2member_map_ else b""
    await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers, reason=reason)))
    if not head:
        await stream.send_all(conn.send(h11.Data(data=body)))
    await stream.send_all(conn.send(h11.EndOfMessage()))


async def _next_event(conn: h11.Connection, stream: trio.abc.Stream, timeout: float):
    with trio.fail_after(timeout):
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            conn.receive_data(bytes(await stream.receive_some(16384)))


async def handle_connection(stream: trio.abc.Stream, routes: dict[str, Route]) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
    try:
        first = True
        while True:
            event = await _next_event(conn, stream, READ_TIMEOUT if first else IDLE_TIMEOUT)
            first = False
            if not isinstance(event, h11.Request):
                return
            while not isinstance(await _next_event(conn, stream, READ_TIMEOUT), h11.EndOfMessage):
                pass  # a body is not expected: read and drop it
            method, path = event.method.decode(), event.target.decode("latin-1").split("?", 1)[0]
            route = routes.get(path)
            if route is None:
                status, ctype, body = (
                    404,
                    "application/json",
                    b'{"error":{"code":"not_found","message":"no such endpoint"}}',
                )
            elif method not in ("GET", "HEAD"):
                status, ctype, body = (
                    405,
                    "application/json",
                    b'{"error":{"code":"method_not_allowed","message":"GET only"}}',
                )
            else:
                status, ctype, body = route()
            await _respond(stream, conn, status, ctype, body, head=method == "HEAD")
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()
    except h11.RemoteProtocolError as exc:
        try:
            body = json.dumps({"error": {"code": "bad_request", "message": str(exc)}}).encode()
            await _respond(stream, conn, exc.error_status_hint, "application/json", body, head=False)
        except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
        pass
    except OSError as exc:
        log.debug("status port: connection ended: %s", exc)
    finally:
        await trio.aclose_forcefully(stream)


async def serve_status(listen: str, routes: dict[str, Route], *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``routes`` on ``listen`` until cancelled; ``task_status.started`` gets the URL."""
    host, port = parse_listen(listen)
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise ConfigError(f"metrics_listen {listen}: cannot listen: {exc}") from None
    sockname = listeners[0].socket.getsockname()
    shown = f"[{sockname[0]}]" if ":" in sockname[0] else sockname[0]
    url = f"http://{shown}:{sockname[1]}"
    limit = trio.CapacityLimiter(MAX_CONNECTIONS)

    async def handler(stream: trio.SocketStream) -> None:
        async with limit:
            await handle_connection(stream, routes)

    log.info("node status (metrics, healthz, readyz) on %s", url)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        task_status.started(url)
