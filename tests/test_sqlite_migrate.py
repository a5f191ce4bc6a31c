"""The SQLite store's additive migration: a database written before a column existed opens
as it is, gains the column, and loses nothing."""

from __future__ import annotations

import sqlite3

from marathon.store.sqlite import ADDED_COLUMNS, SqliteStore

OLD_LEDGER = """
CREATE TABLE ledger (
    task_id TEXT NOT NULL, user_id TEXT NOT NULL, ts REAL NOT NULL, model TEXT NOT NULL,
    input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
    cache_creation_input_tokens INTEGER NOT NULL, cache_read_input_tokens INTEGER NOT NULL,
    tool_calls INTEGER NOT NULL, cost_usd REAL NOT NULL, status INTEGER NOT NULL,
    duration_s REAL NOT NULL, ttft_s REAL, request_bytes INTEGER NOT NULL,
    response_bytes INTEGER NOT NULL, complete INTEGER NOT NULL, priced INTEGER NOT NULL
);
INSERT INTO ledger VALUES ('t1', 'u1', 1.0, 'm', 10, 5, 0, 0, 1, 0.25, 200, 1.0, NULL, 1, 1, 1, 1);
"""


async def test_a_database_from_before_server_tool_columns_opens_and_keeps_its_rows(tmp_path):
    path = str(tmp_path / "old.db")
    with sqlite3.connect(path) as conn:
        conn.executescript(OLD_LEDGER)
    store = await SqliteStore.open(path)
    try:
        (row,) = await store.ledger_rows("t1")
        assert (row.input_tokens, row.cost_usd, row.web_search_requests, row.web_fetch_requests) == (10, 0.25, 0, 0)
        usage, cost = await store.ledger_totals("t1")
        assert usage.input_tokens == 10 and usage.web_search_requests == 0 and cost == 0.25
    finally:
        await store.close()
    with sqlite3.connect(path) as conn:
        have = {r[1] for r in conn.execute("PRAGMA table_info(ledger)")}
    assert {c for t, c, _ in ADDED_COLUMNS if t == "ledger"} <= have
    # and opening again changes nothing
    store = await SqliteStore.open(path)
    await store.close()


OLD_ACCOUNTS = """
CREATE TABLE users (
    id TEXT PRIMARY KEY, email TEXT NOT NULL UNIQUE, password_hash TEXT NOT NULL,
    admin INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL, github_token TEXT
);
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY, user_id TEXT NOT NULL, name TEXT NOT NULL, prefix TEXT NOT NULL,
    key_hash TEXT NOT NULL UNIQUE, created_at REAL NOT NULL, revoked_at REAL, last_used_at REAL
);
INSERT INTO users VALUES ('u1', 'a@x', 'h', 1, 1.0, NULL);
INSERT INTO api_keys VALUES ('k1', 'u1', 'ci', 'mk_ab', 'kh1', 1.0, NULL, NULL);
"""


async def test_a_database_from_before_account_lifecycle_columns_keeps_its_users_and_keys(tmp_path):
    path = str(tmp_path / "old.db")
    with sqlite3.connect(path) as conn:
        conn.executescript(OLD_ACCOUNTS)
    store = await SqliteStore.open(path)
    try:
        found = await store.find_api_key("kh1")
        assert found is not None
        key, user = found
        assert key.expires_at is None and user.admin and not user.disabled
        disabled = await store.set_user_disabled("u1", True)
        assert disabled is not None and disabled.disabled
    finally:
        await store.close()
