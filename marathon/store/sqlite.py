"""SQLite store: WAL, one writer connection used by one thread at a time, one reader."""

from __future__ import annotations

import math
import os
import re
import sqlite3
import time
from typing import Any, TypeVar
from collections.abc import Callable

import msgspec
import trio

from marathon.errors import Conflict, StoreError
from marathon.protocol.messages import Usage
from marathon.store.models import UPDATABLE, EventIn, StoredEvent, TaskRecord
from marathon.secretbox import SecretBox
from marathon.store.ledger_sql import TOTALS_SELECT, totals
from marathon.store.node_identity import SQLITE_SCHEMA as NODE_SCHEMA
from marathon.store.node_identity import NodeIdentityMixin
from marathon.store.sqlite_accounts import AccountsMixin, insert_ledger, reseal_tokens

T = TypeVar("T")
CLOSE_TIMEOUT = 10.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    state TEXT NOT NULL,
    request TEXT NOT NULL,
    reason TEXT, message TEXT, node_id TEXT,
    attempt INTEGER NOT NULL DEFAULT 0,
    free_attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL, updated_at REAL NOT NULL,
    started_at REAL, finished_at REAL,
    last_seq INTEGER NOT NULL DEFAULT 0,
    last_node_seq INTEGER NOT NULL DEFAULT 0,
    usage TEXT NOT NULL DEFAULT '{}',
    cost_usd REAL, num_turns INTEGER NOT NULL DEFAULT 0,
    exit_code INTEGER, is_error INTEGER NOT NULL DEFAULT 0,
    diff_stat TEXT NOT NULL DEFAULT '', final_text TEXT NOT NULL DEFAULT '',
    compute_s REAL NOT NULL DEFAULT 0,
    claude_usage TEXT,
    iterations INTEGER NOT NULL DEFAULT 0, commits INTEGER NOT NULL DEFAULT 0,
    branch TEXT, head TEXT, pr_url TEXT, pr_error TEXT, reply TEXT
);
CREATE INDEX IF NOT EXISTS tasks_by_created ON tasks(created_at, id);
CREATE INDEX IF NOT EXISTS tasks_by_state ON tasks(state, created_at);
CREATE TABLE IF NOT EXISTS events (
    task_id TEXT NOT NULL, seq INTEGER NOT NULL, ts REAL NOT NULL,
    kind TEXT NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (task_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ledger (
    task_id TEXT NOT NULL, user_id TEXT NOT NULL, ts REAL NOT NULL, model TEXT NOT NULL,
    input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
    cache_creation_input_tokens INTEGER NOT NULL, cache_read_input_tokens INTEGER NOT NULL,
    tool_calls INTEGER NOT NULL, cost_usd REAL NOT NULL, status INTEGER NOT NULL,
    duration_s REAL NOT NULL, ttft_s REAL, request_bytes INTEGER NOT NULL,
    response_bytes INTEGER NOT NULL, complete INTEGER NOT NULL, priced INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_by_user ON ledger(user_id, ts);
CREATE INDEX IF NOT EXISTS ledger_by_task ON ledger(task_id);
CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY, email TEXT NOT NULL UNIQUE, password_hash TEXT NOT NULL,
    admin INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL, github_token TEXT
);
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY, user_id TEXT NOT NULL, name TEXT NOT NULL, prefix TEXT NOT NULL,
    key_hash TEXT NOT NULL UNIQUE, created_at REAL NOT NULL, revoked_at REAL, last_used_at REAL
);
CREATE TABLE IF NOT EXISTS sessions (
    token_hash TEXT PRIMARY KEY, user_id TEXT NOT NULL, created_at REAL NOT NULL, expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_by_expiry ON sessions(expires_at);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS artifacts (
    task_id TEXT NOT NULL, name TEXT NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (task_id, name)
) WITHOUT ROWID;
"""

# Columns added after the first schema, in order, never edited: (table, column, definition).
# Applied at open when missing -- ADD COLUMN is additive (old rows get the default), so a
# database written by an older marathon opens as it is and loses nothing.
ADDED_COLUMNS: list[tuple[str, str, str]] = [
    ("tasks", "free_attempts", "INTEGER NOT NULL DEFAULT 0"),
    ("ledger", "web_search_requests", "INTEGER NOT NULL DEFAULT 0"),
    ("ledger", "web_fetch_requests", "INTEGER NOT NULL DEFAULT 0"),
    ("users", "disabled_at", "REAL"),
    ("api_keys", "expires_at", "REAL"),
]


def add_missing_columns(conn: sqlite3.Connection) -> list[str]:
    """The additive migration: ``table.column`` for every column it added."""
    added = []
    conn.execute("BEGIN IMMEDIATE")  # two processes opening one file at once: one adds, the other sees it
    try:
        for table, column, definition in ADDED_COLUMNS:
            have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")  # trusted constants
                added.append(f"{table}.{column}")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return added


_FIELDS = TaskRecord.__struct_fields__
_JSON_FIELDS = frozenset({"request", "usage", "claude_usage"})
_COLUMNS = ", ".join(_FIELDS)
_json = msgspec.json.Encoder()


def _row_to_task(row: tuple) -> TaskRecord:
    d = dict(zip(_FIELDS, row, strict=True))
    for f in _JSON_FIELDS:
        if d[f] is not None:
            d[f] = msgspec.json.decode(d[f])
    return msgspec.convert(d, TaskRecord, strict=False)


def _to_column(name: str, value: Any) -> Any:
    if name in _JSON_FIELDS:
        return None if value is None else _json.encode(value).decode()
    if isinstance(value, bool):
        return int(value)
    return value


def encode_cursor(rec: TaskRecord) -> str:
    return f"{rec.created_at!r}_{rec.id}"


CURSOR_PATTERN = r"^([0-9]{1,20}(?:\.[0-9]{1,20})?(?:e[+-]?[0-9]{1,2})?)_([0-9A-Za-z]{1,64})$"  # the API documents it
_CURSOR = re.compile(CURSOR_PATTERN)


def decode_cursor(cursor: str) -> tuple[float, str]:
    """A cursor from encode_cursor; anything else (malformed, non-finite) is a StoreError."""
    m = _CURSOR.fullmatch(cursor)  # fullmatch: Python's $ would let a trailing newline through
    ts = float(m.group(1)) if m else math.inf
    if not m or not math.isfinite(ts):
        raise StoreError(f"bad cursor {cursor[:100]!r}: pass the next_cursor of a previous page")
    return ts, m.group(2)


class SqliteStore(AccountsMixin, NodeIdentityMixin):
    def __init__(self, path: str, *, secrets: SecretBox | None = None):
        self.path = path
        self.secrets = secrets
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._wlimit = trio.CapacityLimiter(1)
        self._rlimit = trio.CapacityLimiter(1)

    @classmethod
    async def open(cls, path: str, *, secrets: SecretBox | None = None) -> SqliteStore:
        """``secrets`` seals users' GitHub tokens; plaintext ones (from before encryption at rest)
        are sealed here, and a store whose secrets ``secrets`` cannot open is a SecretsError."""
        self = cls(path, secrets=secrets)
        try:
            await trio.to_thread.run_sync(self._open_sync)
        except BaseException:
            await self.close()
            raise
        return self

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    def _open_sync(self) -> None:
        if self.path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._writer = self._connect()
        self._writer.execute("PRAGMA secure_delete=ON")  # what is overwritten or deleted is zeroed in the file
        self._writer.executescript(SCHEMA)
        self._writer.executescript(NODE_SCHEMA)
        add_missing_columns(self._writer)
        if self.secrets is not None:
            reseal_tokens(self._writer, self.secrets, rotate=False)
        self._reader = self._connect()

    async def close(self) -> None:
        for conn, limit in ((self._writer, self._wlimit), (self._reader, self._rlimit)):
            if conn is not None:
                # bounded: a close waits for the query in flight; past the bound the thread is left to end it
                with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                    await trio.to_thread.run_sync(conn.close, limiter=limit, abandon_on_cancel=True)
        self._writer = self._reader = None

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            conn = self._writer
            if conn is None:
                raise StoreError("store is closed")
            conn.execute("BEGIN IMMEDIATE")
            try:
                out = fn(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return out

        try:
            return await trio.to_thread.run_sync(run, limiter=self._wlimit)
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite: {exc}") from exc

    async def _raw_write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn`` on the writer connection, managing its own transactions."""

        def run() -> T:
            if self._writer is None:
                raise StoreError("store is closed")
            return fn(self._writer)

        try:
            return await trio.to_thread.run_sync(run, limiter=self._wlimit)
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite: {exc}") from exc

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            if self._reader is None:
                raise StoreError("store is closed")
            return fn(self._reader)

        try:
            return await trio.to_thread.run_sync(run, limiter=self._rlimit)
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite: {exc}") from exc

    async def _nid_query(self, sql: str, args: tuple[Any, ...]) -> list[tuple]:
        return await self._read(lambda c: c.execute(sql, args).fetchall())

    async def _nid_exec(self, sql: str, args: tuple[Any, ...]) -> int:
        return await self._write(lambda c: c.execute(sql, args).rowcount)

    # ------------------------------------------------------------------ tasks

    async def create_task(self, rec: TaskRecord, first_event: EventIn) -> tuple[TaskRecord, StoredEvent]:
        now = time.time()
        rec.created_at = rec.created_at or now
        rec.updated_at = now

        def fn(conn: sqlite3.Connection):
            values = [_to_column(f, getattr(rec, f)) for f in _FIELDS]
            try:
                conn.execute(f"INSERT INTO tasks ({_COLUMNS}) VALUES ({','.join('?' * len(values))})", values)
            except sqlite3.IntegrityError:
                raise Conflict(f"task {rec.id} exists") from None
            return self._append_one(conn, first_event, now)

        ev = await self._write(fn)
        rec.last_seq = ev.seq
        return rec, ev

    async def get_task(self, task_id: str) -> TaskRecord | None:
        def fn(conn):
            row = conn.execute(f"SELECT {_COLUMNS} FROM tasks WHERE id = ?", (task_id,)).fetchone()
            return _row_to_task(row) if row else None

        return await self._read(fn)

    async def list_tasks(self, *, owner=None, states=None, cursor=None, limit=50, oldest_first=False):
        where, args = [], []
        if owner is not None:
            where.append("owner = ?")
            args.append(owner)
        if states:
            where.append(f"state IN ({','.join('?' * len(states))})")
            args.extend(states)
        op, order = (">", "ASC") if oldest_first else ("<", "DESC")
        if cursor:
            ts, tid = decode_cursor(cursor)
            where.append(f"(created_at {op} ? OR (created_at = ? AND id {op} ?))")
            args.extend([ts, ts, tid])
        sql = f"SELECT {_COLUMNS} FROM tasks"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY created_at {order}, id {order} LIMIT ?"
        args.append(limit + 1)

        rows = await self._read(lambda conn: conn.execute(sql, args).fetchall())
        tasks = [_row_to_task(r) for r in rows[:limit]]
        nxt = encode_cursor(tasks[-1]) if len(rows) > limit else None
        return tasks, nxt

    async def count_tasks_by_state(self) -> dict[str, int]:
        rows = await self._read(
            lambda conn: conn.execute("SELECT state, count(*) FROM tasks GROUP BY state").fetchall()
        )
        return {state: n for state, n in rows}

    async def update_task(self, task_id, *, expect_state, changes, event=None):
        bad = set(changes) - UPDATABLE
        if bad:
            raise StoreError(f"cannot update {sorted(bad)}")
        now = time.time()

        def fn(conn: sqlite3.Connection):
            row = conn.execute("SELECT state FROM tasks WHERE id = ?", (task_id,)).fetchone()
            if row is None or (expect_state is not None and row[0] != expect_state):
                return None
            cols = dict(changes, updated_at=now)
            sets = ", ".join(f"{k} = ?" for k in cols)
            conn.execute(
                f"UPDATE tasks SET {sets} WHERE id = ?",
                [_to_column(k, v) for k, v in cols.items()] + [task_id],
            )
            ev = self._append_one(conn, event, now) if event is not None else None
            row = conn.execute(f"SELECT {_COLUMNS} FROM tasks WHERE id = ?", (task_id,)).fetchone()
            return _row_to_task(row), ev

        return await self._write(fn)

    # ------------------------------------------------------------------ events

    @staticmethod
    def _append_one(conn: sqlite3.Connection, ev: EventIn, now: float) -> StoredEvent | None:
        if ev.node_seq is not None:
            row = conn.execute(
                "UPDATE tasks SET last_seq = last_seq + 1, last_node_seq = ? "
                "WHERE id = ? AND last_node_seq < ? AND (? IS NULL OR node_id = ?) RETURNING last_seq",
                (ev.node_seq, ev.task_id, ev.node_seq, ev.node_id, ev.node_id),
            ).fetchone()
        else:
            row = conn.execute(
                "UPDATE tasks SET last_seq = last_seq + 1 WHERE id = ? RETURNING last_seq", (ev.task_id,)
            ).fetchone()
        if row is None:
            return None
        seq = row[0]
        conn.execute(
            "INSERT INTO events (task_id, seq, ts, kind, data) VALUES (?, ?, ?, ?, ?)",
            (ev.task_id, seq, now, ev.kind, ev.data),
        )
        if ev.ledger is not None:
            insert_ledger(conn, ev.ledger)
        return StoredEvent(ev.task_id, seq, now, ev.kind, ev.data)

    async def append_events(self, items: list[EventIn]) -> list[StoredEvent | None]:
        now = time.time()
        return await self._write(lambda conn: [self._append_one(conn, ev, now) for ev in items])

    async def ledger_totals(self, task_id: str) -> tuple[Usage, float]:
        row = await self._read(
            lambda c: c.execute(
                f"SELECT {TOTALS_SELECT} FROM ledger WHERE task_id = ?",
                (task_id,),
            ).fetchone()
        )
        return totals(row)

    async def events_after(self, task_id: str, after: int, limit: int = 1000) -> list[StoredEvent]:
        def fn(conn):
            rows = conn.execute(
                "SELECT seq, ts, kind, data FROM events WHERE task_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (task_id, after, limit),
            ).fetchall()
            return [StoredEvent(task_id, s, ts, k, bytes(d)) for s, ts, k, d in rows]

        return await self._read(fn)

    # ------------------------------------------------------------------ artifacts

    async def put_artifact(self, task_id: str, name: str, data: bytes) -> None:
        await self._write(
            lambda conn: conn.execute(
                "INSERT OR REPLACE INTO artifacts (task_id, name, data) VALUES (?, ?, ?)", (task_id, name, data)
            )
        )

    async def get_artifact(self, task_id: str, name: str) -> bytes | None:
        row = await self._read(
            lambda conn: conn.execute(
                "SELECT data FROM artifacts WHERE task_id = ? AND name = ?", (task_id, name)
            ).fetchone()
        )
        return bytes(row[0]) if row else None
