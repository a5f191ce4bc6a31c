"""Prometheus metrics: the orchestrator's /metrics and the node's metrics_listen port, after a
real end-to-end task (real Claude Code in bubblewrap, the fake upstream); the node's status
server on its own; the counters the shells feed, and what they must never carry."""

from __future__ import annotations

import os

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from marathon.config import load_config
from marathon.errors import ConfigError
from marathon.metrics import OTHER, BoundedLabel
from marathon.orchestrator.ingest import Ingest
from marathon.orchestrator.lifecycle import State
from marathon.orchestrator.metrics import OrchestratorMetrics
from marathon.orchestrator.nodes import NodeRegistry
from marathon.orchestrator.tasks import TaskService, event_in
from marathon.bus.memory import MemoryBus
from marathon.node.status import serve_status, status_routes
from marathon.protocol import messages as m
from marathon.store import TaskRecord, TaskRequest, open_store
from tests import fake_anthropic as fa
from tests.harness import make_git_repo, marathon_config, run_marathon, scratch_dir


def parse(text: str) -> dict[str, list]:
    """Sample name -> [(labels, value)], through the reference parser (it raises on bad text)."""
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(samples: dict[str, list], name: str, **labels) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items()))


def label_values(samples: dict[str, list]) -> set[str]:
    return {v for rows in samples.values() for lab, _ in rows for v in lab.values()}


def script():
    return [
        fa.tool_use(
            "Write",
            {"file_path": "NOTES.md", "content": "# notes\n"},
            usage={"input_tokens": 120, "output_tokens": 30, "cache_read_input_tokens": 7},
        ),
        fa.text(
            "I added NOTES.md.", usage={"input_tokens": 170, "output_tokens": 12, "cache_creation_input_tokens": 5}
        ),
    ]


