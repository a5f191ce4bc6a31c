"""A scripted fake of the Anthropic Messages API, good enough to drive the real Claude Code CLI.

Pure trio + h11, so tests control the wire: answer, fail, hang, or cut the TCP connection.

    async with open_fake_anthropic([tool_use("Write", {...}), text("done")]) as fake:
        env["ANTHROPIC_BASE_URL"] = fake.url + "/any/prefix"
        ...run claude -p ...
        assert fake.usage_sent == {k: result["usage"][k] for k in USAGE_FIELDS}

Routing: ``POST <any prefix>/v1/messages`` (query ignored; Claude Code sends ``?beta=true``) is
the Messages API, ``POST <any prefix>/v1/messages/count_tokens`` answers a token count, anything
else is a 404 JSON error.  With ``api_key`` set, a wrong or missing ``x-api-key`` is a 401
``authentication_error``.

Script: a list of turns, or a callable ``(request_body, index) -> Turn``.  The index of a
request is the number of assistant messages already in its ``messages`` -- stateless, so a
retry gets the same turn again.  Past the end of a list (or when the callable raises) the fake
answers 400 ``invalid_request_error`` and appends the reason to ``.errors``.  (Claude Code
answers a 400 by re-sending without some betas: expect up to 6 identical-turn requests.)
A subagent (Agent tool) conversation starts again at index 0; ``RecordedRequest.subagent``
and ``is_subagent_request`` recognise it (``cc_is_subagent=true`` in the system prompt), so a
callable script can answer it differently.

Side requests: a request that is not the agent conversation is answered with a short
``end_turn`` text without consuming the script and recorded in ``.side_requests``.  The agent
loop always sends its tool definitions; auxiliary calls (quota probe ``max_tokens=1``, title /
topic / summary generation on the small model) send none.  So: *main* = non-empty ``tools``
and ``max_tokens > 1``; everything else is *side*.  This depends neither on the model (the
agent may run on Haiku) nor on prompt wording that changes between CLI versions; pass
``classify=`` to override.  (Claude Code 2.1.332 ``-p`` with
``CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1`` sends no side requests at all.)

Usage: each turn has its final usage (default input 100, output 20, cache 0/0).  On the wire
``message_start`` carries the input/cache fields with ``output_tokens=1``; ``message_delta.usage``
carries the final ``output_tokens`` plus every field whose start value ``start_usage=`` made
different (to exercise "message_delta overwrites").  ``RecordedRequest.usage`` is what a client
computes from the events that actually went out, so a dropped or stalled stream counts what
arrived; ``usage_sent`` sums it over all requests (side ones too), ``usage_completed`` only over
fully sent responses.  ``drop_after``/``hang_after_start`` act on streamed answers only: the
non-streaming request Claude Code falls back to after failed streams gets the whole message.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import secrets
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

import h11
import trio

USAGE_FIELDS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
SERVER_TOOL_FIELDS = ("web_search_requests", "web_fetch_requests")  # usage.server_tool_use.<field>
DEFAULT_USAGE = dict(zip(USAGE_FIELDS, (100, 20, 0, 0), strict=True))
SIDE_USAGE = dict(zip(USAGE_FIELDS, (10, 5, 0, 0), strict=True))  # answers to side requests
IDLE_TIMEOUT = 300.0  # seconds a keep-alive connection may sit idle


# ---------------------------------------------------------------- turns


@dataclass
class Turn:
    """One scripted answer.  ``kind``: ok | error | hang | hang_after_start | drop."""

    blocks: list[dict] = field(default_factory=list)  # {"type":"text","text"} | {"type":"tool_use",...}
    usage: dict = field(default_factory=lambda: dict(DEFAULT_USAGE))
    start_usage: dict = field(default_factory=dict)  # message_start values differing from final
    kind: str = "ok"
    delay: float = 0.0  # seconds between SSE events
    status: int = 200
    error_type: str = ""
    message: str = ""
    retry_after: float | None = None
    drop_after: int = 0

    @property
    def stop_reason(self) -> str:
        return "tool_use" if any(b["type"] == "tool_use" for b in self.blocks) else "end_turn"


def _turn(blocks, usage, start_usage, delay) -> Turn:
    return Turn(
        blocks=blocks, usage={**DEFAULT_USAGE, **(usage or {})}, start_usage=dict(start_usage or {}), delay=delay
    )


def text(s: str, *, usage: dict | None = None, start_usage: dict | None = None, delay: float = 0.0) -> Turn:
    """A text answer with stop_reason ``end_turn``."""
    return _turn([{"type": "text", "text": s}], usage, start_usage, delay)


def tool_use(
    name: str,
    input: dict,
    *,
    id: str | None = None,
    usage: dict | None = None,
    start_usage: dict | None = None,
    delay: float = 0.0,
) -> Turn:
    """A tool call (stop_reason ``tool_use``); the id is ``toolu_<random>`` unless given."""
    block = {"type": "tool_use", "id": id or "toolu_" + secrets.token_hex(12), "name": name, "input": input}
    return _turn([block], usage, start_usage, delay)


def turn(*parts: Turn | str, usage: dict | None = None, start_usage: dict | None = None, delay: float = 0.0) -> Turn:
    """Several content blocks in one answer: ``turn("Let me look.", tool_use("Bash", {...}))``."""
    blocks = [b for p in parts for b in (text(p).blocks if isinstance(p, str) else p.blocks)]
    return _turn(blocks, usage, start_usage, delay)


def web_search(query: str, answer: str, *, searches: int = 1, usage: dict | None = None, delay: float = 0.0) -> Turn:
    """A server-side web search (``server_tool_use`` + ``web_search_tool_result`` blocks, run by
    the API itself) followed by a text answer; ``usage.server_tool_use`` reports ``searches``."""
    tool_id = "srvtoolu_" + secrets.token_hex(12)
    blocks = [
        {"type": "server_tool_use", "id": tool_id, "name": "web_search", "input": {"query": query}},
        {
            "type": "web_search_tool_result",
            "tool_use_id": tool_id,
            "content": [
                {
                    "type": "web_search_result",
                    "url": "https://example.com/",
                    "title": "Example",
                    "encrypted_content": "e30=",
                    "page_age": None,
                }
            ],
        },
        {"type": "text", "text": answer},
    ]
    t = _turn(blocks, usage, None, delay)
    t.usage["server_tool_use"] = {"web_search_requests": searches}
    return t


def error(status: int, type: str, message: str = "fake error", *, retry_after: float | None = None) -> Turn:
    """An HTTP error with an Anthropic-style JSON body (429 gets ``retry-after``, default 1)."""
    retry_after = 1 if status == 429 and retry_after is None else retry_after
    return Turn(kind="error", status=status, error_type=type, message=message, retry_after=retry_after)


def hang() -> Turn:
    """Read the request, never answer (until the server is cancelled or the client leaves)."""
    return Turn(kind="hang")


def hanging_script():
    """``(script, asked)``: every request hangs, and ``asked`` (a trio.Event) is set once the
    first one has arrived — for tests that act while Claude Code waits on the API."""
    asked = trio.Event()

    def script(body, i):
        asked.set()
        return hang()

    return script, asked


def hang_after_start(**kw) -> Turn:
    """Send the headers and ``message_start`` of a text answer, then stall."""
    return Turn(kind="hang_after_start", blocks=[{"type": "text", "text": "..."}], **kw)


def drop_after(n_events: int, then: Turn | None = None) -> Turn:
    """Send the first ``n_events`` SSE events of ``then`` (a text answer) and close the socket."""
    t = then or text("this answer is cut short")
    return Turn(
        kind="drop", blocks=t.blocks, usage=t.usage, start_usage=t.start_usage, delay=t.delay, drop_after=n_events
    )


def turn_from_json(d: dict) -> Turn:
    """``{"text": s}``, ``{"tool_use": {"name", "input"}}``, ``{"turn": [...]}`` (each with optional
    ``usage``/``start_usage``/``delay``), ``{"error": {"status", "type", "message"}}``, ``{"hang": true}``,
    ``{"hang_after_start": true}``, ``{"drop_after": n}``, ``{"web_search": {"query", "answer", "searches"}}``."""
    kw = {k: d[k] for k in ("usage", "start_usage", "delay") if k in d}
    builders = {
        "text": lambda v: text(v, **kw),
        "tool_use": lambda v: tool_use(v["name"], v["input"], **kw),
        "turn": lambda v: turn(*map(turn_from_json, v), **kw),
        "error": lambda v: error(**v),
        "hang": lambda v: hang(),
        "hang_after_start": lambda v: hang_after_start(),
        "drop_after": drop_after,
        "web_search": lambda v: web_search(
            v["query"], v["answer"], searches=v.get("searches", 1), **{k: kw[k] for k in ("usage", "delay") if k in kw}
        ),
    }
    for key, build in builders.items():
        if key in d:
            return build(d[key])
    raise ValueError(f"unknown turn: {d!r}")


DEMO_SCRIPT = [
    tool_use(
        "Write",
        {
            "file_path": "CONTRIBUTING.md",
            "content": "# Contributing\n\n1. Fork the repository.\n2. Make a branch.\n3. Open a pull request.\n",
        },
    ),
    tool_use("Bash", {"command": "git status --short", "description": "Show working tree status"}),
    text("I added CONTRIBUTING.md."),
]


def load_script(name: str) -> list[Turn]:
    """``demo``, a name in ``tests/fake_scripts/`` (without ``.json``), or a path to a JSON list."""
    if name == "demo":
        return list(DEMO_SCRIPT)
    path = Path(name)
    if not path.exists():
        path = Path(__file__).parent / "fake_scripts" / f"{name}.json"
    return [turn_from_json(d) for d in json.loads(path.read_text())]


# ---------------------------------------------------------------- SSE rendering


def sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _chunks(s: str, n: int = 3) -> list[str]:
    size = max(1, -(-len(s) // n))
    return [s[i : i + size] for i in range(0, len(s), size)] or [""]


def message_json(t: Turn, model: str, msg_id: str) -> dict:
    """The complete (non-streaming) message."""
    return {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": t.blocks,
        "stop_reason": t.stop_reason,
        "stop_sequence": None,
        "usage": dict(t.usage),
    }


def sse_events(t: Turn, model: str, msg_id: str) -> list[tuple[str, dict]]:
    """The event sequence of a streamed answer, as the real API sends it (without pings)."""
    start = {**t.usage, **t.start_usage, "output_tokens": t.start_usage.get("output_tokens", 1)}
    if "server_tool_use" in t.usage:  # counted as the answer goes: zero at the start, final in message_delta
        start["server_tool_use"] = dict.fromkeys(t.usage["server_tool_use"], 0)
    msg = {**message_json(t, model, msg_id), "content": [], "stop_reason": None, "usage": start}
    events: list[tuple[str, dict[str, Any]]] = [("message_start", {"type": "message_start", "message": msg})]
    for i, b in enumerate(t.blocks):
        empty: dict[str, Any]
        if b["type"] == "text":
            empty, deltas = (
                {"type": "text", "text": ""},
                [{"type": "text_delta", "text": c} for c in _chunks(b["text"])],
            )
        elif b["type"].endswith("_tool_result"):  # a server tool's result arrives whole
            empty, deltas = b, []
        else:
            empty = {**b, "input": {}}
            deltas = [{"type": "input_json_delta", "partial_json": c} for c in _chunks(json.dumps(b["input"]))]
        events.append(("content_block_start", {"type": "content_block_start", "index": i, "content_block": empty}))
        events += [("content_block_delta", {"type": "content_block_delta", "index": i, "delta": d}) for d in deltas]
        events.append(("content_block_stop", {"type": "content_block_stop", "index": i}))
    delta_usage = {k: t.usage[k] for k in USAGE_FIELDS if k == "output_tokens" or start[k] != t.usage[k]}
    if "server_tool_use" in t.usage:
        delta_usage["server_tool_use"] = dict(t.usage["server_tool_use"])
    events.append(
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": t.stop_reason, "stop_sequence": None},
                "usage": delta_usage,
            },
        )
    )
    events.append(("message_stop", {"type": "message_stop"}))
    return events


# ---------------------------------------------------------------- server


@dataclass
class RecordedRequest:
    method: str
    path: str  # including the query string
    headers: dict[str, str]  # lower-cased names
    body: Any  # parsed JSON, or None
    timestamp: float
    kind: str = "main"  # main | side | count_tokens | rejected
    turn: int | None = None  # script index it was answered with (main requests only)
    status: int | None = None
    usage: dict | None = None  # what the client can compute from what was sent (tokens)
    server_tool_use: dict = field(default_factory=dict)  # and the server-tool counts sent
    completed: bool = False
    subagent: bool = False  # sent by a subagent conversation (see is_subagent_request)


def is_main_request(body: dict) -> bool:
    """See the module docstring: the agent loop sends tools, its side calls do not."""
    return bool(body.get("tools")) and body.get("max_tokens", 2) > 1


def is_subagent_request(body: dict) -> bool:
    """Claude Code marks a subagent's (Agent/Task tool) requests in the billing line of its system prompt."""
    system = body.get("system")
    blocks = system if isinstance(system, list) else [{"text": system or ""}]
    return any("cc_is_subagent=true" in str(b.get("text", "")) for b in blocks if isinstance(b, dict))


