"""Tests of the fake Anthropic Messages API (fast, httpx) and of the real Claude Code CLI against it (slow)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest
import trio

from tests.fake_anthropic import (
    DEMO_SCRIPT,
    USAGE_FIELDS,
    drop_after,
    error,
    hang,
    hang_after_start,
    load_script,
    open_fake_anthropic,
    text,
    tool_use,
    turn,
)

REPO = Path(__file__).resolve().parent.parent
CLAUDE_BIN = os.environ.get("MARATHON_CLAUDE_BIN") or str(
    REPO / ".cache/claude-code/node_modules/@anthropic-ai/claude-code/bin/claude.exe"
)
CLAUDE_UID = 4242


def body(n_assistant: int = 0, **kw) -> dict:
    msgs = [{"role": "user", "content": "hi"}]
    for _ in range(n_assistant):
        msgs += [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}]
    return {
        "model": "claude-sonnet-4-5",
        "max_tokens": 1000,
        "stream": True,
        "messages": msgs,
        "tools": [{"name": "Bash", "input_schema": {"type": "object"}}],
        **kw,
    }


def parse_sse(raw: str) -> list[tuple[str, dict]]:
    events = []
    for chunk in raw.split("\n\n"):
        if not chunk.strip():
            continue
        fields = dict(line.split(": ", 1) for line in chunk.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


def client_usage(events) -> dict:
    """What a metering client computes: message_start usage, fields overwritten by message_delta."""
    usage = {}
    for name, data in events:
        if name == "message_start":
            usage = {k: data["message"]["usage"][k] for k in USAGE_FIELDS}
        elif name == "message_delta":
            usage.update(data["usage"])
    return usage


def content(events) -> list[dict]:
    blocks = {}
    for name, data in events:
        if name == "content_block_start":
            blocks[data["index"]] = {**data["content_block"], "_json": ""}
        elif name == "content_block_delta":
            b, d = blocks[data["index"]], data["delta"]
            if d["type"] == "text_delta":
                b["text"] += d["text"]
            else:
                b["_json"] += d["partial_json"]
    for b in blocks.values():
        if b["type"] == "tool_use":
            b["input"] = json.loads(b["_json"])
        del b["_json"]
    return [blocks[i] for i in sorted(blocks)]


async def post(fake, payload, path="/v1/messages?beta=true", **headers):
    async with httpx.AsyncClient(timeout=5) as client:
        return await client.post(fake.url + path, json=payload, headers={"x-api-key": "k", **headers})


# ---------------------------------------------------------------- fast


async def test_text_turn_event_sequence_and_usage():
    usage = {"input_tokens": 120, "output_tokens": 33, "cache_creation_input_tokens": 7, "cache_read_input_tokens": 900}
    async with open_fake_anthropic([text("Hello there, world", usage=usage)]) as fake:
        r = await post(fake, body(), **{"anthropic-beta": "x"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.text)
    names = [n for n, _ in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert names[1:-2] == ["content_block_start"] + ["content_block_delta"] * 3 + ["content_block_stop"]
    assert events[0][1]["message"]["usage"]["output_tokens"] == 1
    assert events[-2][1]["delta"]["stop_reason"] == "end_turn"
    assert content(events) == [{"type": "text", "text": "Hello there, world"}]
    assert client_usage(events) == usage == fake.usage_sent == fake.usage_completed
    (rec,) = fake.requests
    assert (rec.method, rec.path, rec.turn, rec.kind, rec.completed) == (
        "POST",
        "/v1/messages?beta=true",
        0,
        "main",
        True,
    )
    assert rec.headers["anthropic-beta"] == "x" and rec.body["model"] == "claude-sonnet-4-5"
    assert fake.main_requests == [rec] and fake.side_requests == [] and fake.errors == []


async def test_tool_use_and_multi_block_turn():
    script = [turn("Let me look.", tool_use("Bash", {"command": "ls -la"}), tool_use("Read", {"file_path": "a"}))]
    async with open_fake_anthropic(script) as fake:
        events = parse_sse((await post(fake, body())).text)
    blocks = content(events)
    assert [b["type"] for b in blocks] == ["text", "tool_use", "tool_use"]
    assert blocks[1]["name"] == "Bash" and blocks[1]["input"] == {"command": "ls -la"}
    assert blocks[1]["id"].startswith("toolu_") and blocks[1]["id"] != blocks[2]["id"]
    assert any(d["delta"]["type"] == "input_json_delta" for n, d in events if n == "content_block_delta")
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


async def test_usage_overwrite_and_sum_over_turns():
    final = {"input_tokens": 5, "output_tokens": 9, "cache_creation_input_tokens": 11, "cache_read_input_tokens": 13}
    script = [text("a", start_usage={"input_tokens": 500, "cache_read_input_tokens": 0}, usage=final), text("b")]
    async with open_fake_anthropic(script) as fake:
        e0 = parse_sse((await post(fake, body(0))).text)
        e1 = parse_sse((await post(fake, body(1))).text)
    assert e0[0][1]["message"]["usage"]["input_tokens"] == 500
    assert e0[-2][1]["usage"] == {"input_tokens": 5, "output_tokens": 9, "cache_read_input_tokens": 13}
    assert client_usage(e0) == final
    assert fake.usage_sent == {k: final[k] + client_usage(e1)[k] for k in USAGE_FIELDS}
    assert fake.usage_sent == {
        "input_tokens": 105,
        "output_tokens": 29,
        "cache_creation_input_tokens": 11,
        "cache_read_input_tokens": 13,
    }


async def test_turn_index_is_stateless_and_exhaustion_is_an_error():
    async with open_fake_anthropic([text("zero"), text("one")]) as fake:
        for n in (1, 1, 0):  # a retry of turn 1 gets turn 1 again
            await post(fake, body(n))
        r = await post(fake, body(2))
    assert [rec.turn for rec in fake.requests] == [1, 1, 0, 2]
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert fake.errors == ["script exhausted at turn 2"]


async def test_callable_script_and_script_exception():
    def script(request_body, index):
        if index > 0:
            raise RuntimeError("boom")
        return text(f"model was {request_body['model']}")

    async with open_fake_anthropic(script) as fake:
        ok = parse_sse((await post(fake, body(0))).text)
        bad = await post(fake, body(1))
    assert content(ok)[0]["text"] == "model was claude-sonnet-4-5"
    assert bad.status_code == 400 and "boom" in bad.json()["error"]["message"] and "boom" in fake.errors[0]


async def test_path_prefix_and_404():
    async with open_fake_anthropic([text("hi")]) as fake:
        assert (await post(fake, body(), path="/proxy/task-1/v1/messages?beta=true")).status_code == 200
        for path in ("/v1/complete", "/v1/messages/extra", "/"):
            r = await post(fake, body(), path=path)
            assert r.status_code == 404 and r.json()["type"] == "error"
        async with httpx.AsyncClient() as client:
            assert (await client.get(fake.url + "/v1/messages")).status_code == 404
    assert fake.usage_sent["input_tokens"] == 100 and len(fake.main_requests) == 1


async def test_api_key_401():
    async with open_fake_anthropic([text("hi")], api_key="secret") as fake:
        wrong = await post(fake, body(), **{"x-api-key": "nope"})
        async with httpx.AsyncClient() as client:
            missing = await client.post(fake.url + "/v1/messages", json=body())
        right = await post(fake, body(), **{"x-api-key": "secret"})
    for r in (wrong, missing):
        assert r.status_code == 401
        assert r.json() == {"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}}
    assert right.status_code == 200 and [r.kind for r in fake.requests] == ["rejected", "rejected", "main"]


@pytest.mark.parametrize(
    "status,etype", [(429, "rate_limit_error"), (500, "api_error"), (402, "billing_error"), (529, "overloaded_error")]
)
async def test_error_turns(status, etype):
    async with open_fake_anthropic([error(status, etype, "nope")]) as fake:
        r = await post(fake, body())
    assert r.status_code == status
    assert r.json() == {"type": "error", "error": {"type": etype, "message": "nope"}}
    assert ("retry-after" in r.headers) == (status == 429)
    assert fake.usage_sent == dict.fromkeys(USAGE_FIELDS, 0) and fake.requests[0].status == status


async def test_drop_after_counts_what_arrived():
    async with open_fake_anthropic([drop_after(2)]) as fake:
        raw = b""
        with pytest.raises(httpx.RemoteProtocolError):
            async with (
                httpx.AsyncClient(timeout=5) as client,
                client.stream("POST", fake.url + "/v1/messages", json=body()) as r,
            ):
                async for chunk in r.aiter_bytes():
                    raw += chunk
    names = [n for n, _ in parse_sse(raw.decode())]
    assert names == ["message_start", "content_block_start"]
    assert fake.usage_sent == {
        "input_tokens": 100,
        "output_tokens": 1,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }
    assert fake.usage_completed == dict.fromkeys(USAGE_FIELDS, 0)


async def test_hang_and_hang_after_start():
    async with open_fake_anthropic([hang()]) as fake:
        with trio.move_on_after(0.5) as cs:
            await post(fake, body())
        assert cs.cancelled_caught and fake.requests[0].status is None
    async with open_fake_anthropic([hang_after_start()]) as fake:
        raw = b""
        with trio.move_on_after(0.5) as cs:
            async with (
                httpx.AsyncClient(timeout=5) as client,
                client.stream("POST", fake.url + "/v1/messages", json=body()) as r,
            ):
                async for chunk in r.aiter_bytes():
                    raw += chunk
        assert cs.cancelled_caught and [n for n, _ in parse_sse(raw.decode())] == ["message_start"]
        assert fake.usage_sent["output_tokens"] == 1 and not fake.requests[0].completed


async def test_delay_between_events():
    async with open_fake_anthropic([text("slow", delay=0.05)]) as fake:
        start = trio.current_time()
        await post(fake, body())
        assert trio.current_time() - start >= 0.05 * 5  # 7 events, 6 gaps


async def test_non_streaming():
    async with open_fake_anthropic([tool_use("Write", {"file_path": "x", "content": "y"})]) as fake:
        r = await post(fake, body(stream=False))
    msg = r.json()
    assert r.headers["content-type"] == "application/json"
    assert msg["type"] == "message" and msg["stop_reason"] == "tool_use"
    assert msg["content"][0]["input"] == {"file_path": "x", "content": "y"}
    assert msg["usage"] == fake.usage_sent == fake.usage_completed


async def test_side_requests_do_not_consume_the_script():
    async with open_fake_anthropic([text("main answer")]) as fake:
        quota = await post(fake, body(max_tokens=1))
        title = await post(
            fake,
            {
                "model": "claude-haiku-4-5",
                "max_tokens": 512,
                "stream": True,
                "system": "Generate a title",
                "messages": [{"role": "user", "content": "x"}],
            },
        )
        count = await post(fake, body(), path="/v1/messages/count_tokens?beta=true")
        main = await post(fake, body())
    assert content(parse_sse(main.text))[0]["text"] == "main answer"
    assert content(parse_sse(title.text))[0]["text"] == "Fake side answer" and quota.status_code == 200
    assert count.json()["input_tokens"] > 0
    assert [r.kind for r in fake.side_requests] == ["side", "side", "count_tokens"]
    assert [r.turn for r in fake.main_requests] == [0]


async def test_subagent_flag():
    sub = body(system=[{"type": "text", "text": "x-anthropic-billing-header: cc_version=2; cc_is_subagent=true;"}])
    async with open_fake_anthropic([text("a")]) as fake:
        await post(fake, sub)
        await post(fake, body(system="You are Claude"))
    assert [r.subagent for r in fake.requests] == [True, False]


def test_json_script_matches_demo():
    demo, from_json = load_script("demo"), load_script("write_bash_done")
    assert [[{k: v for k, v in b.items() if k != "id"} for b in t.blocks] for t in demo] == [
        [{k: v for k, v in b.items() if k != "id"} for b in t.blocks] for t in from_json
    ]
    assert [t.stop_reason for t in demo] == ["tool_use", "tool_use", "end_turn"]


async def test_standalone_server():
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tests.fake_anthropic", "--port", "0", "--script", "demo", "--api-key", "k"],
        cwd=REPO,
        stdout=subprocess.PIPE,
    )
    try:
        with trio.fail_after(15):
            line = b""
            assert proc.stdout is not None
            while not line.endswith(b"\n"):
                line += await proc.stdout.receive_some(1)
        assert line.startswith(b"listening on http://127.0.0.1:")
        url = line.decode().split()[-1]
        async with httpx.AsyncClient(timeout=5) as client:
            r = await client.post(url + "/v1/messages", json=body(), headers={"x-api-key": "k"})
        assert content(parse_sse(r.text))[0]["name"] == "Write"
    finally:
        proc.kill()
        await proc.wait()


# ---------------------------------------------------------------- slow: the real CLI


def make_workspace() -> tuple[Path, Path, Path, Path]:
    """A /tmp dir uid 4242 can traverse, with HOME, TMPDIR and a git work tree owned by it."""
    base = Path(tempfile.mkdtemp(prefix="fake-anthropic-", dir="/tmp"))
    base.chmod(0o755)
    home, tmp, work = base / "home", base / "tmp", base / "work"
    for d in (home, tmp, work):
        d.mkdir()
    subprocess.run(["git", "init", "-q", str(work)], check=True)
    if os.geteuid() == 0:
        for d in (home, tmp, work):
            subprocess.run(["chown", "-R", f"{CLAUDE_UID}:{CLAUDE_UID}", str(d)], check=True)
    return base, home, tmp, work


def claude_command(prompt: str, max_turns: int = 10) -> list[str]:
    cmd = [
        CLAUDE_BIN,
        "-p",
        prompt,
        "--output-format",
        "stream-json",
        "--verbose",
        "--max-turns",
        str(max_turns),
        "--model",
        "claude-sonnet-4-5",
        "--dangerously-skip-permissions",
    ]
    if os.geteuid() == 0:  # claude refuses --dangerously-skip-permissions as root
        cmd = ["setpriv", "--reuid", str(CLAUDE_UID), "--regid", str(CLAUDE_UID), "--clear-groups", *cmd]
    return cmd


def claude_env(url: str, home: Path, tmp: Path) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "TMPDIR": str(tmp),
        "ANTHROPIC_BASE_URL": url,
        "ANTHROPIC_API_KEY": "sk-fake-test",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "CLAUDE_CODE_MAX_RETRIES": "1",
        "NO_PROXY": "127.0.0.1,localhost",
    }


@pytest.mark.slow
async def test_real_claude_write_bash_end_turn():
    assert os.access(CLAUDE_BIN, os.X_OK), (
        f"Claude Code CLI not found at {CLAUDE_BIN}: run `make claude-code` or set MARATHON_CLAUDE_BIN"
    )
    script = [
        tool_use(
            "Write",
            DEMO_SCRIPT[0].blocks[0]["input"],
            usage={"input_tokens": 1200, "output_tokens": 80, "cache_creation_input_tokens": 3000},
        ),
        tool_use(
            "Bash",
            {"command": "git status --short", "description": "status"},
            usage={"input_tokens": 40, "output_tokens": 30, "cache_read_input_tokens": 3000},
            start_usage={"input_tokens": 999, "cache_read_input_tokens": 1},
        ),  # message_delta overwrites
        text(
            "Added CONTRIBUTING.md.", usage={"input_tokens": 25, "output_tokens": 12, "cache_read_input_tokens": 3100}
        ),
    ]
    base, home, tmp, work = make_workspace()
    try:
        async with open_fake_anthropic(script, api_key="sk-fake-test") as fake:
            with trio.fail_after(120):
                proc = await trio.run_process(
                    claude_command("add a CONTRIBUTING.md"),
                    cwd=work,
                    env=claude_env(fake.url + "/prefix", home, tmp),
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
        out = proc.stdout.decode()
        assert proc.returncode == 0, f"claude exited {proc.returncode}\nstderr: {proc.stderr.decode()}\n{out}"
        assert (work / "CONTRIBUTING.md").read_text() == DEMO_SCRIPT[0].blocks[0]["input"]["content"]

        lines = [json.loads(line) for line in out.splitlines() if line.strip()]
        tools = [
            b for m in lines if m["type"] == "assistant" for b in m["message"]["content"] if b["type"] == "tool_use"
        ]
        assert [t["name"] for t in tools] == ["Write", "Bash"]
        bash_result = [
            b
            for m in lines
            if m["type"] == "user"
            for b in m["message"]["content"]
            if isinstance(b, dict) and b.get("tool_use_id") == tools[1]["id"]
        ]
        assert "CONTRIBUTING.md" in str(bash_result[0]["content"])

        result = lines[-1]
        assert result["type"] == "result" and result["subtype"] == "success" and not result["is_error"]
        assert result["num_turns"] == 3 and result["result"] == "Added CONTRIBUTING.md."
        assert (
            {k: result["usage"][k] for k in USAGE_FIELDS}
            == fake.usage_sent
            == {
                "input_tokens": 1265,
                "output_tokens": 122,
                "cache_creation_input_tokens": 3000,
                "cache_read_input_tokens": 6100,
            }
        )
        (model_usage,) = result["modelUsage"].values()
        assert [
            model_usage[k] for k in ("inputTokens", "outputTokens", "cacheCreationInputTokens", "cacheReadInputTokens")
        ] == [1265, 122, 3000, 6100]

        assert [r.turn for r in fake.main_requests] == [0, 1, 2] and fake.side_requests == [] and not fake.errors
        assert all(r.path == "/prefix/v1/messages?beta=true" for r in fake.requests)
        assert all(r.headers["x-api-key"] == "sk-fake-test" for r in fake.requests)
    finally:
        shutil.rmtree(base, ignore_errors=True)
