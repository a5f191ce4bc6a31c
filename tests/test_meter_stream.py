import json

from marathon.agent.stream import StreamParser, tool_summary
from marathon.node.meter import UsageMeter
from marathon.protocol import messages as m


def sse(*events):
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)


STREAM = sse(
    {
        "type": "message_start",
        "message": {
            "model": "claude-x",
            "usage": {"input_tokens": 100, "output_tokens": 1, "cache_read_input_tokens": 5},
        },
    },
    {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "tool_use", "id": "t", "name": "Bash", "input": {}},
    },
    {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": "{}"}},
    {"type": "content_block_stop", "index": 0},
    {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 42, "input_tokens": 90}},
    {"type": "message_stop"},
)


def test_meter_overwrite_rule_in_any_chunking():
    for size in (1, 7, 64, len(STREAM)):
        meter = UsageMeter()
        for i in range(0, len(STREAM), size):
            meter.feed(STREAM[i : i + size])
        assert meter.usage == m.Usage(input_tokens=90, output_tokens=42, cache_read_input_tokens=5)
        assert meter.tool_calls == 1 and meter.model == "claude-x" and meter.saw_stop


def test_meter_counts_what_arrived_of_a_cut_stream():
    meter = UsageMeter()
    meter.feed(STREAM[: STREAM.index(b"event: message_delta")])
    assert meter.usage == m.Usage(input_tokens=100, output_tokens=1, cache_read_input_tokens=5)
    assert not meter.saw_stop


def test_meter_non_streaming_message():
    meter = UsageMeter()
    meter.message(
        {
            "type": "message",
            "model": "m",
            "usage": {"input_tokens": 3, "output_tokens": 4},
            "content": [{"type": "tool_use"}, {"type": "text"}],
            "stop_reason": "tool_use",
        }
    )
    assert meter.usage == m.Usage(3, 4) and meter.tool_calls == 1


def test_stream_parser_turns_lines_into_events():
    p = StreamParser()
    lines = [
        {"type": "system", "subtype": "init", "model": "claude-x", "session_id": "s"},
        {
            "type": "assistant",
            "message": {
                "content": [
                    {"type": "text", "text": "Hi"},
                    {"type": "tool_use", "id": "1", "name": "Bash", "input": {"command": "ls -la"}},
                ]
            },
        },
        {
            "type": "user",
            "message": {"content": [{"type": "tool_result", "tool_use_id": "1", "content": "a\nb", "is_error": False}]},
        },
        {
            "type": "result",
            "subtype": "success",
            "is_error": False,
            "num_turns": 2,
            "result": "done",
            "usage": {"input_tokens": 5, "output_tokens": 6},
            "total_cost_usd": 0.01,
        },
    ]
    events = [e for line in lines for e in p.line(json.dumps(line))]
    assert [type(e) for e in events] == [m.LogEvent, m.TextEvent, m.ToolCallEvent, m.ToolResultEvent]
    call, result = events[2], events[3]
    assert isinstance(call, m.ToolCallEvent) and isinstance(result, m.ToolResultEvent)
    assert call.summary == "Bash ls -la" and result.summary == "a b"
    assert p.result is not None
    assert p.result.num_turns == 2 and p.result.usage == m.Usage(5, 6) and p.last_text == "Hi"
    bad = p.line("not json")[0]
    assert isinstance(bad, m.LogEvent) and bad.level == "warning" and p.bad_lines == 1
    assert p.line("") == []


def test_tool_summaries():
    assert tool_summary("Write", {"file_path": "a.md", "content": "x"}) == "Write a.md"
    assert tool_summary("TodoWrite", {"todos": []}) == "TodoWrite"
    assert tool_summary("Mystery", {"n": 1, "q": "find"}) == "Mystery find"