def turn_index(body: dict) -> int:
    return sum(1 for m in body.get("messages", []) if m.get("role") == "assistant")


def _sum_usage(records) -> dict:
    records = list(records)
    return {k: sum((r.usage or {}).get(k, 0) for r in records) for k in USAGE_FIELDS}


def tokens(usage: dict) -> dict:
    """The token fields of a usage dict (Marathon's usage also counts server-tool requests)."""
    return {k: usage.get(k, 0) for k in USAGE_FIELDS}


class FakeAnthropic:
    def __init__(self, script, api_key=None, classify=is_main_request):
        self.script = script
        self.api_key = api_key
        self.classify = classify
        self.requests: list[RecordedRequest] = []
        self.errors: list[str] = []  # script exhausted / script raised
        self.url = ""
        self._changed = trio.Event()

    def _touch(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, pred: Callable[[FakeAnthropic], bool]) -> None:
        """Until ``pred(fake)`` holds; it is checked whenever a request arrives or is answered."""
        while not pred(self):
            await self._changed.wait()

    main_requests = property(lambda self: [r for r in self.requests if r.kind == "main"])
    side_requests = property(lambda self: [r for r in self.requests if r.kind in ("side", "count_tokens")])
    usage_sent = property(lambda self: _sum_usage(self.requests))
    usage_completed = property(lambda self: _sum_usage(r for r in self.requests if r.completed))
    server_tools_sent = property(
        lambda self: {k: sum(r.server_tool_use.get(k, 0) for r in self.requests) for k in SERVER_TOOL_FIELDS}
    )

    def pick(self, body: dict) -> tuple[int, Turn]:
        i = turn_index(body)
        try:
            if callable(self.script):
                return i, self.script(body, i)
            if i < len(self.script):
                return i, self.script[i]
            message = f"script exhausted at turn {i}"
        except Exception as exc:  # a broken script must not kill the server; tests check .errors
            message = f"script raised {exc!r} at turn {i}"
        self.errors.append(message)
        return i, error(400, "invalid_request_error", "fake_anthropic: " + message)

    async def handle_connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                with trio.move_on_after(IDLE_TIMEOUT):
                    got = await self._read_request(conn, stream)
                if not got or not await self._respond(conn, stream, *got):
                    return
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await stream.aclose()

    async def _read_request(self, conn, stream):
        req, body = None, bytearray()
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data and conn.their_state is h11.IDLE:
                    return None
                conn.receive_data(data)
            elif isinstance(ev, h11.Request):
                req = ev
            elif isinstance(ev, h11.Data):
                body += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                return req, bytes(body)
            elif isinstance(ev, h11.ConnectionClosed):
                return None

    async def _respond(self, conn, stream, req: h11.Request, raw: bytes) -> bool:
        try:
            return await self._answer(conn, stream, req, raw)
        finally:
            self._touch()

    async def _answer(self, conn, stream, req: h11.Request, raw: bytes) -> bool:
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in req.headers}
        path = req.target.decode("latin-1")
        rec = RecordedRequest(req.method.decode(), path, headers, _parse_body(raw, headers), time.time())
        self.requests.append(rec)
        self._touch()
        route = path.split("?", 1)[0].rstrip("/")

        async def send(status, hdrs=(), data=b"", end=True):
            reason = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else ""
            await stream.send_all(
                conn.send(
                    h11.Response(
                        status_code=status,
                        reason=reason,
                        headers=[("request-id", "req_fake" + secrets.token_hex(8)), *hdrs],
                    )
                )
            )
            rec.status = status
            if data and req.method != b"HEAD":
                await stream.send_all(conn.send(h11.Data(data=data)))
            if end:
                await stream.send_all(conn.send(h11.EndOfMessage()))

        async def send_json(status, obj, hdrs=()):
            data = json.dumps(obj).encode()
            await send(status, [("content-type", "application/json"), ("content-length", str(len(data))), *hdrs], data)

        async def send_error(t: Turn):
            hdrs = [("retry-after", str(t.retry_after))] if t.retry_after is not None else []
            await send_json(t.status, {"type": "error", "error": {"type": t.error_type, "message": t.message}}, hdrs)

        if self.api_key is not None and headers.get("x-api-key") != self.api_key:
            rec.kind = "rejected"
            await send_error(error(401, "authentication_error", "invalid x-api-key"))
            return True
        if req.method != b"POST" or not (route.endswith("/v1/messages") or route.endswith("/v1/messages/count_tokens")):
            rec.kind = "rejected"
            await send_error(error(404, "not_found_error", f"no route for {req.method.decode()} {path}"))
            return True
        if not isinstance(rec.body, dict):
            rec.kind = "rejected"
            await send_error(error(400, "invalid_request_error", "body is not a JSON object"))
            return True
        if route.endswith("/count_tokens"):
            rec.kind, rec.completed = "count_tokens", True
            await send_json(200, {"input_tokens": len(raw) // 4})
            return True

        rec.subagent = is_subagent_request(rec.body)
        if self.classify(rec.body):
            rec.turn, t = self.pick(rec.body)
        else:
            rec.kind, t = "side", text("Fake side answer", usage=SIDE_USAGE)
        model, msg_id = rec.body.get("model", "claude-fake"), "msg_fake" + secrets.token_hex(10)
        if t.kind == "error":
            await send_error(t)
            return True
        if t.kind == "hang":
            return await _wait_for_client_to_leave(stream)
        if not rec.body.get("stream"):
            rec.usage, rec.completed = {k: t.usage[k] for k in USAGE_FIELDS}, True
            rec.server_tool_use = dict(t.usage.get("server_tool_use") or {})
            await send_json(200, message_json(t, model, msg_id))
            return True

        await send(
            200, [("content-type", "text/event-stream; charset=utf-8"), ("cache-control", "no-cache")], end=False
        )
        events = sse_events(t, model, msg_id)
        limit = {"drop": t.drop_after, "hang_after_start": 1}.get(t.kind, len(events))
        for n, (name, data) in enumerate(events[:limit]):
            if n and t.delay:
                await trio.sleep(t.delay)
            await stream.send_all(conn.send(h11.Data(data=sse(name, data))))
            if name == "message_start":
                rec.usage = {k: data["message"]["usage"][k] for k in USAGE_FIELDS}
            elif name == "message_delta":
                assert rec.usage is not None  # message_start came first
                rec.usage.update({k: v for k, v in data["usage"].items() if k in USAGE_FIELDS})
                rec.server_tool_use = dict(data["usage"].get("server_tool_use") or {})
        if t.kind == "hang_after_start":
            return await _wait_for_client_to_leave(stream)
        if t.kind == "drop":
            return False  # caller closes the socket mid-body
        await stream.send_all(conn.send(h11.EndOfMessage()))
        rec.completed = True
        return True


async def _wait_for_client_to_leave(stream) -> bool:
    """Stall: read and discard until the client closes (or we are cancelled)."""
    try:
        while await stream.receive_some(65536):
            pass
    except trio.BrokenResourceError:
        pass
    return False


def _parse_body(raw: bytes, headers: dict) -> Any:
    try:
        if headers.get("content-encoding") == "gzip":  # Claude Code 2.1.332 sends plain JSON
            raw = gzip.decompress(raw)
        return json.loads(raw) if raw else None
    except (ValueError, OSError, RecursionError):
        return None


async def serve_fake_anthropic(
    script,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    api_key: str | None = None,
    classify: Callable[[dict], bool] = is_main_request,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; ``task_status.started(fake)`` once listening."""
    fake = FakeAnthropic(script, api_key, classify)
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound_port = listeners[0].socket.getsockname()[1]
    fake.url = f"http://{host}:{bound_port}"
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, fake.handle_connection, listeners)
        task_status.started(fake)


@asynccontextmanager
async def open_fake_anthropic(script, **kw):
    async with trio.open_nursery() as nursery:
        fake = await nursery.start(lambda task_status: serve_fake_anthropic(script, task_status=task_status, **kw))
        try:
            yield fake
        finally:
            nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tests.fake_anthropic", description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--script", default="demo", help="demo, a name in tests/fake_scripts/, or a JSON file")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--log", action="store_true", help="print every request as it is answered")
    args = ap.parse_args(argv)

    async def run():
        async with open_fake_anthropic(
            load_script(args.script), host=args.host, port=args.port, api_key=args.api_key
        ) as fake:
            print(f"listening on {fake.url}", flush=True)
            if not args.log:
                await trio.sleep_forever()
            for seen in itertools.count():
                await fake.wait_until(lambda f, seen=seen: len(f.requests) > seen)
                r = fake.requests[seen]
                body = r.body if isinstance(r.body, dict) else {}
                print(
                    f"{r.method} {r.path} {r.kind} turn={r.turn} model={body.get('model')} "
                    f"tools={len(body.get('tools') or [])}",
                    flush=True,
                )

    try:
        trio.run(run)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
