"""Structured logs: JSON lines or text, the task/node/user context, and no secret in either."""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest
import trio

from marathon import logs
from marathon.config import load_config
from marathon.errors import ConfigError

SECRET = "sk-ant-" + "s" * 30
ODD_SECRET = 'abc"def\\ghi-123456'  # JSON escapes it: the escaped form is redacted too


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    saved = root.handlers[:], root.level, sys.excepthook, dict(logs._state)
    yield
    root.handlers[:], level, sys.excepthook, state = saved
    root.setLevel(level)
    logs._state.update(state)
    logging.captureWarnings(False)


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def test_json_lines_carry_the_context_into_child_tasks(restore_logging):
    out = io.StringIO()  # not a terminal: auto means JSON
    logs.setup_logging(role="node", stream=out)
    assert logs.json_enabled()
    log = logging.getLogger("marathon.test")
    log.info("outside")

    async def child():
        log.warning("in a child task %d", 7)

    with logs.log_context(task_id="0123456789ab", node_id="n-1"):
        log.info("inside")
        async with trio.open_nursery() as n:
            n.start_soon(child)
        with logs.log_context(user="u_1"):
            log.info("nested")
        await trio.to_thread.run_sync(lambda: log.info("from a worker thread"))
    log.info("after")
    recs = lines(out)
    assert [r["msg"] for r in recs] == ["outside", "inside", "in a child task 7", "nested", "from a worker thread", "after"]
    assert all(r["role"] == "node" and r["logger"] == "marathon.test" and r["ts"].endswith("Z") for r in recs)
    assert "task_id" not in recs[0] and "task_id" not in recs[-1]
    for r in recs[1:5]:
        assert r["task_id"] == "0123456789ab" and r["node_id"] == "n-1"
    assert recs[3]["user"] == "u_1" and "user" not in recs[2]
    assert recs[2]["level"] == "warning"


def test_explicit_extra_fields_and_exceptions_are_in_the_record(restore_logging):
    out = io.StringIO()
    logs.setup_logging(role="orchestrator", stream=out, log_format="json")
    log = logging.getLogger("marathon.test")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("it failed", extra={"task_id": "feedfacecafe"})
    (rec,) = lines(out)
    assert rec["task_id"] == "feedfacecafe" and rec["level"] == "error"
    assert "ValueError: boom" in rec["exc"] and "Traceback" in rec["exc"]


def test_text_on_a_terminal(restore_logging):
    out = Tty()
    logs.setup_logging(role="all", stream=out)
    assert not logs.json_enabled()
    with logs.log_context(task_id="0123456789ab", user="u_2"):
        logging.getLogger("marathon.x").info("hello %s", "there")
    line = out.getvalue().strip()
    assert " all INFO marathon.x: hello there [task=0123456789ab user=u_2]" in line
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)
    # log_format = json wins over the terminal, text over a pipe
    out2 = Tty()
    logs.setup_logging(role="all", stream=out2, log_format="json")
    logging.getLogger("marathon.x").info("j")
    assert json.loads(out2.getvalue())["msg"] == "j"
    out3 = io.StringIO()
    logs.setup_logging(role="all", stream=out3, log_format="text")
    logging.getLogger("marathon.x").info("t")
    assert out3.getvalue().split(" ", 3)[3].strip() == "INFO marathon.x: t"


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_no_secret_in_either_format(restore_logging, fmt):
    out = io.StringIO()
    logs.setup_logging(role="node", stream=out, log_format=fmt, secrets=[SECRET, ODD_SECRET, "short"])
    log = logging.getLogger("marathon.test")
    log.info("key %s in an argument", SECRET)
    log.info(f"key {SECRET} in the message, and {ODD_SECRET}")
    try:
        raise RuntimeError(f"upstream refused {SECRET}")
    except RuntimeError:
        log.exception("in a traceback")
    log.info("in a field", extra={"header": f"x-api-key: {SECRET}"})
    with logs.log_context(user=ODD_SECRET):
        log.info("in the context")
    later = "ghp_" + "g" * 36
    logs.redact_also(later, None)
    log.info("learnt later: %s", later)
    text = out.getvalue()
    for s in (SECRET, ODD_SECRET, json.dumps(ODD_SECRET)[1:-1], later):
        assert s not in text, (s, text)
    assert text.count("***") >= (7 if fmt == "json" else 6)  # text shows no extra fields
    assert "short" not in logs._state["redactor"].forms  # too short to be a secret: never blanked
    if fmt == "json":
        assert len(lines(out)) == 6


def test_log_format_is_validated():
    assert load_config({}, env={}, cwd="/nonexistent").log_format == "auto"
    assert load_config({}, env={"MARATHON_LOG_FORMAT": "json"}, cwd="/nonexistent").log_format == "json"
    with pytest.raises(ConfigError, match="log_format"):
        load_config({}, env={"MARATHON_LOG_FORMAT": "xml"}, cwd="/nonexistent")
