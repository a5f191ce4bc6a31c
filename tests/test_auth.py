"""Users, API keys, login tokens, ownership and rate limits, through the HTTP API and the CLI."""

from __future__ import annotations

import pytest

import os
import stat
import sys

import httpx
import trio

from tests.harness import marathon_config, run_marathon, scratch_dir


async def api(mt, token=None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(base_url=mt.url, headers=headers, trust_env=False, timeout=30)


async def register_and_login(mt, email, password="correct horse battery"):
    async with await api(mt) as c:
        r = await c.post("/v1/auth/register", json={"email": email, "password": password})
        assert r.status_code == 201, r.text
        r = await c.post("/v1/auth/login", json={"email": email, "password": password})
        assert r.status_code == 200
        return r.json()["token"]


async def test_auth_ownership_keys_and_errors():
    tmp = scratch_dir()
    config = marathon_config(os.path.join(tmp, "data"), allow_registration=True)
    async with run_marathon(config, role="orchestrator") as mt:
        alice = await register_and_login(mt, "alice@example.com")
        bob = await register_and_login(mt, "bob@example.com")
        async with await api(mt) as anon, await api(mt, alice) as a, await api(mt, bob) as b:
            # no credentials
            r = await anon.get("/v1/tasks")
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
            assert (await anon.post("/v1/tasks", json={"prompt": "x"})).status_code == 401
            assert (await anon.get("/healthz")).status_code == 200
            r = await anon.get("/v1/tasks", headers={"Authorization": "Bearer mk_made_up"})
            assert r.status_code == 401

            # wrong password and unknown email: same status, same message
            r1 = await anon.post("/v1/auth/login", json={"email": "alice@example.com", "password": "wrong password"})
            r2 = await anon.post("/v1/auth/login", json={"email": "nobody@example.com", "password": "wrong password"})
            assert r1.status_code == r2.status_code == 401
            assert r1.json() == r2.json() == {"error": {"code": "unauthorized", "message": "invalid email or password"}}
            r = await anon.post(
                "/v1/auth/register", json={"email": "alice@example.com", "password": "another password"}
            )
            assert r.status_code == 409
            r = await anon.post("/v1/auth/register", json={"email": "carol@example.com", "password": "short"})
            assert r.status_code == 400

            me = (await a.get("/v1/auth/whoami")).json()
            assert me["email"] == "alice@example.com" and me["admin"] is False  # the local admin came first

            # ownership: bob cannot see, cancel, read events or the diff of alice's task: 404, not 403
            task = (await a.post("/v1/tasks", json={"prompt": "alice's task"})).json()
            for method, path in [
                ("GET", f"/v1/tasks/{task['id']}"),
                ("POST", f"/v1/tasks/{task['id']}/cancel"),
                ("GET", f"/v1/tasks/{task['id']}/events?follow=0"),
                ("GET", f"/v1/tasks/{task['id']}/diff"),
            ]:
                r = await b.request(method, path)
                assert r.status_code == 404, (path, r.status_code)
                assert r.json()["error"]["message"] == f"no task {task['id']!r}"
            assert (await b.get("/v1/tasks")).json()["tasks"] == []
            assert [t["id"] for t in (await a.get("/v1/tasks")).json()["tasks"]] == [task["id"]]
            # the administrator sees everyone's
            assert task["id"] in [t["id"] for t in (await mt.client.get("/v1/tasks")).json()["tasks"]]
            assert (await mt.client.get(f"/v1/tasks/{task['id']}")).status_code == 200
            # only admins can ask for someone else's usage
            assert (await b.get("/v1/usage", params={"user": "alice@example.com"})).status_code == 403
            # a local path runs on the node's disk: administrators only
            r = await a.post("/v1/tasks", json={"prompt": "x", "repo": "/etc"})
            assert r.status_code == 403 and "administrators" in r.json()["error"]["message"]
            r = await a.post("/v1/tasks", json={"prompt": "x", "repo": "file:///srv/repo"})
            assert r.status_code == 403
            assert (await a.post("/v1/tasks", json={"prompt": "x", "repo": "acme/api"})).status_code == 201
            assert (await mt.client.get("/v1/usage", params={"user": "alice@example.com"})).status_code == 200

            # API keys: shown once, listed by prefix, revoked -> 401
            r = await a.post("/v1/keys", json={"name": "ci"})
            assert r.status_code == 201
            key = r.json()
            async with await api(mt, key["key"]) as k:
                assert (await k.get("/v1/auth/whoami")).json()["email"] == "alice@example.com"
                listed = (await a.get("/v1/keys")).json()["keys"]
                assert [x["prefix"] for x in listed] == [key["key"][:10]]
                assert all("key" not in x and "key_hash" not in x for x in listed)
                assert (await b.delete(f"/v1/keys/{key['id']}")).status_code == 404  # not bob's
                assert (await a.delete(f"/v1/keys/{key['id']}")).status_code == 200
                r = await k.get("/v1/tasks")
                assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]

            # logout revokes the login token
            assert (await b.post("/v1/auth/logout")).status_code == 200
            assert (await b.get("/v1/tasks")).status_code == 401


