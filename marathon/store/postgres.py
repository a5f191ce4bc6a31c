"""PostgreSQL store: psycopg 3's sync API and psycopg_pool, run in trio worker threads.

- One ``ConnectionPool``; a ``trio.CapacityLimiter`` of the pool's size in front of it, so a
  thread never queues inside the pool.  The pool checks a connection before handing it out
  (``check_connection``): after a server restart the dead ones are dropped and new ones made.
- Every connection runs with ``statement_timeout`` and ``autocommit``; a call that needs
  several statements runs them in ``conn.transaction()``, most calls are one statement.
- A trio cancellation abandons the worker thread at once and cancels the query on the
  server (``cancel_safe``), so a cancelled request does not keep a backend busy.
- Connection and server failures are ``StoreUnavailable`` (a ``StoreError``: HTTP 503),
  bounded by the pool's wait (``connect_timeout``); the pool reconnects by itself.
- The schema is versioned (postgres_schema.py) and migrated at open under an advisory lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec
import psycopg
import psycopg_pool
import trio

from marathon.errors import Conflict, StoreError, StoreUnavailable
from marathon.protocol.messages import Usage
from marathon.store.models import UPDATABLE, EventIn, StoredEvent, TaskRecord
from marathon.secretbox import SecretBox
from marathon.store.ledger_sql import LEDGER_COLS, TOTALS_SELECT, ledger_values, totals
from marathon.store.postgres_accounts import PgAccountsMixin, ledger_placeholders, reseal_tokens
from marathon.store.node_identity import NodeIdentityMixin
from marathon.store.postgres_schema import migrate
from marathon.store.sqlite import _FIELDS, _JSON_FIELDS, _row_to_task, decode_cursor, encode_cursor

T = TypeVar("T")


def _insert_task(conn: psycopg.Connection, sql: str, args: list, task_id: str) -> None:
    try:
        conn.execute(sql, args)
    except psycopg.errors.UniqueViolation:  # an Idempotency-Key's task, submitted twice at once
        raise Conflict(f"task {task_id} exists") from None


log = logging.getLogger("marathon.store.postgres")

_COLUMNS = ", ".join(_FIELDS)
_json = msgspec.json.Encoder()


def _to_column(name: str, value: Any) -> Any:
    if name in _JSON_FIELDS:
        return None if value is None else _json.encode(value).decode()
    return value  # booleans are booleans here


def redact_url(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://…"
    host, port, db = info.get("host", ""), info.get("port", ""), info.get("dbname", "")
    return f"postgresql://{info.get('user', '')}@{host}{':' + str(port) if port else ''}/{db}"


class _Abandoned(Exception):
    """The caller was cancelled before this call got its connection: do nothing."""


class _Call:
    """One store call's claim on a connection, so a cancellation from the trio side cancels
    exactly this call's query and never a later user's of the same connection."""

    __slots__ = ("lock", "conn", "cancelled")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.conn: psycopg.Connection | None = None
        self.cancelled = False

    def cancel_query(self, timeout: float) -> None:  # in a worker thread
        with self.lock:
            if self.conn is not None:
                try:
                    self.conn.cancel_safe(timeout=timeout)
                except Exception as exc:  # the query is abandoned either way
                    log.debug("cancelling a query failed: %s", exc)


class PostgresStore(PgAccountsMixin, NodeIdentityMixin):
    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 8,
        statement_timeout: float = 30.0,
        connect_timeout: float = 5.0,
        secrets: SecretBox | None = None,
    ):
        self.url = url
        self.secrets = secrets
        self.pool_size = max(1, pool_size)
        self.statement_timeout = statement_timeout
        self.connect_timeout = connect_timeout
        self._limiter = trio.CapacityLimiter(self.pool_size)
        self._pool: psycopg_pool.ConnectionPool | None = None

    @classmethod
    async def open(cls, url: str, **kwargs: Any) -> PostgresStore:
        self = cls(url, **kwargs)
        try:
            await trio.to_thread.run_sync(self._open_sync, abandon_on_cancel=False)
        except psycopg.Error as exc:
            await self.close()
            raise StoreUnavailable(f"cannot open the store at {redact_url(url)}: {exc}") from None
        except BaseException:
            await self.close()
            raise
        return self

    def _open_sync(self) -> None:
        kwargs = {
            "autocommit": True,
            "connect_timeout": max(2, int(self.connect_timeout + 0.999)),
            "application_name": "marathon",
            "options": f"-c statement_timeout={int(self.statement_timeout * 1000)}",
        }
        pool: psycopg_pool.ConnectionPool = psycopg_pool.ConnectionPool(
            self.url,
            min_size=min(2, self.pool_size),
            max_size=self.pool_size,
            kwargs=kwargs,
            open=False,
            check=psycopg_pool.ConnectionPool.check_connection,
            timeout=self.connect_timeout,
            name="marathon",
        )
        self._pool = pool
        pool.open(wait=True, timeout=self.connect_timeout)
        with pool.connection(timeout=self.connect_timeout) as conn:
            applied = migrate(conn)
            if self.secrets is not None:  # plaintext GitHub tokens from before encryption at rest: sealed now
                sealed, _ = reseal_tokens(conn, self.secrets, rotate=False)
                if sealed:
                    log.info("store: encrypted %d GitHub tokens stored in plaintext", sealed)
        if applied:
            log.info("store: applied schema migrations %s on %s", applied, redact_url(self.url))

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await trio.to_thread.run_sync(lambda: pool.close(timeout=5))

    # ------------------------------------------------------------------ running calls

    async def _run(self, fn: Callable[[psycopg.Connection], T], *, transaction: bool = False) -> T:
        call = _Call()
        timeout = self.connect_timeout

        def work() -> T:
            pool = self._pool
            if pool is None:
                raise StoreError("store is closed")
            with pool.connection(timeout=timeout) as conn:
                with call.lock:
                    if call.cancelled:
                        raise _Abandoned  # never seen: the caller has gone
                    call.conn = conn
                try:
                    if transaction:
                        with conn.transaction():
                            return fn(conn)
                    return fn(conn)
                finally:
                    with call.lock:
                        call.conn = None

        try:
            return await trio.to_thread.run_sync(work, limiter=self._limiter, abandon_on_cancel=True)
        except trio.Cancelled:
            with call.lock:
                call.cancelled = True
                busy = call.conn is not None
            if busy:
                with trio.CancelScope(shield=True), trio.move_on_after(timeout + 1):
                    await trio.to_thread.run_sync(call.cancel_query, timeout)
            raise
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            # connection refused / lost, pool timeout, statement timeout, server shutting down
            raise StoreUnavailable(f"postgresql: {exc}".strip()) from None
        except psycopg.Error as exc:
            raise StoreError(f"postgresql: {exc}".strip()) from None

    async def _nid_query(self, sql: str, args: tuple[Any, ...]) -> list[tuple]:
        q = sql.replace("?", "%s")
        return await self._run(lambda c: c.execute(q, args).fetchall())

    async def _nid_exec(self, sql: str, args: tuple[Any, ...]) -> int:
        q = sql.replace("?", "%s")
        return await self._run(lambda c: c.execute(q, args).rowcount, transaction=True)

    # ------------------------------------------------------------------ tasks

    async def create_task(self, rec: TaskRecord, first_event: EventIn) -> tuple[TaskRecord, StoredEvent]:
        now = time.time()
        rec.created_at = rec.created_at or now
        rec.updated_at = now
        fast = first_event.node_seq is None and first_event.ledger is None and first_event.task_id == rec.id

        if fast:  # one statement: the task and its first event
            seq = rec.last_seq + 1
            values = [_to_column(f, seq if f == "last_seq" else getattr(rec, f)) for f in _FIELDS]
            sql = (
                f"WITH t AS (INSERT INTO tasks ({_COLUMNS}) VALUES ({', '.join(['%s'] * len(values))})) "
                "INSERT INTO events (task_id, seq, ts, kind, data) VALUES (%s, %s, %s, %s, %s)"
            )
            args = [*values, rec.id, seq, now, first_event.kind, first_event.data]
            await self._run(lambda c: _insert_task(c, sql, args, rec.id))
            rec.last_seq = seq
            return rec, StoredEvent(rec.id, seq, now, first_event.kind, first_event.data)

        def fn(conn: psycopg.Connection) -> StoredEvent | None:
            values = [_to_column(f, getattr(rec, f)) for f in _FIELDS]
            _insert_task(
                conn, f"INSERT INTO tasks ({_COLUMNS}) VALUES ({', '.join(['%s'] * len(values))})", values, rec.id
            )
            return self._append_one(conn, first_event, now)

        ev = await self._run(fn, transaction=True)
        if ev is None:
            raise StoreError(f"the first event of task {rec.id} was refused")
        rec.last_seq = ev.seq
        return rec, ev

    async def get_task(self, task_id: str) -> TaskRecord | None:
        row = await self._run(lambda c: c.execute(f"SELECT {_COLUMNS} FROM tasks WHERE id = %s", (task_id,)).fetchone())
        return _row_to_task(row) if row else None

    async def list_tasks(self, *, owner=None, states=None, cursor=None, limit=50, oldest_first=False):
        where: list[str] = []
        args: list[Any] = []
        if owner is not None:
            where.append("owner = %s")
            args.append(owner)
        if states:
            where.append("state = ANY(%s)")
            args.append(list(states))
        op, order = (">", "ASC") if oldest_first else ("<", "DESC")
        if cursor:
            ts, tid = decode_cursor(cursor)
            where.append(f"(created_at {op} %s OR (created_at = %s AND id {op} %s))")
            args.extend([ts, ts, tid])
        sql = f"SELECT {_COLUMNS} FROM tasks"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY created_at {order}, id {order} LIMIT %s"
        args.append(limit + 1)

        rows = await self._run(lambda c: c.execute(sql, args).fetchall())
        tasks = [_row_to_task(r) for r in rows[:limit]]
        nxt = encode_cursor(tasks[-1]) if len(rows) > limit else None
        return tasks, nxt

    async def count_tasks_by_state(self) -> dict[str, int]:
        rows = await self._run(lambda c: c.execute("SELECT state, count(*) FROM tasks GROUP BY state").fetchall())
        return {state: int(n) for state, n in rows}

    async def update_task(self, task_id, *, expect_state, changes, event=None):
        bad = set(changes) - UPDATABLE
        if bad:
            raise StoreError(f"cannot update {sorted(bad)}")
        now = time.time()
        cols = dict(changes, updated_at=now)
        sets = ", ".join(f"{k} = %s" for k in cols)
        set_args = [_to_column(k, v) for k, v in cols.items()]
        guard = "id = %s AND (%s::text IS NULL OR state = %s)"
        guard_args = [task_id, expect_state, expect_state]

        if event is None or (event.node_seq is None and event.ledger is None and event.task_id == task_id):
            # one statement: compare-and-set, the event's sequence number, the event row
            if event is None:
                sql = f"UPDATE tasks SET {sets} WHERE {guard} RETURNING {_COLUMNS}"
                args = [*set_args, *guard_args]
            else:
                sql = (
                    f"WITH u AS (UPDATE tasks SET {sets}, last_seq = last_seq + 1 WHERE {guard} RETURNING {_COLUMNS}), "
                    "e AS (INSERT INTO events (task_id, seq, ts, kind, data) "
                    "SELECT id, last_seq, %s::float8, %s::text, %s::bytea FROM u) "
                    f"SELECT {_COLUMNS} FROM u"
                )
                args = [*set_args, *guard_args, now, event.kind, event.data]
            row = await self._run(lambda c: c.execute(sql, args).fetchone())
            if row is None:
                return None
            out = _row_to_task(row)
            ev = None if event is None else StoredEvent(task_id, out.last_seq, now, event.kind, event.data)
            return out, ev

        def fn(conn: psycopg.Connection):
            hit = conn.execute(
                f"UPDATE tasks SET {sets} WHERE {guard} RETURNING id",
                [*set_args, *guard_args],
            ).fetchone()
            if hit is None:
                return None
            ev = self._append_one(conn, event, now)
            row = conn.execute(f"SELECT {_COLUMNS} FROM tasks WHERE id = %s", (task_id,)).fetchone()
            assert row is not None  # updated just now, in this transaction
            return _row_to_task(row), ev

        return await self._run(fn, transaction=True)

    # ------------------------------------------------------------------ events

    @staticmethod
    def _append_sql(ev: EventIn, now: float) -> tuple[str, list[Any]]:
        """One statement that numbers, stores (and meters) one event, or does nothing when a
        node_seq makes it a duplicate / a stale node's.  Returns the new seq or no row."""
        if ev.node_seq is not None:
            upd = (
                "UPDATE tasks SET last_seq = last_seq + 1, last_node_seq = %s "
                "WHERE id = %s AND last_node_seq < %s AND (%s::text IS NULL OR node_id = %s) RETURNING last_seq"
            )
            args: list[Any] = [ev.node_seq, ev.task_id, ev.node_seq, ev.node_id, ev.node_id]
        else:
            upd = "UPDATE tasks SET last_seq = last_seq + 1 WHERE id = %s RETURNING last_seq"
            args = [ev.task_id]
        sql = (
            f"WITH s AS ({upd}), "
            "e AS (INSERT INTO events (task_id, seq, ts, kind, data) "
            "SELECT %s::text, last_seq, %s::float8, %s::text, %s::bytea FROM s RETURNING seq)"
        )
        args += [ev.task_id, now, ev.kind, ev.data]
        if ev.ledger is not None:
            sql += f", l AS (INSERT INTO ledger ({LEDGER_COLS}) SELECT {ledger_placeholders()} FROM s)"
            args += ledger_values(ev.ledger)
        return sql + " SELECT seq FROM e", args

    @classmethod
    def _append_one(cls, conn: psycopg.Connection, ev: EventIn, now: float) -> StoredEvent | None:
        sql, args = cls._append_sql(ev, now)
        row = conn.execute(sql, args).fetchone()
        return None if row is None else StoredEvent(ev.task_id, row[0], now, ev.kind, ev.data)

    async def append_events(self, items: list[EventIn]) -> list[StoredEvent | None]:
        if not items:
            return []
        now = time.time()
        if len(items) == 1:
            return [await self._run(lambda c: self._append_one(c, items[0], now))]

        tasks = sorted({ev.task_id for ev in items})

        def fn(conn: psycopg.Connection) -> list[StoredEvent | None]:
            # pipelined: every statement sent before the first answer is read
            with conn.pipeline():
                if len(tasks) > 1:  # take the rows in one order, so two batches cannot deadlock
                    conn.execute("SELECT 1 FROM tasks WHERE id = ANY(%s) ORDER BY id FOR UPDATE", (tasks,))
                curs = [conn.execute(*self._append_sql(ev, now)) for ev in items]
            out: list[StoredEvent | None] = []
            for ev, cur in zip(items, curs, strict=True):
                row = cur.fetchone()
                out.append(None if row is None else StoredEvent(ev.task_id, row[0], now, ev.kind, ev.data))
            return out

        return await self._run(fn, transaction=True)

    async def events_after(self, task_id: str, after: int, limit: int = 1000) -> list[StoredEvent]:
        rows = await self._run(
            lambda c: c.execute(
                "SELECT seq, ts, kind, data FROM events WHERE task_id = %s AND seq > %s ORDER BY seq LIMIT %s",
                (task_id, after, limit),
            ).fetchall()
        )
        return [StoredEvent(task_id, s, ts, k, bytes(d)) for s, ts, k, d in rows]

    async def ledger_totals(self, task_id: str) -> tuple[Usage, float]:
        row = await self._run(
            lambda c: c.execute(
                f"SELECT {TOTALS_SELECT} FROM ledger WHERE task_id = %s",
                (task_id,),
            ).fetchone()
        )
        return totals(row)

    # ------------------------------------------------------------------ artifacts

    async def put_artifact(self, task_id: str, name: str, data: bytes) -> None:
        await self._run(
            lambda c: c.execute(
                "INSERT INTO artifacts (task_id, name, data) VALUES (%s, %s, %s) "
                "ON CONFLICT (task_id, name) DO UPDATE SET data = EXCLUDED.data",
                (task_id, name, data),
            )
        )

    async def get_artifact(self, task_id: str, name: str) -> bytes | None:
        row = await self._run(
            lambda c: c.execute(
                "SELECT data FROM artifacts WHERE task_id = %s AND name = %s", (task_id, name)
            ).fetchone()
        )
        return bytes(row[0]) if row else None
