"""The metering proxy on its own: auth, budgets, limits, pass-through and metering."""

from __future__ import annotations

import httpx
import pytest
import trio

from marathon.node.budget import Budget
from marathon.node.proxy import MeteringProxy, ProxyGrant
from marathon.protocol.messages import Usage
from tests import fake_anthropic as fa

REAL_KEY = "sk-ant-real-" + "r" * 20
TOKEN = "mt_task_token"


class Harness:
    def __init__(self, fake, grant, url, records: list, recorded: trio.Event):
        self.fake, self.grant, self.url = fake, grant, url
        self.records, self.recorded = records, recorded  # what the proxy metered; set at the first record
        self.client = httpx.AsyncClient(base_url=url, trust_env=False, timeout=10)

    async def post(self, body, *, token=TOKEN, path="/v1/messages?beta=true", **kw):
        headers = {"x-api-key": token, "anthropic-version": "2023-06-01", "accept-encoding": "gzip, br"}
        return await self.client.post(path, json=body, headers=headers, **kw)


def body(stream=True, turns=0):
    msgs = [{"role": "user", "content": "hi"}]
    for _ in range(turns):
        msgs += [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}]
    return {
        "model": "claude-sonnet-4-5",
        "max_tokens": 1000,
        "stream": stream,
        "messages": msgs,
        "tools": [{"name": "Bash", "input_schema": {"type": "object"}}],
    }


async def start(nursery, script, *, budget=None, expires_at=None, max_body=1_000_000, prefix=""):
    fake = await nursery.start(
        lambda task_status: fa.serve_fake_anthropic(script, api_key=REAL_KEY, task_status=task_status)
    )
    proxy = MeteringProxy(fake.url + prefix, REAL_KEY, max_body=max_body)
    records: list = []
    recorded = trio.Event()

    def on_record(rec) -> None:
        records.append(rec)
        recorded.set()

    grant = ProxyGrant(task_id="t1", token=TOKEN, on_record=on_record, budget=budget, expires_at=expires_at)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    await nursery.start(trio.serve_listeners, lambda s: proxy.handle(s, grant), listeners)
    return Harness(fake, grant, f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}", records, recorded)


async def test_streams_through_with_the_real_key_and_meters_exactly():
    async with trio.open_nursery() as n:
        h = await start(
            n,
            [
                fa.tool_use(
                    "Bash",
                    {"command": "ls"},
                    usage={"input_tokens": 321, "output_tokens": 45, "cache_read_input_tokens": 9},
                    start_usage={"input_tokens": 999},
                )
            ],
        )
        r = await h.post(body())
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert b"event: message_stop" in r.content
        assert h.fake.requests[0].headers["x-api-key"] == REAL_KEY  # swapped in on the node
        assert h.fake.requests[0].headers["accept-encoding"] == "identity"
        rec = h.records[0]
        assert rec.usage == Usage(321, 45, 0, 9) == Usage(**h.fake.usage_sent)
        assert rec.tool_calls == 1 and rec.model == "claude-sonnet-4-5" and rec.status == 200
        assert rec.complete and rec.streamed and rec.ttft_s is not None and rec.response_bytes == len(r.content)
        n.cancel_scope.cancel()


async def test_path_prefix_and_query_are_kept():
    async with trio.open_nursery() as n:
        h = await start(n, [fa.text("hi")], prefix="/gateway/anthropic")
        r = await h.post(body())
        assert r.status_code == 200
        assert h.fake.requests[0].path == "/gateway/anthropic/v1/messages?beta=true"
        n.cancel_scope.cancel()


async def test_non_streaming_is_metered():
    async with trio.open_nursery() as n:
        h = await start(n, [fa.text("hi", usage={"input_tokens": 7, "output_tokens": 3})])
        r = await h.post(body(stream=False))
        assert r.status_code == 200 and r.json()["type"] == "message"
        assert h.records[0].usage == Usage(7, 3) and not h.records[0].streamed
        n.cancel_scope.cancel()


@pytest.mark.parametrize(
    "status,kind",
    [(429, "rate_limit_error"), (500, "api_error"), (401, "authentication_error"), (529, "overloaded_error")],
)
async def test_upstream_errors_pass_through(status, kind):
    async with trio.open_nursery() as n:
        h = await start(n, [fa.error(status, kind, "upstream says no")])
        r = await h.post(body())
        assert r.status_code == status
        assert r.json()["error"]["type"] == kind and r.json()["error"]["message"] == "upstream says no"
        if status == 429:
            assert r.headers["retry-after"] == "1"
        assert h.records[0].status == status and h.records[0].usage == Usage()
        n.cancel_scope.cancel()


