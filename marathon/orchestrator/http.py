"""What the API's blueprints share: their context, JSON responses and errors, request bodies,
and who is asking."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
import trio
from quart import Quart, Response, request

from marathon.bus import Bus
from marathon.bus.ratelimit import RateLimiter
from marathon.logs import bind_log_context
from marathon.errors import (
    AuthError,
    Conflict,
    Forbidden,
    InvalidRequest,
    MarathonError,
    NotFound,
    RateLimited,
    StoreError,
    Unavailable,
)
from marathon.orchestrator.auth import Accounts, Principal
from marathon.orchestrator.cluster import Cluster
from marathon.orchestrator.metrics import OrchestratorMetrics
from marathon.orchestrator.identity import NodeIdentities
from marathon.orchestrator.nodes import NodeRegistry
from marathon.orchestrator.tasks import TaskService

MAX_BODY = 8 * 1024 * 1024  # a 1 MiB prompt of non-ASCII text, \u-escaped, fits
_json = msgspec.json.Encoder()
T = TypeVar("T")

STATUS: dict[type[MarathonError], int] = {
    AuthError: 401,
    Forbidden: 403,
    NotFound: 404,
    InvalidRequest: 400,
    Conflict: 409,
    RateLimited: 429,
    StoreError: 503,
    Unavailable: 503,
}


@dataclass
class ApiContext:
    tasks: TaskService
    nodes: NodeRegistry
    bus: Bus
    send_cancel: Callable[[str, str], Awaitable[bool]]
    accounts: Accounts
    limiter: RateLimiter
    # set_drain(node_id, draining): tell a node to take no new tasks (or to take them again)
    set_drain: Callable[[str, bool], Awaitable[None]] | None = None
    # node identities: join tokens, and revoke(node_id) -> whether it had a credential
    identities: NodeIdentities | None = None
    revoke_node: Callable[[str], Awaitable[bool]] | None = None
    submit_rate: float = 60.0  # per minute
    submit_burst: int = 20
    keepalive: float = 15.0
    # set when the orchestrator shuts down: event streams end cleanly (clients resume with Last-Event-ID)
    stopping: trio.Event = field(default_factory=trio.Event)
    # /readyz: name -> check that raises when that part is not ready (the store is always checked)
    ready_checks: dict[str, Callable[[], Awaitable[None]]] = field(default_factory=dict)
    ready_timeout: float = 5.0
    cluster: Cluster | None = None  # this replica among the others (/v1/cluster)
    metrics: OrchestratorMetrics | None = None  # GET /metrics (404 without)


def json_response(data: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(_json.encode(data), status=status, content_type="application/json", headers=headers)


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> Response:
    return json_response({"error": {"code": code, "message": message}}, status, headers)


def _integral_floats_as_ints(value: Any) -> Any:
    """JSON Schema's integer includes 2.0: so does the API (msgspec alone refuses a float
    for an int).  A float field takes the int back as it was."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _integral_floats_as_ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral_floats_as_ints(v) for v in value]
    return value


async def body_as(type_: type[T]) -> T:
    """The request body as ``type_`` (an absent body is ``{}``): 400 with msgspec's reason."""
    raw = await request.get_data()
    try:
        return msgspec.json.decode(raw or b"{}", type=type_)
    except msgspec.ValidationError as exc:
        if b"." not in raw and b"e" not in raw.lower():
            raise InvalidRequest(f"invalid request body: {exc}") from None
        # maybe a float written for an integer (2.0): decode loosely, then convert strictly
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    try:
        return msgspec.convert(_integral_floats_as_ints(msgspec.json.decode(raw)), type=type_)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"invalid request body: {exc}") from None


async def principal(ctx: ApiContext) -> Principal:
    p = await ctx.accounts.authenticate(request.headers.get("Authorization"), request.headers.get("X-Api-Key"))
    bind_log_context(user=p.user, task_id=(request.view_args or {}).get("task_id"))
    return p


async def administrator(ctx: ApiContext, what: str) -> Principal:
    p = await principal(ctx)
    if not p.admin:
        raise Forbidden(f"only an administrator can {what}")
    return p


def owner_filter(p: Principal) -> str | None:
    """Whose tasks a principal sees: administrators everyone's, users their own."""
    return None if p.admin else p.user


def register_error_handlers(app: Quart) -> None:
    @app.before_request
    async def _read_body() -> None:
        """Read every request's body (at most MAX_BODY, else 413) before its handler or a
        routing error answers: a keep-alive connection whose unread body stays on the wire
        stalls the next request on it (seen with 405s to bodies schemathesis sent).  Handlers
        that decode a body get it from the cache."""
        await request.get_data()

    @app.errorhandler(MarathonError)
    async def _marathon_error(exc: MarathonError):
        status = next((s for cls, s in STATUS.items() if isinstance(exc, cls)), 500)
        headers = {}
        if isinstance(exc, RateLimited):
            headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
        elif isinstance(exc, AuthError):
            headers["WWW-Authenticate"] = 'Bearer realm="marathon"'
        return error_response(status, exc.code, str(exc), headers)

    @app.errorhandler(404)
    async def _not_found(exc):
        return error_response(404, "not_found", "no such endpoint")

    @app.errorhandler(405)
    async def _bad_method(exc):
        allowed = ", ".join(sorted(getattr(exc, "valid_methods", None) or []))  # RFC 9110: 405 carries Allow
        return error_response(
            405, "method_not_allowed", f"method not allowed on this endpoint (allowed: {allowed})", {"Allow": allowed}
        )

    @app.errorhandler(413)
    async def _too_large(exc):
        # the unread body is still on the wire: this connection cannot be reused
        return error_response(413, "too_large", f"request body exceeds {MAX_BODY} bytes", {"Connection": "close"})
