"""Client HTTP API (/v1/…), served by hypercorn inside the orchestrator's nursery."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Awaitable, Callable

import msgspec
import trio
from quart import Response, request
from quart_trio import QuartTrio

from marathon import __version__
from marathon.bus import Bus
from marathon.errors import (
    AuthError,
    Conflict,
    Forbidden,
    InvalidRequest,
    MarathonError,
    NotFound,
    RateLimited,
    StoreError,
)
from marathon.bus.ratelimit import RateLimiter
from marathon.logs import bind_log_context
from marathon.orchestrator.auth import Accounts, Principal
from marathon.orchestrator.lifecycle import State, is_terminal
from marathon.orchestrator.nodes import NodeRegistry
from marathon.orchestrator.api_accounts import register_account_routes
from marathon.orchestrator.openapi import openapi_document
from marathon.orchestrator.web import web_blueprint
from marathon.orchestrator.tasks import TaskService, task_topic
from marathon.store import TaskRecord, TaskRequest

log = logging.getLogger("marathon.api")
MAX_BODY = 8 * 1024 * 1024  # a 1 MiB prompt of non-ASCII text, \u-escaped, fits
_json = msgspec.json.Encoder()

STATUS = {
    AuthError: 401,
    Forbidden: 403,
    NotFound: 404,
    InvalidRequest: 400,
    Conflict: 409,
    RateLimited: 429,
    StoreError: 503,
}


@dataclass
class ApiContext:
    tasks: TaskService
    nodes: NodeRegistry
    bus: Bus
    send_cancel: Callable[[str, str], Awaitable[bool]]
    accounts: Accounts
    limiter: RateLimiter
    submit_rate: float = 60.0  # per minute
    submit_burst: int = 20
    keepalive: float = 15.0
    # /readyz: name -> check that raises when that part is not ready (the store is always checked)
    ready_checks: dict[str, Callable[[], Awaitable[None]]] = field(default_factory=dict)
    ready_timeout: float = 5.0


class Reply(msgspec.Struct, forbid_unknown_fields=True):
    answer: str


def task_json(rec: TaskRecord) -> dict:
    d = msgspec.to_builtins(rec)
    d.pop("last_node_seq", None)
    if rec.state == State.NEEDS_INPUT:
        d["question"] = rec.message
    d["terminal"] = is_terminal(rec.state)
    d["duration_s"] = (rec.finished_at or 0) - rec.started_at if rec.started_at and rec.finished_at else None
    return d


def json_response(data: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(_json.encode(data), status=status, content_type="application/json", headers=headers)


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> Response:
    return json_response({"error": {"code": code, "message": message}}, status, headers)


def create_app(ctx: ApiContext) -> QuartTrio:
    app = QuartTrio("marathon")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False

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
        return error_response(405, "method_not_allowed", "method not allowed on this endpoint")

    @app.errorhandler(413)
    async def _too_large(exc):
        # the unread body is still on the wire: this connection cannot be reused
        return error_response(413, "too_large", f"request body exceeds {MAX_BODY} bytes", {"Connection": "close"})

    async def body_as(type_):
        raw = await request.get_data()
        try:
            return msgspec.json.decode(raw or b"{}", type=type_)
        except msgspec.ValidationError as exc:
            raise InvalidRequest(f"invalid request body: {exc}") from None
        except msgspec.DecodeError as exc:
            raise InvalidRequest(f"request body is not valid JSON: {exc}") from None

    async def principal() -> Principal:
        p = await ctx.accounts.authenticate(request.headers.get("Authorization"), request.headers.get("X-Api-Key"))
        bind_log_context(user=p.user, task_id=(request.view_args or {}).get("task_id"))
        return p

    def owner_filter(p: Principal) -> str | None:
        return None if p.admin else p.user

    @app.get("/healthz")
    async def healthz():
        return json_response({"ok": True, "version": __version__, "nodes": len(ctx.nodes.connected())})

    @app.get("/readyz")
    async def readyz():
        """Ready to serve: the store answers and the node gateway listens (200), or 503 with
        what is not ready.  The details of a failure go to the log, not to the caller."""

        async def store_reachable() -> None:
            await ctx.tasks.store.get_task("readyz")

        results = {}
        for name, check in {"store": store_reachable, **ctx.ready_checks}.items():
            try:
                with trio.fail_after(ctx.ready_timeout):
                    await check()
                results[name] = "ok"
            except trio.TooSlowError:
                log.warning("readyz: %s did not answer within %.0fs", name, ctx.ready_timeout)
                results[name] = "timeout"
            except Exception as exc:
                log.warning("readyz: %s is not ready: %s", name, exc)
                results[name] = "failed"
        ready = all(v == "ok" for v in results.values())
        return json_response({"ready": ready, "checks": results}, 200 if ready else 503)

    @app.get("/v1/openapi.json")
    async def openapi():
        return json_response(openapi_document())

    @app.post("/v1/tasks")
    async def submit():
        p = await principal()
        req = await body_as(TaskRequest)
        retry = await ctx.limiter.take(f"submit:{p.user}", rate=ctx.submit_rate / 60.0, burst=ctx.submit_burst)
        if retry:
            raise RateLimited(f"too many submissions; try again in {math.ceil(retry)}s", retry)
        up = ctx.nodes.connected()
        if up and not any(s.capacity.api_key for s in up):
            raise InvalidRequest(
                "no Anthropic API key is configured: set MARATHON_ANTHROPIC_API_KEY for the node "
                "(environment, .env or marathon.toml) and restart it"
            )
        rec = await ctx.tasks.submit(p.user, req, admin=p.admin)
        return json_response(task_json(rec), 201)

    @app.get("/v1/tasks")
    async def list_tasks():
        p = await principal()
        states = [s for s in request.args.getlist("state") for s in s.split(",") if s]
        for s in states:
            try:
                State(s)
            except ValueError:
                raise InvalidRequest(f"unknown state {s!r}; states are {', '.join(State)}") from None
        try:
            limit = min(max(int(request.args.get("limit", "50")), 1), 500)
        except ValueError:
            raise InvalidRequest("limit must be an integer") from None
        cursor = request.args.get("cursor") or None
        try:
            recs, nxt = await ctx.tasks.store.list_tasks(
                owner=owner_filter(p), states=states or None, cursor=cursor, limit=limit
            )
        except StoreError as exc:
            raise InvalidRequest(str(exc)) from None
        return json_response({"tasks": [task_json(r) for r in recs], "next_cursor": nxt})

    @app.get("/v1/tasks/<task_id>")
    async def get_task(task_id: str):
        p = await principal()
        return json_response(task_json(await ctx.tasks.get(task_id, owner=owner_filter(p))))

    @app.post("/v1/tasks/<task_id>/cancel")
    async def cancel(task_id: str):
        p = await principal()
        rec = await ctx.tasks.cancel(task_id, owner=owner_filter(p), send_cancel=ctx.send_cancel)
        return json_response(task_json(rec), 202)

    @app.get("/v1/tasks/<task_id>/diff")
    async def diff(task_id: str):
        p = await principal()
        await ctx.tasks.get(task_id, owner=owner_filter(p))
        data = await ctx.tasks.store.get_artifact(task_id, "diff") or b""
        return Response(data, content_type="text/x-diff; charset=utf-8")

    @app.get("/v1/tasks/<task_id>/bundle")
    async def bundle(task_id: str):
        p = await principal()
        await ctx.tasks.get(task_id, owner=owner_filter(p))
        data = await ctx.tasks.store.get_artifact(task_id, "bundle")
        if data is None:
            raise NotFound(f"task {task_id} has no commits")
        return Response(data, content_type="application/octet-stream")

    @app.post("/v1/tasks/<task_id>/reply")
    async def reply(task_id: str):
        p = await principal()
        body = await body_as(Reply)
        rec = await ctx.tasks.reply(task_id, body.answer, owner=owner_filter(p))
        return json_response(task_json(rec), 202)

    @app.get("/v1/tasks/<task_id>/events")
    async def events(task_id: str):
        p = await principal()
        await ctx.tasks.get(task_id, owner=owner_filter(p))
        raw_after = request.headers.get("Last-Event-ID") or request.args.get("after") or "0"
        try:
            after = int(raw_after)
        except ValueError:
            raise InvalidRequest("Last-Event-ID must be an event sequence number") from None
        follow = request.args.get("follow", "1") not in ("0", "false", "no")
        resp = Response(
            _event_stream(ctx, task_id, after, follow),
            content_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        resp.timeout = None
        return resp

    @app.get("/v1/nodes")
    async def nodes():
        await principal()
        return json_response({"nodes": [s.public() for s in ctx.nodes.sessions.values()]})

    register_account_routes(app, ctx, principal, body_as)
    app.register_blueprint(web_blueprint())
    return app


async def _event_stream(ctx: ApiContext, task_id: str, after: int, follow: bool):
    """Replay from the store after ``after``, then follow; ends when the task is terminal."""
    store = ctx.tasks.store
    async with ctx.bus.watch(task_topic(task_id)) as watch:
        while True:
            watch.arm()
            evs = await store.events_after(task_id, after, 1000)
            if evs:
                chunks = []
                for e in evs:
                    chunks.append(b"id: %d\nevent: %s\ndata: %s\n\n" % (e.seq, e.kind.encode(), e.data))
                    after = e.seq
                yield b"".join(chunks)
                if len(evs) == 1000:
                    continue
            rec = await store.get_task(task_id)
            if rec is None or (is_terminal(rec.state) and rec.last_seq <= after):
                return
            if not follow:
                return
            with trio.move_on_after(ctx.keepalive) as scope:
                await watch.wait()
            if scope.cancelled_caught:
                yield b": keepalive\n\n"