async def test_closed_registration_only_administrators_add_users():
    tmp = scratch_dir()
    config = marathon_config(os.path.join(tmp, "data"))  # registration closed: the default
    async with run_marathon(config, role="orchestrator") as mt:
        async with await api(mt) as anon:
            r = await anon.post("/v1/auth/register", json={"email": "eve@example.com", "password": "long enough pw"})
            assert r.status_code == 403 and "closed" in r.json()["error"]["message"]
        r = await mt.client.post("/v1/auth/register", json={"email": "eve@example.com", "password": "long enough pw"})
        assert r.status_code == 201 and r.json()["admin"] is False
        token = (
            await (await api(mt)).post(
                "/v1/auth/login", json={"email": "eve@example.com", "password": "long enough pw"}
            )
        ).json()["token"]
        async with await api(mt, token) as eve:
            r = await eve.post("/v1/auth/register", json={"email": "mallory@example.com", "password": "long enough pw"})
            assert r.status_code == 403


async def test_submission_rate_limit_answers_429_with_retry_after():
    tmp = scratch_dir()
    config = marathon_config(os.path.join(tmp, "data"), submit_rate=1.0, submit_burst=3, allow_registration=True)
    async with run_marathon(config, role="orchestrator") as mt:
        codes = []
        for _ in range(4):
            r = await mt.client.post("/v1/tasks", json={"prompt": "x"})
            codes.append(r.status_code)
        assert codes == [201, 201, 201, 429]
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "rate_limited"
        # another user has their own bucket
        token = await register_and_login(mt, "dave@example.com")
        async with await api(mt, token) as d:
            assert (await d.post("/v1/tasks", json={"prompt": "x"})).status_code == 201


@pytest.mark.slow
async def test_cli_register_login_whoami_keys_logout():
    tmp = scratch_dir()
    config = marathon_config(os.path.join(tmp, "data"), allow_registration=True)
    async with run_marathon(config, role="orchestrator") as mt:
        env = {**os.environ, "MARATHON_URL": mt.url, "XDG_CONFIG_HOME": os.path.join(tmp, "cfg")}

        async def cli(*args, stdin=b""):
            return await trio.run_process(
                [sys.executable, "-m", "marathon", *args],
                stdin=stdin,
                env=env,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )

        r = await cli("register", "erin@example.com", "--password-stdin", stdin=b"a long password\n")
        assert r.returncode == 0, r.stderr
        r = await cli("login", "erin@example.com", "--password-stdin", stdin=b"not the password\n")
        assert r.returncode == 1 and b"invalid email or password" in r.stderr
        r = await cli("login", "erin@example.com", "--password-stdin", stdin=b"a long password\n")
        assert r.returncode == 0, r.stderr
        cred = os.path.join(tmp, "cfg", "marathon", "credentials.json")
        assert stat.S_IMODE(os.stat(cred).st_mode) == 0o600
        r = await cli("whoami")
        assert r.returncode == 0 and b"erin@example.com" in r.stdout
        r = await cli("keys", "create", "laptop")
        key = r.stdout.decode().strip()
        assert r.returncode == 0 and key.startswith("mk_")
        r = await cli("keys", "list")
        assert key[:10].encode() in r.stdout and key.encode() not in r.stdout
        r = await cli("logout")
        assert r.returncode == 0
        r = await cli("whoami")
        assert r.returncode == 1 and b"authentication required" in r.stderr
        r = await trio.run_process(
            [sys.executable, "-m", "marathon", "whoami"],
            env={**env, "MARATHON_TOKEN": key},
            capture_stdout=True,
            check=False,
        )
        assert r.returncode == 0 and b"erin@example.com" in r.stdout


async def test_task_list_filters_by_state_and_pages_with_a_cursor():
    tmp = scratch_dir()
    config = marathon_config(os.path.join(tmp, "data"), submit_burst=50)
    async with run_marathon(config, role="orchestrator") as mt:  # no node: tasks stay queued
        ids = [(await mt.submit(f"task {i}"))["id"] for i in range(7)]
        await mt.client.post(f"/v1/tasks/{ids[0]}/cancel")
        seen, cursor = [], None
        while True:
            page = (
                await mt.client.get("/v1/tasks", params={"limit": 3, **({"cursor": cursor} if cursor else {})})
            ).json()
            seen += [t["id"] for t in page["tasks"]]
            cursor = page["next_cursor"]
            if not cursor:
                break
        assert seen == ids[::-1]  # newest first, each exactly once
        queued = (await mt.client.get("/v1/tasks", params={"state": "queued"})).json()["tasks"]
        assert [t["id"] for t in queued] == ids[:0:-1]
        both = (await mt.client.get("/v1/tasks", params={"state": "queued,cancelled", "limit": 100})).json()["tasks"]
        assert len(both) == 7
        spec = (await mt.client.get("/v1/openapi.json")).json()
        assert spec["openapi"].startswith("3.") and "/v1/tasks/{task_id}/events" in spec["paths"]
        assert "TaskRequest" in spec["components"]["schemas"]