@pytest.mark.slow
async def test_metrics_after_an_end_to_end_task():
    tmp = scratch_dir()
    repo = make_git_repo(os.path.join(tmp, "repo"))
    async with fa.open_fake_anthropic(script()) as fake:
        config = marathon_config(
            os.path.join(tmp, "data"), anthropic_base_url=fake.url, metrics_listen="127.0.0.1:0", log_level="info"
        )
        async with run_marathon(config) as mt, httpx.AsyncClient(trust_env=False, timeout=30) as anon:
            task = await mt.submit("add NOTES.md", repo=repo)
            done = await mt.finish(task["id"])
            assert done["state"] == "succeeded", done
            me = (await mt.client.get("/v1/auth/whoami")).json()

            # ---- the orchestrator: no credentials needed (Prometheus scrapes without), valid text format
            r = await anon.get(f"{mt.url}/metrics")
            assert r.status_code == 200, r.text
            assert r.headers["content-type"].startswith("text/plain") and "version=0.0.4" in r.headers["content-type"]
            o = parse(r.text)
            assert value(o, "marathon_tasks", state="succeeded") == 1
            assert value(o, "marathon_tasks", state="queued") == 0 and value(o, "marathon_queue_depth") == 0
            assert {lab["state"] for lab, _ in o["marathon_tasks"]} >= {"queued", "running", "failed", "timed_out"}
            assert value(o, "marathon_task_duration_seconds_count", outcome="succeeded") == 1
            assert value(o, "marathon_task_duration_seconds_count", outcome="failed") == 0
            assert value(o, "marathon_task_duration_seconds_sum", outcome="succeeded") > 0
            assert value(o, "marathon_scheduling_latency_seconds_count") == 1
            # tokens by model and kind: exactly what the upstream sent, under the models it answered as
            models = {rq.body.get("model", "claude-fake") for rq in fake.requests if isinstance(rq.body, dict)}
            token_models = {lab["model"] for lab, _ in o["marathon_tokens_total"]}
            assert token_models and token_models <= models, (token_models, models)
            sent = fake.usage_sent
            for kind, field in (("input", "input_tokens"), ("output", "output_tokens"),
                                ("cache_read", "cache_read_input_tokens"),
                                ("cache_creation", "cache_creation_input_tokens")):  # fmt: skip
                assert value(o, "marathon_tokens_total", kind=kind) == sent[field] == done["usage"][field], kind
            assert value(o, "marathon_cost_usd_total") == pytest.approx(done["cost_usd"])
            assert value(o, "marathon_api_requests_total", status="200") >= 2
            assert value(o, "marathon_gateway_connections") == 1
            assert value(o, "marathon_scheduler_leader") == 1  # the only replica leads
            assert value(o, "marathon_node_slots", node=mt.node.node_id) == config.slots
            assert value(o, "marathon_store_operation_seconds_count", operation="create_task") == 1
            assert value(o, "marathon_store_operation_seconds_count", operation="count_tasks_by_state") >= 1
            assert value(o, "marathon_process_resident_memory_bytes") > 0
            assert all(n.startswith("marathon_") for n in o), sorted(n for n in o if not n.startswith("marathon_"))

            # ---- the node's port: metrics, health and readiness
            node_url = mt.node.metrics.url
            assert node_url.startswith("http://127.0.0.1:")
            r = await anon.get(f"{node_url}/metrics")
            assert r.status_code == 200 and "version=0.0.4" in r.headers["content-type"]
            n = parse(r.text)
            assert value(n, "marathon_node_slots") == config.slots
            assert value(n, "marathon_node_active_tasks") == 0
            assert value(n, "marathon_node_gateway_connected") == 1
            assert value(n, "marathon_sandbox_start_seconds_count", backend="process", kind="cold") == 1
            assert value(n, "marathon_sandbox_start_seconds_sum", backend="process") > 0
            forwarded = len(fake.requests)
            assert value(n, "marathon_proxy_upstream_responses_total", status="200") == forwarded
            assert value(n, "marathon_proxy_request_seconds_count", path="/v1/messages") >= 2
            assert value(n, "marathon_proxy_time_to_first_byte_seconds_count") == forwarded
            assert all(name.startswith("marathon_") for name in n)
            r = await anon.get(f"{node_url}/healthz")
            assert r.status_code == 200 and r.json()["node_id"] == mt.node.node_id
            r = await anon.get(f"{node_url}/readyz")
            assert r.status_code == 200 and r.json() == {"ready": True, "checks": {"gateway": "ok", "sandbox": "ok"}}

            # ---- bounded labels: no task id, no user, no email, anywhere
            for samples in (o, n):
                for v in label_values(samples):
                    assert task["id"] not in v and me["id"] not in v and me["email"] not in v, v

            doc = (await anon.get(f"{mt.url}/v1/openapi.json")).json()
            assert doc["paths"]["/metrics"]["get"]["security"] == []


async def test_node_status_server_routes_and_protocol():
    ready: dict[str, str | None] = {"gateway": None}
    routes = status_routes(
        "n-test", lambda: b"# HELP marathon_x x\n# TYPE marathon_x gauge\nmarathon_x 1.0\n",
        {"gateway": lambda: ready["gateway"], "broken": lambda: None},
    )  # fmt: skip
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_status, "127.0.0.1:0", routes)
        async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=10) as c:
            r = await c.get("/metrics")
            assert r.status_code == 200 and parse(r.text)["marathon_x"] == [({}, 1.0)]
            assert (await c.get("/healthz")).json()["node_id"] == "n-test"
            assert (await c.get("/readyz")).json() == {"ready": True, "checks": {"gateway": "ok", "broken": "ok"}}
            ready["gateway"] = "not connected"
            r = await c.get("/readyz")
            assert r.status_code == 503 and r.json()["checks"]["gateway"] == "failed"
            assert (await c.get("/nope")).status_code == 404
            r = await c.post("/metrics", content=b"x")
            assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"
            r = await c.head("/healthz")
            assert r.status_code == 200 and r.content == b""
        # a malformed request gets a 400 and the server goes on serving
        host, port = url.removeprefix("http://").rsplit(":", 1)
        s = await trio.open_tcp_stream(host, int(port))
        await s.send_all(b"NOT HTTP AT ALL\r\n\r\n")
        with trio.fail_after(10):
            got = b""
            while chunk := await s.receive_some(4096):
                got += chunk
        assert got.startswith(b"HTTP/1.1 400")
        async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=10) as c:
            assert (await c.get("/healthz")).status_code == 200
        nursery.cancel_scope.cancel()


