"""GitHub tokens at rest: sealed with AES-256-GCM in both stores, absent from the raw database
(read with sqlite3 and psql, and from the files themselves), plaintext ones from before migrated
at open, a key rotation with `marathon admin rotate-secrets`, and a wrong key as a clear error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from marathon.bus.memory import MemoryBus
from marathon.config import load_config
from marathon.errors import ConfigError, SecretsError
from marathon.orchestrator.tasks import TaskService
from marathon.secretbox import SecretBox, key_id, new_key, parse_key, token_aad
from marathon.store import TaskRecord, TaskRequest, open_store
from marathon.store.models import EventIn, User
from tests.servers import PG_BIN

TOKENS = {f"u{i}": f"ghp_secret{i}_" + "Q" * 30 for i in range(3)}


# ---------------------------------------------------------------- the box


def test_seal_and_open_bind_a_value_to_its_owner_and_name_the_key():
    a, b = new_key(), new_key()
    box = SecretBox.from_text(a)
    s1, s2 = box.seal("ghp_x", aad=token_aad("u1")), box.seal("ghp_x", aad=token_aad("u1"))
    assert s1 != s2 and "ghp_x" not in s1 and s1.startswith(f"mse1:{box.key_id}:")  # a fresh nonce each time
    assert box.open(s1, aad=token_aad("u1")) == "ghp_x"
    with pytest.raises(SecretsError, match="altered or belongs to another record"):
        box.open(s1, aad=token_aad("u2"))  # copied onto another user's row
    tampered = s1[:-2] + ("A" if s1[-2] != "A" else "B") + s1[-1]
    with pytest.raises(SecretsError, match="altered"):
        box.open(tampered, aad=token_aad("u1"))
    rotated = SecretBox.from_text(b, [a])  # the old key still opens, the new one seals
    assert rotated.open(s1, aad=token_aad("u1")) == "ghp_x"
    assert rotated.seal("y", aad=b"").startswith(f"mse1:{key_id(parse_key(b))}:")
    with pytest.raises(SecretsError, match=f"key id {box.key_id}"):
        SecretBox.from_text(b).open(s1, aad=token_aad("u1"))


@pytest.mark.parametrize("bad", ["short", "x" * 40, "!" * 43, new_key() + "AAAA"])
def test_a_malformed_key_is_a_configuration_error(bad):
    with pytest.raises(ConfigError, match="32 random bytes"):
        parse_key(bad)
    with pytest.raises(ConfigError, match="secrets_key"):
        load_config({}, env={"MARATHON_SECRETS_KEY": bad}, cwd="/nonexistent")


# ---------------------------------------------------------------- both stores, read raw


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, tmp_path):
    """(store URL, raw(): every byte the database holds as text a person could read)."""
    if request.param == "sqlite":
        path = str(tmp_path / "m.db")

        def raw_sqlite() -> bytes:
            dump = subprocess.run(["sqlite3", path, ".dump"], check=True, capture_output=True).stdout
            files = b"".join(Path(p).read_bytes() for p in (path, path + "-wal") if os.path.exists(p))
            return dump + files

        return f"sqlite://{path}", raw_sqlite
    server = request.getfixturevalue("pg_server")
    url = server.create_database()

    def raw() -> bytes:
        psql = [str(PG_BIN / "psql"), url, "-X", "-A", "-t", "-c"]
        out = subprocess.run([*psql, "SELECT * FROM users"], check=True, capture_output=True).stdout
        out += subprocess.run([str(PG_BIN / "pg_dump"), url], check=True, capture_output=True).stdout
        subprocess.run([*psql, "CHECKPOINT"], check=True, capture_output=True)
        rel = subprocess.run([*psql, "SELECT pg_relation_filepath('users')"], check=True, capture_output=True)
        return out + Path(server.data, rel.stdout.decode().strip()).read_bytes()  # the table's heap file

    return url, raw


def config_for(tmp_path, url: str, key: str | None = None, old: list[str] | None = None):
    env = {"MARATHON_STORE": url}
    if key:
        env["MARATHON_SECRETS_KEY"] = key
    if old:
        env["MARATHON_SECRETS_OLD_KEYS"] = ",".join(old)
    return load_config({"data_dir": str(tmp_path / "data")}, env=env, cwd="/nonexistent"), env


async def with_users(store) -> None:
    for uid in TOKENS:
        await store.create_user(User(id=uid, email=f"{uid}@example.com", password_hash="x"))


def task(i: int, owner: str, repo: str | None) -> TaskRecord:
    return TaskRecord(id=f"t{i}", owner=owner, state="queued", request=TaskRequest(prompt="p", repo=repo))


async def test_the_database_holds_no_token_and_tasks_still_get_it(backend, tmp_path):
    url, raw = backend
    config, _ = config_for(tmp_path, url, new_key())
    store = await open_store(url, config.data_dir, config=config)
    try:
        await with_users(store)
        for uid, token in TOKENS.items():
            await store.set_github_token(uid, token)
        for uid, token in TOKENS.items():
            assert await store.github_token(uid) == token
        repos = ["acme/api", None, "https://git.example.org/acme/api.git", "/srv/repo", "https://github.com/a/b"]
        for i, repo in enumerate(repos):
            await store.create_task(task(i, "u1", repo), EventIn(f"t{i}", "state", b"{}"))
        service = TaskService(store, MemoryBus(), config)
        got = [(await service.assignment(await service.get(f"t{i}")))[0].github_token for i in range(len(repos))]
        # a clone from GitHub may need it; no repository, another host or a local path: no token
        assert got == [TOKENS["u1"], None, None, None, TOKENS["u1"]]
    finally:
        await store.close()
    data = raw()
    assert b"mse1:" in data  # the sealed values are there...
    for token in TOKENS.values():
        assert token.encode() not in data  # ...and the tokens are not


async def test_plaintext_tokens_from_before_are_encrypted_at_open(backend, tmp_path):
    url, raw = backend
    config, _ = config_for(tmp_path, url, new_key())
    store = await open_store(url, config.data_dir, config=config)
    await with_users(store)
    await store.close()
    # what an older marathon left behind: the token itself in the column
    for uid, token in TOKENS.items():
        sql = f"UPDATE users SET github_token = '{token}' WHERE id = '{uid}'"
        if url.startswith("sqlite://"):
            await trio.run_process(["sqlite3", url[len("sqlite://") :], sql])
        else:
            await trio.run_process([str(PG_BIN / "psql"), url, "-X", "-c", sql], capture_stdout=True)
    assert TOKENS["u0"].encode() in raw()
    store = await open_store(url, config.data_dir, config=config)
    try:
        for uid, token in TOKENS.items():
            assert await store.github_token(uid) == token
            user = await store.get_user(uid)
            assert user is not None and (user.github_token or "").startswith("mse1:")
    finally:
        await store.close()
    data = raw()
    for token in TOKENS.values():
        assert token.encode() not in data  # gone from the files too (secure_delete / VACUUM FULL)


async def test_rotation_and_a_wrong_key(backend, tmp_path):
    url, _ = backend
    old, new = new_key(), new_key()
    config, _ = config_for(tmp_path, url, old)
    store = await open_store(url, config.data_dir, config=config)
    await with_users(store)
    for uid, token in TOKENS.items():
        await store.set_github_token(uid, token)
    await store.close()

    # a wrong key: a clear error at open, naming the key the store needs; nothing changed
    wrong, _ = config_for(tmp_path, url, new_key())
    with pytest.raises(SecretsError, match=f"key id {key_id(parse_key(old))}.*secrets_key"):
        await open_store(url, wrong.data_dir, config=wrong)

    # step 2: the new key current, the old one still accepted
    during, env = config_for(tmp_path, url, new, [old])
    store = await open_store(url, during.data_dir, config=during)
    assert await store.github_token("u1") == TOKENS["u1"]
    await store.close()
    # step 3: re-encrypt everything, as an operator would
    res = await trio.run_process(
        [sys.executable, "-m", "marathon", "admin", "rotate-secrets", "--data-dir", during.data_dir],
        env={**os.environ, **env},
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert res.returncode == 0, res.stderr.decode()
    new_id = key_id(parse_key(new))
    assert f"3 of 3 GitHub tokens re-encrypted; all are now encrypted with key {new_id}" in res.stdout.decode()
    # step 4: the old key removed -- everything still opens
    after, _ = config_for(tmp_path, url, new)
    store = await open_store(url, after.data_dir, config=after)
    try:
        for uid, token in TOKENS.items():
            assert await store.github_token(uid) == token
            user = await store.get_user(uid)
            assert user is not None and (user.github_token or "").startswith(f"mse1:{new_id}:")
    finally:
        await store.close()
    # and the old key alone no longer does
    stale, _ = config_for(tmp_path, url, old)
    with pytest.raises(SecretsError, match=f"key id {new_id}"):
        await open_store(url, stale.data_dir, config=stale)


async def test_an_empty_store_remembers_its_key_and_the_generated_key_is_private(tmp_path):
    """Even before any token exists, a second process with another key is refused (two replicas
    that each generated a key would otherwise seal tokens the other cannot open)."""
    url = f"sqlite://{tmp_path / 'm.db'}"
    config, _ = config_for(tmp_path, url)  # no key configured: generated into the data dir
    store = await open_store(url, config.data_dir, config=config)
    await store.close()
    key_file = Path(config.data_dir, "secrets_key")
    assert key_file.stat().st_mode & 0o777 == 0o600
    other, _ = config_for(tmp_path / "elsewhere", url)
    with pytest.raises(SecretsError, match="secrets_key"):
        await open_store(url, other.data_dir, config=other)
    # configuring a key: the generated one still opens what it sealed (it counts as an old key)
    configured, _ = config_for(tmp_path, url, new_key())
    store = await open_store(url, configured.data_dir, config=configured)
    await store.close()


async def test_the_orchestrator_refuses_to_start_with_a_wrong_key(tmp_path):
    url = f"sqlite://{tmp_path / 'm.db'}"
    config, _ = config_for(tmp_path, url, new_key())
    await (await open_store(url, config.data_dir, config=config)).close()
    env = {
        **os.environ,
        "MARATHON_STORE": url,
        "MARATHON_SECRETS_KEY": new_key(),
        "MARATHON_DATA_DIR": config.data_dir,
        "MARATHON_HTTP_LISTEN": "tcp:127.0.0.1:0",
        "MARATHON_GATEWAY_LISTEN": "tcp:127.0.0.1:0",
    }
    with trio.fail_after(60):
        res = await trio.run_process(
            [sys.executable, "-m", "marathon", "serve", "--role", "orchestrator"],
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=str(tmp_path),
        )
    err = res.stderr.decode()
    assert res.returncode == 2, err
    assert "secrets are encrypted with key id" in err and "Traceback" not in err
    assert env["MARATHON_SECRETS_KEY"] not in err


def test_only_tasks_that_need_it_get_the_github_token():
    from marathon.repos import needs_github_token

    gh = "https://github.com"
    assert needs_github_token("https://git.example.org/a/b", True, gh)  # --pr: push and open it
    assert needs_github_token("acme/api", False, gh)  # a clone from GitHub (maybe private)
    assert needs_github_token("git@github.com:acme/api.git", False, gh)
    assert needs_github_token("https://ghe.corp/acme/api", False, "https://ghe.corp")
    assert not needs_github_token("https://git.example.org/a/b", False, gh)
    assert not needs_github_token("/srv/repo", False, gh)
    assert not needs_github_token(None, False, gh)
