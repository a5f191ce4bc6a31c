"""/v1/tasks: submit, list, read, cancel, answer, and follow a task's events (Server-Sent Events)."""

from __future__ import annotations

import math
import re

import msgspec
import trio
from quart import Blueprint, Response, request

from marathon.errors import InvalidRequest, NotFound, RateLimited, StoreError
from marathon.orchestrator.http import ApiContext, body_as, json_response, owner_filter, principal
from marathon.orchestrator.lifecycle import State, is_terminal
from marathon.orchestrator.tasks import task_topic
from marathon.orchestrator.schemas import Reply
from marathon.store import artifacts
from marathon.store import TaskRecord, TaskRequest
from marathon.store.sqlite import decode_cursor

EVENT_PAGE = 1000
MAX_PAGE = 500  # tasks per page (the OpenAPI document's limit maximum)
MAX_SEQ = 2**63 - 1  # event sequence numbers are 64-bit: a Last-Event-ID beyond is a 400, not a store error
_INT = re.compile(r"[0-9]{1,19}")
_BOOLS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def int_arg(name: str, raw: str | None, *, default: int, low: int, high: int) -> int:
    """A non-negative decimal integer query parameter or header in [low, high], else a 400."""
    if raw is None:
        return default
    value = int(raw) if _INT.fullmatch(raw) else None
    if value is None or not low <= value <= high:
        raise InvalidRequest(f"{name} must be an integer from {low} to {high}, not {raw[:30]!r}")
    return value


def bool_arg(name: str, raw: str | None, *, default: bool) -> bool:
    if raw is None:
        return default
    try:
        return _BOOLS[raw.lower()]
    except KeyError:
        raise InvalidRequest(f"{name} must be true or false, not {raw[:30]!r}") from None


SHUTDOWN_NOTE = b"retry: 1000\n: the orchestrator is shutting down; resume with Last-Event-ID\n\n"


def task_json(rec: TaskRecord) -> dict:
    d = msgspec.to_builtins(rec)
    d.pop("last_node_seq", None)
    if rec.state == State.NEEDS_INPUT:
        d["question"] = rec.message
    d["terminal"] = is_terminal(rec.state)
    d["duration_s"] = (rec.finished_at or 0) - rec.started_at if rec.started_at and rec.finished_at else None
    return d


