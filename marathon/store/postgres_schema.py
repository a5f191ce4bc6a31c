"""PostgreSQL schema, as numbered migrations applied at start.

Every replica runs ``migrate`` when it opens the store.  The whole run is one transaction
holding ``pg_advisory_xact_lock(MIGRATION_LOCK)``: replicas starting at once queue on the
lock, the first applies what is missing, the others then find nothing left to do.  A
migration is never edited once released; a change is a new entry at the end.
"""

from __future__ import annotations

import time

import psycopg

from marathon.errors import StoreError
from marathon.store.node_identity import POSTGRES_MIGRATION as NODE_MIGRATION

# pg_advisory_xact_lock keys (bigint); any constant unlikely to collide with other software
MIGRATION_LOCK = 0x6D61726174686F6E  # "marathon"
FIRST_USER_LOCK = MIGRATION_LOCK + 1  # no longer taken (no first-registrant administrator); kept reserved
SECRETS_LOCK = MIGRATION_LOCK + 2

MIGRATIONS: list[tuple[str, str]] = [
    (
        "initial schema",
        """
CREATE TABLE tasks (
    id text PRIMARY KEY,
    owner text NOT NULL,
    state text NOT NULL,
    request text NOT NULL,
    reason text, message text, node_id text,
    attempt integer NOT NULL DEFAULT 0,
    created_at double precision NOT NULL, updated_at double precision NOT NULL,
    started_at double precision, finished_at double precision,
    last_seq bigint NOT NULL DEFAULT 0,
    last_node_seq bigint NOT NULL DEFAULT 0,
    usage text NOT NULL DEFAULT '{}',
    cost_usd double precision, num_turns integer NOT NULL DEFAULT 0,
    exit_code integer, is_error boolean NOT NULL DEFAULT false,
    diff_stat text NOT NULL DEFAULT '', final_text text NOT NULL DEFAULT '',
    compute_s double precision NOT NULL DEFAULT 0,
    claude_usage text,
    iterations integer NOT NULL DEFAULT 0, commits integer NOT NULL DEFAULT 0,
    branch text, head text, pr_url text, pr_error text, reply text
);
CREATE INDEX tasks_by_created ON tasks (created_at, id);
CREATE INDEX tasks_by_state ON tasks (state, created_at);
CREATE INDEX tasks_by_owner ON tasks (owner, created_at);
CREATE TABLE events (
    task_id text NOT NULL, seq bigint NOT NULL, ts double precision NOT NULL,
    kind text NOT NULL, data bytea NOT NULL,
    PRIMARY KEY (task_id, seq)
);
CREATE TABLE ledger (
    id bigserial PRIMARY KEY,
    task_id text NOT NULL, user_id text NOT NULL, ts double precision NOT NULL, model text NOT NULL,
    input_tokens bigint NOT NULL, output_tokens bigint NOT NULL,
    cache_creation_input_tokens bigint NOT NULL, cache_read_input_tokens bigint NOT NULL,
    tool_calls integer NOT NULL, cost_usd double precision NOT NULL, status integer NOT NULL,
    duration_s double precision NOT NULL, ttft_s double precision, request_bytes bigint NOT NULL,
    response_bytes bigint NOT NULL, complete boolean NOT NULL, priced boolean NOT NULL
);
CREATE INDEX ledger_by_user ON ledger (user_id, ts);
CREATE INDEX ledger_by_task ON ledger (task_id);
CREATE TABLE users (
    id text PRIMARY KEY, email text NOT NULL UNIQUE, password_hash text NOT NULL,
    admin boolean NOT NULL DEFAULT false, created_at double precision NOT NULL, github_token text
);
CREATE TABLE api_keys (
    id text PRIMARY KEY, user_id text NOT NULL, name text NOT NULL, prefix text NOT NULL,
    key_hash text NOT NULL UNIQUE, created_at double precision NOT NULL,
    revoked_at double precision, last_used_at double precision
);
CREATE INDEX api_keys_by_user ON api_keys (user_id, created_at);
CREATE TABLE sessions (
    token_hash text PRIMARY KEY, user_id text NOT NULL,
    created_at double precision NOT NULL, expires_at double precision NOT NULL
);
CREATE TABLE artifacts (
    task_id text NOT NULL, name text NOT NULL, data bytea NOT NULL,
    PRIMARY KEY (task_id, name)
);
""",
    ),
    (
        "ledger: server-tool requests",
        """
ALTER TABLE ledger
    ADD COLUMN web_search_requests bigint NOT NULL DEFAULT 0,
    ADD COLUMN web_fetch_requests bigint NOT NULL DEFAULT 0;
""",
    ),
    (
        "meta: what the store keeps about itself (the secrets key check)",
        """
CREATE TABLE meta (name text PRIMARY KEY, value text NOT NULL);
""",
    ),
    (
        "attempts given back by nodes shutting down",
        "ALTER TABLE tasks ADD COLUMN free_attempts integer NOT NULL DEFAULT 0;",
    ),
    ("node identities: join tokens and enrolled nodes", NODE_MIGRATION),
    (
        "account lifecycle: disabled users, key expiry, session purge",
        """
ALTER TABLE users ADD COLUMN disabled_at double precision;
ALTER TABLE api_keys ADD COLUMN expires_at double precision;
CREATE INDEX sessions_by_expiry ON sessions (expires_at);
CREATE INDEX sessions_by_user ON sessions (user_id);
""",
    ),
]


def migrate(conn: psycopg.Connection) -> list[int]:
    """Apply the missing migrations in one locked transaction; returns the versions applied."""
    applied: list[int] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            "version integer PRIMARY KEY, name text NOT NULL, applied_at double precision NOT NULL)"
        )
        row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()
        current = row[0] if row else 0
        if current > len(MIGRATIONS):
            raise StoreError(
                f"the database schema is at version {current}, newer than this marathon knows "
                f"({len(MIGRATIONS)}): upgrade marathon"
            )
        for version, (name, sql) in enumerate(MIGRATIONS, start=1):
            if version <= current:
                continue
            conn.execute(sql)  # trusted constant text
            conn.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (%s, %s, %s)",
                (version, name, time.time()),
            )
            applied.append(version)
    return applied