async def test_dropped_upstream_stream_is_metered_for_what_arrived():
    async with trio.open_nursery() as n:
        h = await start(n, [fa.drop_after(3, fa.text("cut short", usage={"input_tokens": 50, "output_tokens": 40}))])
        with pytest.raises(httpx.HTTPError):
            await h.post(body())
        with trio.fail_after(5):
            await h.recorded.wait()
        rec = h.records[0]
        assert not rec.complete and rec.error
        # message_start arrived (input 50, output 1 so far); message_delta never did
        assert rec.usage == Usage(50, 1) == Usage(**h.fake.usage_sent)
        n.cancel_scope.cancel()


async def test_wrong_or_expired_token_is_refused_without_contacting_upstream():
    import time

    async with trio.open_nursery() as n:
        h = await start(n, [fa.text("never")])
        r = await h.post(body(), token="mt_wrong")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = await h.post(body(), token=REAL_KEY)  # even the real key is not a task token
        assert r.status_code == 401
        h.grant.expires_at = time.time() - 1
        r = await h.post(body())
        assert r.status_code == 401 and "expired" in r.json()["error"]["message"]
        assert h.fake.requests == [] and h.records == []
        n.cancel_scope.cancel()


async def test_oversized_body_is_413_and_other_paths_404():
    async with trio.open_nursery() as n:
        h = await start(n, [fa.text("never")], max_body=10_000)
        r = await h.client.post("/v1/messages", content=b"x" * 20_000, headers={"x-api-key": TOKEN})
        assert r.status_code == 413
        r = await h.client.get("/v1/models", headers={"x-api-key": TOKEN})
        assert r.status_code == 404
        r = await h.client.post("/api/hello", headers={"x-api-key": TOKEN})
        assert r.status_code == 404
        assert h.fake.requests == []
        n.cancel_scope.cancel()


async def test_budget_exhausted_answers_402_without_contacting_upstream():
    async with trio.open_nursery() as n:
        spent = Budget(max_tokens=500)
        spent.usage = Usage(400, 200)
        h = await start(n, [fa.text("never")], budget=spent)
        r = await h.post(body())
        assert r.status_code == 402
        assert r.json()["error"]["type"] == "budget_exhausted" and "600 of 500" in r.json()["error"]["message"]
        assert h.fake.requests == []
        n.cancel_scope.cancel()


async def test_keep_alive_serves_several_requests_on_one_connection():
    async with trio.open_nursery() as n:
        h = await start(n, lambda b, i: fa.text(f"answer {i}"))
        for i in range(3):
            r = await h.post(body(turns=i))
            assert r.status_code == 200 and "message_stop" in r.text
        assert len(h.records) == 3 and [r.turn for r in h.fake.requests] == [0, 1, 2]
        n.cancel_scope.cancel()


async def raw_request(url: str, target: str, body: bytes = b"{}", token: str = TOKEN) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    head = (
        f"POST {target} HTTP/1.1\r\nhost: x\r\nx-api-key: {token}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode()
    await stream.send_all(head + body)
    out = b""
    with trio.fail_after(10):
        while chunk := await stream.receive_some(65536):
            out += chunk
    await stream.aclose()
    return out


@pytest.mark.parametrize(
    "target",
    [
        "@127.0.0.1:9/v1/messages",
        ".evil.example/v1/messages",
        ":abc/v1/messages",
        "//evil.example/v1/messages",
        "/x/../v1/messages",
        "/v1/messages/../../admin",
        "/v1/messages?x=@evil&y=/",
        "http://evil.example/v1/messages",
        "/v1/messagesX",
        "/prefix/v1/messages",
    ],
)
async def test_a_sandbox_cannot_steer_the_request_or_the_key_elsewhere(target):
    async with trio.open_nursery() as n:
        h = await start(n, [fa.text("never")])
        out = await raw_request(h.url, target)
        assert out.startswith(b"HTTP/1.1 404") or out.startswith(b"HTTP/1.1 400"), out[:200]
        assert h.fake.requests == [] and h.records == []
        # and the proxy is still serving
        r = await h.post(body())
        assert r.status_code == 200
        n.cancel_scope.cancel()


async def test_a_pathological_body_costs_only_its_connection():
    async with trio.open_nursery() as n:
        h = await start(n, [fa.text("fine")], max_body=10_000_000)
        out = await raw_request(h.url, "/v1/messages", b"[" * 200_000)
        assert out.startswith(b"HTTP/1.1 4")  # the upstream refuses it; nothing crashed
        r = await h.post(body())
        assert r.status_code == 200
        n.cancel_scope.cancel()


async def test_a_client_that_leaves_mid_stream_is_metered_to_the_end():
    async with trio.open_nursery() as n:
        h = await start(n, [fa.text("x" * 3000, usage={"input_tokens": 10, "output_tokens": 777}, delay=0.01)])
        async with h.client.stream("POST", "/v1/messages", json=body(), headers={"x-api-key": TOKEN}) as r:
            async for _ in r.aiter_raw():
                break  # read the first bytes, then hang up
        with trio.fail_after(10):
            await h.recorded.wait()
        assert h.records[0].usage == Usage(10, 777)  # message_delta's output count, though nobody read it
        assert not h.records[0].complete
        n.cancel_scope.cancel()
