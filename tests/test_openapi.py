"""The OpenAPI document is the API: every route of the app is in it (a new route without a row
in openapi.py fails here), limits and enums are the server's, and the HTTP details it promises
(405 with Allow, 400 for out-of-range Last-Event-ID and cursors) hold against a live server."""

from __future__ import annotations

import os
import re
from types import SimpleNamespace

import pytest

from marathon.orchestrator import api_tasks
from marathon.orchestrator.api import create_app
from marathon.orchestrator.openapi import ROUTES, error_statuses, openapi_document
from marathon.protocol.messages import State
from marathon.store.models import NOT_BLANK
from tests.harness import marathon_config, run_marathon, scratch_dir


def app_routes() -> set[tuple[str, str]]:
    ctx = SimpleNamespace(accounts=None, tasks=None, nodes=None)
    app = create_app(ctx)  # type: ignore[arg-type]
    out = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
        for method in rule.methods or ():
            if method not in ("HEAD", "OPTIONS"):
                out.add((path, method.lower()))
    return out


def test_every_route_of_the_app_is_documented_and_nothing_else():
    doc = openapi_document()
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    routes = app_routes()
    assert routes - documented == set(), "routes without a row in marathon/orchestrator/openapi.py"
    assert documented - routes == set(), "documented operations the app does not have"
    assert len(routes) == len(ROUTES)


def test_schemas_limits_enums_and_errors_match_the_server():
    doc = openapi_document()
    params = {p["name"]: p for p in doc["paths"]["/v1/tasks"]["get"]["parameters"]}
    assert params["limit"]["schema"]["maximum"] == api_tasks.MAX_PAGE == 500
    assert params["state"]["schema"]["items"]["enum"] == [s.value for s in State]
    schemas = doc["components"]["schemas"]
    assert schemas["TaskView"]["properties"]["state"]["enum"] == [s.value for s in State]
    assert schemas["TaskRequest"]["properties"]["prompt"]["pattern"] == NOT_BLANK  # an empty prompt is refused
    assert schemas["TaskRequest"]["properties"]["max_turns"]["anyOf"][0]["maximum"] == 1000
    assert schemas["TaskRequest"]["additionalProperties"] is False
    assert set(doc["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            for code, resp in op["responses"].items():
                if (
                    code[0] in "45"
                    and path not in ("/", "/ui/{name}", "/favicon.ico")
                    and (path, code) != ("/readyz", "503")
                ):
                    assert resp["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
            if op.get("security") != []:
                assert {"401", "403"} <= set(op["responses"]), (method, path)
    submit = doc["paths"]["/v1/tasks"]["post"]["responses"]
    assert {"201", "400", "401", "403", "413", "429", "5XX"} <= set(submit)
    assert "Retry-After" in submit["429"]["headers"]
    op = next(o for o in ROUTES if o.path == "/v1/tasks/{task_id}/reply")
    assert error_statuses(op) == [400, 401, 403, 404, 409, 413]


async def test_405_carries_allow_and_bad_event_cursors_are_400_without_a_traceback(caplog):
    tmp = scratch_dir()
    config = marathon_config(os.path.join(tmp, "data"))
    async with run_marathon(config, role="orchestrator") as mt:
        r = await mt.client.delete("/v1/tasks")
        assert r.status_code == 405
        assert set(r.headers["allow"].replace(" ", "").split(",")) >= {"GET", "POST"}
        assert r.json()["error"]["code"] == "method_not_allowed"
        r = await mt.client.put("/v1/auth/whoami")
        assert r.status_code == 405 and "GET" in r.headers["allow"]

        task = await mt.submit("stays queued")
        events = f"/v1/tasks/{task['id']}/events"
        for headers, params in [
            ({"Last-Event-ID": "99999999999999999999999"}, {}),
            ({"Last-Event-ID": "-1"}, {}),
            ({"Last-Event-ID": "abc"}, {}),
            ({}, {"after": "99999999999999999999999"}),
            ({"Last-Event-ID": "0"}, {"after": str(2**63)}),  # the header wins, the query is still checked
            ({}, {"follow": "maybe"}),
        ]:
            caplog.clear()
            r = await mt.client.get(events, headers=headers, params=params)
            assert r.status_code == 400, (headers, params, r.text)
            assert r.json()["error"]["code"] == "invalid_request"
            assert not [rec for rec in caplog.records if rec.exc_info], "a traceback in the log"
        r = await mt.client.get(events, headers={"Last-Event-ID": str(2**63 - 1)}, params={"follow": "false"})
        assert r.status_code == 200 and r.text == ""
        for cursor in ("1e999_abc", "nan_abc", "bogus", "1.0_", "1.0_a/b"):
            r = await mt.client.get("/v1/tasks", params={"cursor": cursor})
            assert r.status_code == 400, cursor
        for limit in ("0", "501", "-1", "ten", "5.0"):
            r = await mt.client.get("/v1/tasks", params={"limit": limit})
            assert r.status_code == 400 and "limit" in r.json()["error"]["message"], limit
        assert (await mt.client.get("/v1/tasks", params={"limit": "500"})).status_code == 200
        r = await mt.client.get("/v1/tasks", params={"state": ""})
        assert r.status_code == 400


@pytest.mark.parametrize(
    "field,value",
    [("max_turns", 0), ("max_turns", 1001), ("branch_name", "a..b"), ("memory_limit", "1k")],
)
async def test_task_request_limits_are_enforced_when_decoding(field, value):
    import msgspec

    from marathon.store.models import TaskRequest

    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(msgspec.json.encode({"prompt": "x", field: value}), type=TaskRequest)


def test_a_repository_outside_the_documented_pattern_is_refused_with_what_to_give():
    from marathon.errors import InvalidRequest
    from marathon.orchestrator.tasks import validate_request
    from marathon.store.models import TaskRequest

    for repo in ("./rel", "a/b/c", "HTTPS://x", "host:\x1cpath", "/srv/repo\n"):
        with pytest.raises(InvalidRequest):
            validate_request(TaskRequest(prompt="x", repo=repo))
    for repo in ("acme/api", "/srv/repo", "https://example.com/a.git", "git@host:a/b.git"):
        assert validate_request(TaskRequest(prompt="x", repo=repo)).repo == repo
