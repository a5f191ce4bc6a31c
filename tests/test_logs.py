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
    assert [r["msg"] for r in recs] == [
        "outside",
        "inside",
        "in a child task 7",
        "nested",
        "from a worker thread",
        "after",
    ]
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


# --------------------------------------------------------------------------- end to end


NODE_SECRET = "node-secret-" + "n" * 32
GH_TOKEN = "ghp_" + "L" * 36


async def _wait_for_record(path: str, pred, timeout: float = 60) -> dict:
    """Poll a growing JSON-lines log file until a record satisfies ``pred``."""
    with trio.fail_after(timeout):
        while True:
            try:
                with open(path) as f:
                    for line in f:
                        try:
                            rec = json.loads(line)
                        except ValueError:
                            continue
                        if pred(rec):
                            return rec
            except FileNotFoundError:
                pass
            await trio.sleep(0.05)


@pytest.mark.slow
async def test_every_log_of_a_real_run_is_json_lines_without_a_secret():
    """Orchestrator and node as separate daemons (stderr not a terminal: JSON by default), a
    real task with Claude Code, a pull request and the agent's own log kept; then every line
    of the three logs must be a JSON object, the task's records must say which task, and no
    log may hold the Anthropic key, the GitHub token, the node secret or a login token."""
    import os
    import signal
    import subprocess

    import httpx

    from tests import fake_anthropic as fa
    from tests.fake_github import open_fake_github
    from tests.harness import REPO_ROOT, TEST_KEY, claude_bin, make_git_repo, scratch_dir

    tmp = scratch_dir()
    src = make_git_repo(os.path.join(tmp, "src"), {"README.md": "# app\n"})
    os.makedirs(os.path.join(tmp, "remotes", "acme"))
    subprocess.run(["git", "clone", "--bare", "-q", src, os.path.join(tmp, "remotes", "acme", "app.git")], check=True)
    steps = [
        fa.tool_use("Write", {"file_path": "NOTES.md", "content": "notes\n"}),
        fa.tool_use("Bash", {"command": "env | sort > env.txt; git status --short", "description": "status"}),
        fa.text("Wrote NOTES.md."),
    ]
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("MARATHON_")}
    base_env.update(PYTHONPATH=str(REPO_ROOT), MARATHON_LOG_LEVEL="debug", XDG_CONFIG_HOME=os.path.join(tmp, "cfg"))
    orch_log, node_log = os.path.join(tmp, "orchestrator.log"), os.path.join(tmp, "node.log")
    procs = []
    async with (
        fa.open_fake_anthropic(lambda body, i: steps[min(i, 2)]) as fake,
        open_fake_github(GH_TOKEN, os.path.join(tmp, "remotes")) as gh,
    ):
        try:
            made = await trio.run_process(
                [
                    sys.executable,
                    "-m",
                    "marathon",
                    "admin",
                    "create-user",
                    "ops@example.com",
                    "--admin",
                    "--password-stdin",
                ],
                env={**base_env, "MARATHON_DATA_DIR": os.path.join(tmp, "orch")},
                cwd=tmp,
                stdin=b"long enough pw\n",
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            assert made.returncode == 0, made.stderr
            with open(orch_log, "wb") as out:
                procs.append(
                    await trio.lowlevel.open_process(
                        [sys.executable, "-m", "marathon", "serve", "--role", "orchestrator"],
                        env={
                            **base_env,
                            "MARATHON_DATA_DIR": os.path.join(tmp, "orch"),
                            "MARATHON_HTTP_LISTEN": "tcp:127.0.0.1:0",
                            "MARATHON_GATEWAY_LISTEN": "tcp:127.0.0.1:0",
                            "MARATHON_NODE_SECRET": NODE_SECRET,
                        },
                        stderr=out,
                        cwd=tmp,
                    )
                )
            ready = await _wait_for_record(orch_log, lambda r: "marathon orchestrator: API on" in r["msg"])
            url = ready["msg"].rsplit(" ", 1)[1]
            gw = (await _wait_for_record(orch_log, lambda r: r["msg"].startswith("node gateway listening on")))["msg"]
            gateway = gw.rsplit(" ", 1)[1]

            async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=30) as c:
                token = (
                    await c.post("/v1/auth/login", json={"email": "ops@example.com", "password": "long enough pw"})
                ).json()["token"]
                c.headers["Authorization"] = f"Bearer {token}"
                assert (await c.put("/v1/auth/github-token", json={"token": GH_TOKEN})).status_code == 200

                with open(node_log, "wb") as out:
                    procs.append(
                        await trio.lowlevel.open_process(
                            [sys.executable, "-m", "marathon", "serve", "--role", "node"],
                            env={
                                **base_env,
                                "MARATHON_DATA_DIR": os.path.join(tmp, "node"),
                                "MARATHON_ORCHESTRATOR": gateway,
                                "MARATHON_NODE_SECRET": NODE_SECRET,
                                "MARATHON_ANTHROPIC_API_KEY": TEST_KEY,
                                "MARATHON_ANTHROPIC_BASE_URL": fake.url,
                                "MARATHON_GITHUB_URL": f"file://{tmp}/remotes",
                                "MARATHON_GITHUB_API_URL": gh.url,
                                "MARATHON_CLAUDE_BIN": claude_bin(),
                                "MARATHON_BWRAP": "required",
                                "MARATHON_HEARTBEAT_INTERVAL": "0.5",
                            },
                            stderr=out,
                            cwd=tmp,
                        )
                    )
                await _wait_for_record(
                    orch_log, lambda r: r["msg"].startswith("node ") and " connected from " in r["msg"]
                )
                (node_id,) = [n["id"] for n in (await c.get("/v1/nodes")).json()["nodes"]]
                r = await c.post(
                    "/v1/tasks", json={"prompt": "write notes", "repo": "acme/app", "pr": True, "keep_workspace": True}
                )
                assert r.status_code == 201, r.text
                task_id = r.json()["id"]
                with trio.fail_after(120):
                    async with c.stream(
                        "GET", f"/v1/tasks/{task_id}/events", timeout=httpx.Timeout(30, read=None)
                    ) as s:
                        async for _ in s.aiter_lines():
                            pass
                task = (await c.get(f"/v1/tasks/{task_id}")).json()
                assert task["state"] == "succeeded", task
                assert task["pr_url"], task
        finally:
            for p in reversed(procs):  # node first: its shutdown records too
                if p.returncode is None:
                    p.send_signal(signal.SIGINT)
                    with trio.move_on_after(20):
                        await p.wait()
                    if p.returncode is None:
                        p.kill()
                        await p.wait()

    agent_logs = [
        os.path.join(d, f) for d, _, fs in os.walk(os.path.join(tmp, "node")) for f in fs if f.endswith("-agent.log")
    ]
    assert len(agent_logs) == 1, agent_logs
    secrets = {
        "the Anthropic key": TEST_KEY,
        "the GitHub token": GH_TOKEN,
        "the node secret": NODE_SECRET,
        "a login token": token,
    }
    records: dict[str, list[dict]] = {}
    for name, path in (("orchestrator", orch_log), ("node", node_log), ("agent", agent_logs[0])):
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        for what, value in secrets.items():
            assert value not in text, f"{what} is in the {name}'s log"
        recs = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                raise AssertionError(f"{name} log line {n} is not JSON: {line[:300]!r}") from None
            assert isinstance(rec, dict) and {"ts", "level", "logger", "msg"} <= set(rec), line
            recs.append(rec)
        assert recs, f"the {name}'s log is empty"
        records[name] = recs

    # the records of the task's work say which task (and on the node, which node)
    for name in ("orchestrator", "node"):
        about = [r for r in records[name] if task_id in r["msg"]]
        assert about, f"no record of task {task_id} in the {name}'s log"
        untagged = [r["msg"] for r in about if r.get("task_id") != task_id]
        assert not untagged, f"{name} records about the task without task_id: {untagged}"
    assert any(r.get("node_id") == node_id and r.get("task_id") == task_id for r in records["node"])
    # a record of an authenticated API request carries the user
    (queued,) = [r for r in records["orchestrator"] if r["msg"].startswith(f"task {task_id} queued by")]
    assert queued["user"] == task["owner"]
    assert all(r["role"] == "agent" for r in records["agent"])