async def test_a_broken_check_means_not_ready():
    def boom() -> str | None:
        raise RuntimeError("broken")

    status, _, body = status_routes("n", lambda: b"", {"x": boom})["/readyz"]()
    assert status == 503 and b'"failed"' in body


def test_metrics_listen_is_validated(tmp_path):
    assert load_config({"metrics_listen": "127.0.0.1:9464"}, env={}, cwd=tmp_path).metrics_listen == "127.0.0.1:9464"
    assert load_config({}, env={}, cwd=tmp_path).metrics_listen == ""
    for bad in ("9464", "localhost", "127.0.0.1:http", "127.0.0.1:70000"):
        with pytest.raises(ConfigError, match="metrics_listen"):
            load_config({"metrics_listen": bad}, env={}, cwd=tmp_path)


def test_bounded_label_keeps_the_number_of_series_bounded():
    label = BoundedLabel(3)
    assert [label(v) for v in ("a", "b", "a", "c", "d", "e", "b", None)] == [
        "a",
        "b",
        "a",
        "c",
        OTHER,
        OTHER,
        "b",
        OTHER,
    ]


async def test_orchestrator_metrics_from_the_store_and_the_ledger(tmp_path):
    """Tasks by state come from one grouped query at scrape time; a metered request resent by
    a node (same node_seq) is counted once, as the ledger keeps it once; store calls are timed."""
    config = load_config({"data_dir": str(tmp_path)}, env={}, cwd=tmp_path)
    raw = await open_store(f"sqlite://{tmp_path / 'm.db'}", str(tmp_path))
    try:
        metrics = OrchestratorMetrics()
        store = metrics.timed_store(raw)
        metrics.attach(store, NodeRegistry())
        tasks = TaskService(store, MemoryBus(), config, metrics=metrics)
        for i, state in enumerate(["queued", "queued", "queued", "running"]):
            rec = TaskRecord(
                id=f"{i:012x}", owner="u-secret-owner", state=state, request=TaskRequest(prompt="p"),
                node_id="n1", attempt=1,
            )  # fmt: skip
            await store.create_task(rec, event_in(rec.id, m.StateEvent(state=state)))
        running = f"{3:012x}"
        usage = m.Usage(input_tokens=100, output_tokens=10, cache_read_input_tokens=3)
        ev = m.ApiRequestEvent(model="claude-metrics-test", status=200, usage=usage)
        msg = m.TaskEvent(task_id=running, node_seq=1, event=ev, attempt=1)
        ingest = Ingest(tasks)
        await ingest.record_events("n1", [msg])
        await ingest.record_events("n1", [msg])  # resent after a reconnect
        moved = await tasks.move(running, State.FAILED, reason="sandbox_failed", expect={State.RUNNING})
        assert moved is not None

        s = parse((await metrics.scrape()).decode())
        assert value(s, "marathon_tasks", state="queued") == 3 and value(s, "marathon_queue_depth") == 3
        assert value(s, "marathon_tasks", state="failed") == 1 and value(s, "marathon_tasks", state="running") == 0
        assert value(s, "marathon_gateway_connections") == 0
        assert value(s, "marathon_tokens_total", model="claude-metrics-test", kind="input") == 100
        assert value(s, "marathon_tokens_total", model="claude-metrics-test", kind="output") == 10
        assert value(s, "marathon_tokens_total", model="claude-metrics-test", kind="cache_read") == 3
        assert value(s, "marathon_cost_usd_total", model="claude-metrics-test") > 0
        assert value(s, "marathon_api_requests_total", model="claude-metrics-test", status="200") == 1
        assert value(s, "marathon_task_duration_seconds_count", outcome="failed") == 1
        assert value(s, "marathon_store_operation_seconds_count", operation="append_events") == 2
        assert value(s, "marathon_store_operation_seconds_count", operation="count_tasks_by_state") == 1
        for v in label_values(s):
            assert "u-secret-owner" not in v and running not in v
        # two services in one process keep their own figures
        assert value(parse((await OrchestratorMetrics().scrape()).decode()), "marathon_tokens_total") == 0
    finally:
        await raw.close()
