"""Account lifecycle: the first administrator made with `marathon admin create-user` (direct
store access, SQLite and PostgreSQL), closed registration, disabled users, expiring keys,
last_used_at, administrators revoking any key, expired sessions purged."""

from __future__ import annotations

import pytest

import os
import sys
import time

import httpx
import trio

from marathon.orchestrator.auth import LAST_USED_INTERVAL, Accounts, token_hash
from marathon.store import open_store
from marathon.store.models import ApiKey, Session
from tests.harness import marathon_config, run_marathon, scratch_dir
from tests.polling import until

PASSWORD = "correct horse battery"


def client(mt, token=None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(base_url=mt.url, headers=headers, trust_env=False, timeout=30)


async def marathon_cli(*args, env: dict, stdin: bytes = b"", cwd: str | None = None):
    return await trio.run_process(
        [sys.executable, "-m", "marathon", *args],
        stdin=stdin,
        env={**os.environ, **env},
        cwd=cwd,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


async def login(mt, email, password=PASSWORD) -> str:
    async with client(mt) as c:
        r = await c.post("/v1/auth/login", json={"email": email, "password": password})
        assert r.status_code == 200, r.text
        return r.json()["token"]


async def _create_user_then_sign_in(tmp: str, store_env: dict) -> None:
    data = os.path.join(tmp, "data")
    env = {"MARATHON_DATA_DIR": data, **store_env}
    r = await marathon_cli(
        "admin", "create-user", "Root@Example.com", "--admin", "--password-stdin", env=env, stdin=b"a long password\n"
    )
    assert r.returncode == 0, r.stderr
    assert b"root@example.com" in r.stdout and b"administrator" in r.stdout
    # again: a clear refusal, nothing changed
    r = await marathon_cli("admin", "create-user", "root@example.com", "--password-stdin", env=env, stdin=b"x" * 9)
    assert r.returncode == 2 and b"already registered" in r.stderr
    r = await marathon_cli("admin", "create-user", "ops@example.com", "--password-stdin", env=env, stdin=b"short\n")
    assert r.returncode == 2 and b"at least 8" in r.stderr

    overrides = {"store": store_env["MARATHON_STORE"]} if "MARATHON_STORE" in store_env else {}
    config = marathon_config(data, **overrides)
    async with run_marathon(config, role="orchestrator") as mt:
        token = await login(mt, "root@example.com", "a long password")
        async with client(mt, token) as root:
            me = (await root.get("/v1/auth/whoami")).json()
            assert me["email"] == "root@example.com" and me["admin"] is True


@pytest.mark.slow
async def test_admin_create_user_on_a_fresh_sqlite_orchestrator():
    await _create_user_then_sign_in(scratch_dir(), {})


@pytest.mark.slow
async def test_admin_create_user_on_postgresql(pg_url):
    await _create_user_then_sign_in(scratch_dir(), {"MARATHON_STORE": pg_url})


async def test_registration_is_closed_by_default_and_nobody_becomes_administrator_by_coming_first():
    tmp = scratch_dir()
    config = marathon_config(os.path.join(tmp, "data"))
    async with run_marathon(config, role="orchestrator") as mt:
        async with client(mt) as anon:
            r = await anon.post("/v1/auth/register", json={"email": "first@example.com", "password": PASSWORD})
            assert r.status_code == 403 and "create-user" in r.json()["error"]["message"]
        # an administrator may create an administrator; nobody else may ask for one
        r = await mt.client.post(
            "/v1/auth/register", json={"email": "second@example.com", "password": PASSWORD, "admin": True}
        )
        assert r.status_code == 201 and r.json()["admin"] is True
    config = marathon_config(os.path.join(tmp, "open"), allow_registration=True)
    async with run_marathon(config, role="orchestrator") as mt, client(mt) as anon:
        r = await anon.post("/v1/auth/register", json={"email": "a@example.com", "password": PASSWORD})
        assert r.status_code == 201 and r.json()["admin"] is False
        r = await anon.post("/v1/auth/register", json={"email": "b@example.com", "password": PASSWORD, "admin": True})
        assert r.status_code == 403


async def test_disable_enable_revoke_expiry_and_last_used():
    tmp = scratch_dir()
    config = marathon_config(os.path.join(tmp, "data"), allow_registration=True)
    async with run_marathon(config, role="orchestrator") as mt:
        async with client(mt) as anon:
            for email in ("alice@example.com", "bob@example.com"):
                assert (await anon.post("/v1/auth/register", json={"email": email, "password": PASSWORD})).is_success
        session = await login(mt, "alice@example.com")
        async with client(mt, session) as alice:
            key = (await alice.post("/v1/keys", json={"name": "ci"})).json()
            # an expiry must be a minute to ten years away; it is kept as a time
            for bad in (-5, 0, 59, 11 * 366 * 86400, "1h"):
                r = await alice.post("/v1/keys", json={"name": "old", "expires_in": bad})
                assert r.status_code == 400 and "expires_in" in r.json()["error"]["message"], bad
            before = time.time()
            r = await alice.post("/v1/keys", json={"name": "soon", "expires_in": 3600})
            assert r.status_code == 201 and before + 3600 <= r.json()["expires_at"] <= time.time() + 3600

            # last_used_at: recorded on use, not rewritten within the interval
            async with client(mt, key["key"]) as k:
                assert (await k.get("/v1/auth/whoami")).status_code == 200
                first = {x["id"]: x for x in (await alice.get("/v1/keys")).json()["keys"]}[key["id"]]["last_used_at"]
                assert first is not None and first <= time.time()
                assert (await k.get("/v1/auth/whoami")).status_code == 200
                again = {x["id"]: x for x in (await alice.get("/v1/keys")).json()["keys"]}[key["id"]]["last_used_at"]
                assert again == first and LAST_USED_INTERVAL >= 60

                # non-administrators cannot use the admin routes
                assert (await alice.get("/v1/admin/users")).status_code == 403
                assert (await alice.post("/v1/admin/users/bob@example.com/disable")).status_code == 403

                # an administrator disables alice: her session and her key stop at once
                users = (await mt.client.get("/v1/admin/users")).json()["users"]
                assert {"alice@example.com", "bob@example.com"} <= {u["email"] for u in users}
                r = await mt.client.post("/v1/admin/users/alice@example.com/disable")
                assert r.status_code == 200 and r.json()["disabled"] is True
                r = await k.get("/v1/tasks")
                assert r.status_code == 403 and "disabled" in r.json()["error"]["message"]
                assert (await alice.get("/v1/tasks")).status_code == 401  # her sessions were ended
                async with client(mt) as anon:
                    r = await anon.post("/v1/auth/login", json={"email": "alice@example.com", "password": PASSWORD})
                    assert r.status_code == 403
                    r = await anon.post("/v1/auth/login", json={"email": "alice@example.com", "password": "wrong pw!"})
                    assert r.status_code == 401  # a wrong password says nothing about the account
                # enabled again: the key works again; the session was ended when she was disabled
                r = await mt.client.post("/v1/admin/users/alice@example.com/enable")
                assert r.status_code == 200 and r.json()["disabled"] is False
                assert (await k.get("/v1/tasks")).status_code == 200
                assert (await alice.get("/v1/tasks")).status_code == 401

                # an administrator revokes alice's key
                listed = (await mt.client.get("/v1/admin/users/alice@example.com/keys")).json()["keys"]
                assert key["id"] in [x["id"] for x in listed]
                assert (await mt.client.delete(f"/v1/admin/keys/{key['id']}")).status_code == 200
                assert (await mt.client.delete(f"/v1/admin/keys/{key['id']}")).status_code == 404
                r = await k.get("/v1/tasks")
                assert r.status_code == 401

            # an administrator cannot disable themselves; unknown users are 404
            me = (await mt.client.get("/v1/auth/whoami")).json()
            assert (await mt.client.post(f"/v1/admin/users/{me['id']}/disable")).status_code == 409
            assert (await mt.client.post("/v1/admin/users/nobody@example.com/disable")).status_code == 404

        # an expired key (written with a past expiry) is refused like a revoked one
        bob = await mt.info.accounts.store.get_user_by_email("bob@example.com")
        await mt.info.accounts.store.create_api_key(
            ApiKey(
                id="k_exp2",
                user_id=bob.id,
                name="x",
                prefix="mk_exp2",
                key_hash=token_hash("mk_expired_key"),
                expires_at=time.time() - 1,
            )
        )
        async with client(mt, "mk_expired_key") as k:
            r = await k.get("/v1/auth/whoami")
            assert r.status_code == 401 and "expired" in r.json()["error"]["message"]


@pytest.mark.slow
async def test_admin_cli_users_disable_enable_revoke_key():
    tmp = scratch_dir()
    config = marathon_config(os.path.join(tmp, "data"), allow_registration=True)
    async with run_marathon(config, role="orchestrator") as mt:
        async with client(mt) as anon:
            assert (
                await anon.post("/v1/auth/register", json={"email": "c@example.com", "password": PASSWORD})
            ).is_success
        carol = await login(mt, "c@example.com")
        async with client(mt, carol) as c:
            key = (await c.post("/v1/keys", json={"name": "laptop"})).json()
        admin_key = mt.client.headers["Authorization"][7:]
        env = {"MARATHON_URL": mt.url, "MARATHON_TOKEN": admin_key, "XDG_CONFIG_HOME": os.path.join(tmp, "cfg")}
        r = await marathon_cli("admin", "users", env=env)
        assert r.returncode == 0 and b"c@example.com" in r.stdout and b"admin" in r.stdout, r.stderr
        r = await marathon_cli("admin", "disable", "c@example.com", env=env)
        assert r.returncode == 0 and b"disabled" in r.stdout, r.stderr
        async with client(mt, key["key"]) as k:
            assert (await k.get("/v1/tasks")).status_code == 403
            r = await marathon_cli("admin", "users", env=env)
            assert b"disabled" in r.stdout
            r = await marathon_cli("admin", "enable", "c@example.com", env=env)
            assert r.returncode == 0, r.stderr
            assert (await k.get("/v1/tasks")).status_code == 200
            r = await marathon_cli("admin", "revoke-key", key["id"], env=env)
            assert r.returncode == 0 and key["id"].encode() in r.stdout, r.stderr
            assert (await k.get("/v1/tasks")).status_code == 401
        r = await marathon_cli("admin", "revoke-key", key["id"], env=env)
        assert r.returncode == 2 and b"no active key" in r.stderr
        r = await marathon_cli("admin", "disable", "ghost@example.com", env=env)
        assert r.returncode == 2 and b"no user" in r.stderr
        # keys create --expires: the expiry is kept and shown (a new login: disabling ended her sessions)
        carol = await login(mt, "c@example.com")
        r = await marathon_cli("keys", "create", "short-lived", "--expires", "2d", env={**env, "MARATHON_TOKEN": carol})
        assert r.returncode == 0, r.stderr
        async with client(mt, carol) as c:
            listed = {x["name"]: x for x in (await c.get("/v1/keys")).json()["keys"]}
        assert abs(listed["short-lived"]["expires_at"] - (time.time() + 2 * 86400)) < 120
        r = await marathon_cli("keys", "create", "x", "--expires", "soon", env={**env, "MARATHON_TOKEN": carol})
        assert r.returncode == 2 and b"bad --expires" in r.stderr


async def test_expired_sessions_are_purged_in_bounded_batches(tmp_path):
    store = await open_store(f"sqlite://{tmp_path / 't.db'}", str(tmp_path))
    try:
        accounts = Accounts(store, session_ttl=60)
        user = await accounts.create_user("p@example.com", PASSWORD)
        now = time.time()
        for i in range(1203):
            await store.create_session(Session(token_hash=f"old{i}", user_id=user.id, created_at=0, expires_at=now - 1))
        token, _, _ = await accounts.login("p@example.com", PASSWORD)
        import marathon.orchestrator.auth as auth

        assert await accounts.purge_sessions() == 1203 <= auth.PURGE_BATCH * auth.PURGE_MAX_BATCHES
        assert await accounts.purge_sessions() == 0
        assert (await accounts.authenticate(f"Bearer {token}")).user == user.id  # the live one stays
    finally:
        await store.close()


async def test_the_orchestrator_purges_expired_sessions_periodically():
    tmp = scratch_dir()
    config = marathon_config(os.path.join(tmp, "data"), session_purge_interval=0.2)
    async with run_marathon(config, role="orchestrator") as mt:
        store = mt.info.accounts.store
        admin = await store.get_user_by_email("admin@localhost")
        now = time.time()
        await store.create_session(Session(token_hash="gone", user_id=admin.id, created_at=now - 9, expires_at=now - 1))

        async def purged() -> bool:
            count = await store._read(lambda c: c.execute("SELECT count(*) FROM sessions WHERE token_hash = 'gone'"))
            return count.fetchone()[0] == 0

        await until(purged, timeout=10)
