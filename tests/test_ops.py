"""/readyz beside /healthz, and the dashboard's static files at / (headers, caching, what ships)."""

from __future__ import annotations

import os
import re

import httpx
import pytest
import trio

from marathon.bus.memory import MemoryBus
from marathon.bus.ratelimit import MemoryRateLimiter
from marathon.errors import StoreError
from marathon.orchestrator.api import ApiContext, create_app
from marathon.orchestrator.auth import Accounts
from marathon.orchestrator.nodes import NodeRegistry
from marathon.orchestrator.openapi import openapi_document
from marathon.orchestrator.tasks import TaskService
from marathon.orchestrator.web import WEB_DIR, load_assets
from marathon.store import open_store
from tests.harness import marathon_config, run_marathon, scratch_dir


@pytest.fixture
async def app_and_store(tmp_path):
    config = marathon_config(str(tmp_path))
    store = await open_store("sqlite", str(tmp_path))
    gateway_up = {"listening": True}

    async def gateway() -> None:
        if not gateway_up["listening"]:
            raise RuntimeError("gateway down at 10.1.2.3 with password hunter2")

    async def no_cancel(node_id, task_id):
        return False

    ctx = ApiContext(
        TaskService(store, MemoryBus(), config),
        NodeRegistry(),
        MemoryBus(),
        no_cancel,
        Accounts(store, session_ttl=60),
        MemoryRateLimiter(),
        ready_checks={"gateway": gateway},
    )
    try:
        yield create_app(ctx), store, gateway_up
    finally:
        await store.close()


async def test_readyz_reports_each_check(app_and_store, monkeypatch, autojump_clock):
    app, store, gateway_up = app_and_store
    client = app.test_client()
    r = await client.get("/readyz")
    assert r.status_code == 200
    assert await r.get_json() == {"ready": True, "checks": {"store": "ok", "gateway": "ok"}}

    gateway_up["listening"] = False
    r = await client.get("/readyz")
    body = await r.get_data(as_text=True)
    assert r.status_code == 503
    assert (await r.get_json())["checks"] == {"store": "ok", "gateway": "failed"}
    assert "hunter2" not in body and "10.1.2.3" not in body  # the detail goes to the log only
    gateway_up["listening"] = True

    async def broken(task_id):
        raise StoreError("database is locked")

    monkeypatch.setattr(store, "get_task", broken)
    r = await client.get("/readyz")
    assert r.status_code == 503 and (await r.get_json())["checks"]["store"] == "failed"

    async def hangs(task_id):
        await trio.sleep_forever()

    monkeypatch.setattr(store, "get_task", hangs)
    r = await client.get("/readyz")
    assert r.status_code == 503 and (await r.get_json())["checks"]["store"] == "timeout"
    # liveness does not depend on the store
    assert (await client.get("/healthz")).status_code == 200


def test_openapi_documents_readyz():
    doc = openapi_document()
    op = doc["paths"]["/readyz"]["get"]
    assert set(op["responses"]) == {"200", "503"} and op["security"] == []


async def test_running_orchestrator_is_ready_and_serves_the_dashboard():
    config = marathon_config(os.path.join(scratch_dir(), "data"))
    async with (
        run_marathon(config, role="orchestrator") as mt,
        httpx.AsyncClient(base_url=mt.url, trust_env=False) as anon,
    ):
        r = await anon.get("/readyz")
        assert r.status_code == 200 and r.json() == {
            "ready": True,
            "checks": {"store": "ok", "gateway": "ok", "leader": "ok"},
        }

        r = await anon.get("/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        csp = r.headers["content-security-policy"]
        # the page may talk to this origin only: no CDN, no external request, no inline script
        assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "script-src 'self'" in csp
        assert "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
        assert r.headers["x-content-type-options"] == "nosniff"
        html = r.text
        assert '<script type="module" src="/ui/app.js">' in html and "<script>" not in html

        # every asset the page refers to is served with its type; nothing external
        refs = set(re.findall(r'(?:src|href)="(/ui/[^"]+)"', html))
        assert {"/ui/app.js", "/ui/app.css", "/ui/favicon.svg"} <= refs
        for name in sorted(os.listdir(WEB_DIR)):
            r = await anon.get(f"/ui/{name}")
            assert r.status_code == 200, name
            if name.endswith(".js"):
                assert r.headers["content-type"].startswith("text/javascript")
                for imp in re.findall(r'^import .* from "([^"]+)";$', r.text, re.M):
                    assert imp.startswith("./") and os.path.exists(os.path.join(WEB_DIR, imp[2:])), (name, imp)
                urls = set(re.findall(r"https?://[\w.-]+[^\s\"'`]*", r.text))
                assert urls <= {"http://www.w3.org/2000/svg"}, (name, urls)  # a namespace, not a request
        # revalidation: the ETag answers 304
        r = await anon.get("/ui/app.js")
        r2 = await anon.get("/ui/app.js", headers={"If-None-Match": r.headers["etag"]})
        assert r2.status_code == 304 and r2.content == b""
        assert (await anon.get("/ui/nope.js")).status_code == 404
        assert (await anon.get("/ui/..%2Fapi.py")).status_code == 404
        assert (await anon.get("/favicon.ico")).headers["content-type"] == "image/svg+xml"


def test_every_dashboard_file_ships_with_the_package():
    import tomllib

    from tests.harness import REPO_ROOT

    assets = load_assets()
    assert {"index.html", "app.js", "app.css", "api.js", "task.js", "tasks.js", "diff.js", "charts.js"} <= set(assets)
    assert all("/" not in name for name in assets)  # one flat folder: package-data "web/*" covers it
    py = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert "web/*" in py["tool"]["setuptools"]["package-data"]["marathon"]
    assert '("marathon/web", "marathon/web")' in (REPO_ROOT / "marathon.spec").read_text()