def blueprint(ctx: ApiContext) -> Blueprint:
    bp = Blueprint("tasks", __name__)

    @bp.post("/v1/tasks")
    async def submit():
        p = await principal(ctx)
        req = await body_as(TaskRequest)
        key = request.headers.get("Idempotency-Key")
        if key is not None and (done := await ctx.tasks.replay(p.user, req, key)) is not None:
            return json_response(task_json(done), 201, {"Idempotent-Replayed": "true"})
        retry = await ctx.limiter.take(f"submit:{p.user}", rate=ctx.submit_rate / 60.0, burst=ctx.submit_burst)
        if retry:
            raise RateLimited(f"too many submissions; try again in {math.ceil(retry)}s", retry)
        up = ctx.nodes.connected()
        if up and not any(s.capacity.api_key for s in up):
            raise InvalidRequest(
                "no Anthropic API key is configured: set MARATHON_ANTHROPIC_API_KEY for the node "
                "(environment, .env or marathon.toml) and restart it"
            )
        rec, replayed = await ctx.tasks.submit(p.user, req, admin=p.admin, idempotency_key=key)
        return json_response(task_json(rec), 201, {"Idempotent-Replayed": "true"} if replayed else None)

    @bp.get("/v1/tasks")
    async def list_tasks():
        p = await principal(ctx)
        states: list[str] = []
        for value in request.args.getlist("state"):
            for s in value.split(","):
                try:
                    states.append(State(s).value)
                except ValueError:
                    raise InvalidRequest(f"unknown state {s[:50]!r}; states are {', '.join(State)}") from None
        limit = int_arg("limit", request.args.get("limit"), default=50, low=1, high=MAX_PAGE)
        cursor = request.args.get("cursor")
        try:
            if cursor is not None:
                decode_cursor(cursor)  # a malformed or out-of-range cursor is a 400 before any query
            recs, nxt = await ctx.tasks.store.list_tasks(
                owner=owner_filter(p), states=states or None, cursor=cursor or None, limit=limit
            )
        except StoreError as exc:
            raise InvalidRequest(str(exc)) from None
        return json_response({"tasks": [task_json(r) for r in recs], "next_cursor": nxt})

    @bp.get("/v1/tasks/<task_id>")
    async def get_task(task_id: str):
        p = await principal(ctx)
        return json_response(task_json(await ctx.tasks.get(task_id, owner=owner_filter(p))))

    @bp.post("/v1/tasks/<task_id>/cancel")
    async def cancel(task_id: str):
        p = await principal(ctx)
        rec = await ctx.tasks.cancel(task_id, owner=owner_filter(p), send_cancel=ctx.send_cancel)
        return json_response(task_json(rec), 202)

    @bp.get("/v1/tasks/<task_id>/diff")
    async def diff(task_id: str):
        p = await principal(ctx)
        await ctx.tasks.get(task_id, owner=owner_filter(p))
        data = await ctx.tasks.store.get_artifact(task_id, "diff") or b""
        return Response(data, content_type="text/x-diff; charset=utf-8")

    @bp.get("/v1/tasks/<task_id>/bundle")
    async def bundle(task_id: str):
        p = await principal(ctx)
        await ctx.tasks.get(task_id, owner=owner_filter(p))
        store = ctx.tasks.store
        found = await artifacts.manifest(store, task_id, "bundle")
        if found is None:
            raise NotFound(f"task {task_id} has no commits")
        # streamed a part at a time: a bundle of max_artifact bytes is never held whole
        return Response(
            artifacts.read_parts(store, task_id, "bundle", found),
            content_type="application/octet-stream",
            headers={"Content-Length": str(artifacts.size_of(found))},
        )

    @bp.post("/v1/tasks/<task_id>/reply")
    async def reply(task_id: str):
        p = await principal(ctx)
        body = await body_as(Reply)
        rec = await ctx.tasks.reply(task_id, body.answer, owner=owner_filter(p))
        return json_response(task_json(rec), 202)

    @bp.get("/v1/tasks/<task_id>/events")
    async def events(task_id: str):
        p = await principal(ctx)
        await ctx.tasks.get(task_id, owner=owner_filter(p))
        # both are checked (a bad one is a 400 even beside a good one); the header wins
        query_after = int_arg("after", request.args.get("after"), default=0, low=0, high=MAX_SEQ)
        after = int_arg("Last-Event-ID", request.headers.get("Last-Event-ID"), default=query_after, low=0, high=MAX_SEQ)
        follow = bool_arg("follow", request.args.get("follow"), default=True)
        resp = Response(
            event_stream(ctx, task_id, after, follow),
            content_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        resp.timeout = None
        return resp

    return bp


async def _changed_or_stopping(ctx: ApiContext, watch, timeout: float) -> str:
    """Wait for the task's topic to change, the orchestrator to stop, or ``timeout``."""
    woke = "timeout"
    with trio.move_on_after(timeout):
        async with trio.open_nursery() as nursery:

            async def wait(what: str, fn) -> None:
                nonlocal woke
                await fn()
                woke = what
                nursery.cancel_scope.cancel()

            nursery.start_soon(wait, "changed", watch.wait)
            nursery.start_soon(wait, "stopping", ctx.stopping.wait)
    return woke


async def event_stream(ctx: ApiContext, task_id: str, after: int, follow: bool):
    """Replay from the store after ``after``, then follow; ends when the task is terminal, or
    cleanly (with a note to resume) when the orchestrator shuts down."""
    store = ctx.tasks.store
    async with ctx.bus.watch(task_topic(task_id)) as watch:
        while True:
            watch.arm()
            evs = await store.events_after(task_id, after, EVENT_PAGE)
            if evs:
                chunks = []
                for e in evs:
                    chunks.append(b"id: %d\nevent: %s\ndata: %s\n\n" % (e.seq, e.kind.encode(), e.data))
                    after = e.seq
                yield b"".join(chunks)
                if len(evs) == EVENT_PAGE:
                    continue
            rec = await store.get_task(task_id)
            if rec is None or (is_terminal(rec.state) and rec.last_seq <= after):
                return
            if not follow:
                return
            if ctx.stopping.is_set():
                yield SHUTDOWN_NOTE
                return
            woke = await _changed_or_stopping(ctx, watch, ctx.keepalive)
            if woke == "timeout":
                yield b": keepalive\n\n"
