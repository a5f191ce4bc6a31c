"""PostgreSQL: users, API keys, login sessions, and the usage ledger (as sqlite_accounts.py)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
import psycopg

from marathon.errors import Conflict, SecretsError, StoreError
from marathon.secretbox import (
    CHECK_NAME,
    SecretBox,
    check_value,
    is_sealed,
    plan_reseal,
    token_aad,
    unknown_keys_message,
)
from marathon.store.ledger_sql import LEDGER_COLS, bucket, ledger_row, summary_select
from marathon.store.models import ApiKey, LedgerRow, Session, UsageBucket, User
from marathon.store.postgres_schema import SECRETS_LOCK

T = TypeVar("T")

# the types of the ledger columns, for a "SELECT %s, … FROM s" whose parameters PostgreSQL cannot infer
_PG_TYPES = {str: "text", float: "float8", int: "int8", bool: "bool"}
_LEDGER_CASTS = [
    _PG_TYPES[f.type if isinstance(f.type, type) else float]  # float | None (ttft_s) is float8
    for f in msgspec.structs.fields(LedgerRow)
]


def ledger_placeholders() -> str:
    return ", ".join(f"%s::{t}" for t in _LEDGER_CASTS)


_USER_COLS = "id, email, password_hash, admin, created_at, github_token, disabled_at"
_KEY_COLS = "id, user_id, name, prefix, key_hash, created_at, revoked_at, last_used_at, expires_at"
_NKEY = len(_KEY_COLS.split(","))


def _prefixed(cols: str, alias: str) -> str:
    return ", ".join(f"{alias}.{c.strip()}" for c in cols.split(","))


def _user(row) -> User:
    return User(
        id=row[0],
        email=row[1],
        password_hash=row[2],
        admin=bool(row[3]),
        created_at=row[4],
        github_token=row[5],
        disabled_at=row[6],
    )


def _key(row) -> ApiKey:
    return ApiKey(
        id=row[0],
        user_id=row[1],
        name=row[2],
        prefix=row[3],
        key_hash=row[4],
        created_at=row[5],
        revoked_at=row[6],
        last_used_at=row[7],
        expires_at=row[8],
    )


_DAY = "to_char(to_timestamp({col}) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
_GROUPS = {
    "day": _DAY.format(col="ts"),
    "task": "task_id",
    "model": "model",
    "user": "user_id",
    "total": "'total'::text",
}
_TASK_GROUPS: dict[str, str | None] = {
    "day": _DAY.format(col="created_at"),
    "task": "id",
    "model": None,
    "user": "owner",
    "total": "'total'::text",
}


def reseal_tokens(conn: psycopg.Connection, box: SecretBox, *, rotate: bool) -> tuple[int, int]:
    """As sqlite_accounts.reseal_tokens: the key check first, then one transaction with a
    compare-and-set per row (replicas opening at once seal each token once; an advisory lock
    queues them), nothing changed if a key is missing.  After a change the table is rewritten
    (VACUUM FULL), so the old values do not linger in dead row versions."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SECRETS_LOCK,))
        row = conn.execute("SELECT value FROM meta WHERE name = %s", (CHECK_NAME,)).fetchone()
        check = check_value(row[0] if row else None, box, rotate=rotate)
        if check is not None:
            conn.execute(
                "INSERT INTO meta (name, value) VALUES (%s, %s) ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
                (CHECK_NAME, check),
            )
        rows = conn.execute("SELECT id, github_token FROM users WHERE github_token IS NOT NULL FOR UPDATE").fetchall()
        updates, unknown = plan_reseal([(r[0], r[1]) for r in rows], box, rotate=rotate)
        if unknown:
            raise SecretsError(unknown_keys_message(unknown, box.key_ids))
        for user_id, old, new in updates:
            conn.execute("UPDATE users SET github_token = %s WHERE id = %s AND github_token = %s", (new, user_id, old))
    if updates and conn.autocommit:
        conn.execute("VACUUM FULL users")
    return len(updates), len(rows)


class PgAccountsMixin:
    secrets: SecretBox | None = None

    def _box(self) -> SecretBox:
        if self.secrets is None:
            raise StoreError("this store was opened without a secrets key: GitHub tokens cannot be stored or read")
        return self.secrets

    if TYPE_CHECKING:

        async def _run(self, fn: Callable[[psycopg.Connection], T], *, transaction: bool = False) -> T: ...

    # ------------------------------------------------------------------ users

    async def create_user(self, user: User) -> User:
        user.created_at = user.created_at or time.time()

        def fn(conn: psycopg.Connection) -> User:
            try:
                conn.execute(
                    "INSERT INTO users (id, email, password_hash, admin, created_at) VALUES (%s, %s, %s, %s, %s)",
                    (user.id, user.email, user.password_hash, user.admin, user.created_at),
                )
            except psycopg.errors.UniqueViolation:
                raise Conflict(f"{user.email} is already registered") from None
            return user

        return await self._run(fn, transaction=True)

    async def list_users(self) -> list[User]:
        rows = await self._run(
            lambda c: c.execute(f"SELECT {_USER_COLS} FROM users ORDER BY created_at, id").fetchall()
        )
        return [_user(r) for r in rows]

    async def set_user_disabled(self, user_id: str, disabled: bool) -> User | None:
        """Disable (their sessions are deleted; keys stay, refused while disabled) or enable."""

        def fn(conn: psycopg.Connection) -> User | None:
            if disabled:
                conn.execute(
                    "UPDATE users SET disabled_at = %s WHERE id = %s AND disabled_at IS NULL", (time.time(), user_id)
                )
                conn.execute("DELETE FROM sessions WHERE user_id = %s", (user_id,))
            else:
                conn.execute("UPDATE users SET disabled_at = NULL WHERE id = %s", (user_id,))
            row = conn.execute(f"SELECT {_USER_COLS} FROM users WHERE id = %s", (user_id,)).fetchone()
            return _user(row) if row else None

        return await self._run(fn, transaction=True)

    async def get_user(self, user_id: str) -> User | None:
        row = await self._run(
            lambda c: c.execute(f"SELECT {_USER_COLS} FROM users WHERE id = %s", (user_id,)).fetchone()
        )
        return _user(row) if row else None

    async def get_user_by_email(self, email: str) -> User | None:
        row = await self._run(
            lambda c: c.execute(f"SELECT {_USER_COLS} FROM users WHERE email = %s", (email,)).fetchone()
        )
        return _user(row) if row else None

    async def set_github_token(self, user_id: str, token: str | None) -> None:
        """Stored sealed (AEAD, bound to the user): the database never holds the token itself."""
        value = self._box().seal(token, aad=token_aad(user_id)) if token else None
        await self._run(lambda c: c.execute("UPDATE users SET github_token = %s WHERE id = %s", (value, user_id)))

    async def github_token(self, user_id: str) -> str | None:
        """The user's GitHub token, decrypted: call it only where the token is used."""
        row = await self._run(
            lambda c: c.execute("SELECT github_token FROM users WHERE id = %s", (user_id,)).fetchone()
        )
        if not row or not row[0]:
            return None
        if not is_sealed(row[0]):  # written by an older replica that has not migrated: still the token
            return row[0]
        return self._box().open(row[0], aad=token_aad(user_id), what=f"the GitHub token of user {user_id}")

    async def reseal_secrets(self) -> tuple[int, int]:
        """Re-encrypt every GitHub token with the current key: (changed, total)."""
        box = self._box()
        return await self._run(lambda c: reseal_tokens(c, box, rotate=True))

    async def count_users(self) -> int:
        row = await self._run(lambda c: c.execute("SELECT count(*) FROM users").fetchone())
        return int(row[0]) if row else 0

    # ------------------------------------------------------------------ API keys

    async def create_api_key(self, key: ApiKey) -> ApiKey:
        key.created_at = key.created_at or time.time()
        await self._run(
            lambda c: c.execute(
                f"INSERT INTO api_keys ({_KEY_COLS}) VALUES ({', '.join(['%s'] * _NKEY)})",
                (key.id, key.user_id, key.name, key.prefix, key.key_hash, key.created_at, None, None, key.expires_at),
            )
        )
        return key

    async def list_api_keys(self, user_id: str) -> list[ApiKey]:
        rows = await self._run(
            lambda c: c.execute(
                f"SELECT {_KEY_COLS} FROM api_keys WHERE user_id = %s ORDER BY created_at", (user_id,)
            ).fetchall()
        )
        return [_key(r) for r in rows]

    async def revoke_api_key(self, user_id: str | None, key_id: str) -> bool:
        """Revoke ``user_id``'s key (None: anyone's, for an administrator); False when there
        was no such active key."""
        sql = "UPDATE api_keys SET revoked_at = %s WHERE id = %s AND revoked_at IS NULL"
        args: tuple = (time.time(), key_id)
        if user_id is not None:
            sql, args = sql + " AND user_id = %s", (*args, user_id)
        n = await self._run(lambda c: c.execute(sql, args).rowcount)
        return n == 1

    async def find_api_key(self, key_hash: str) -> tuple[ApiKey, User] | None:
        """An active key (not revoked, not expired) and its user (who may be disabled)."""
        row = await self._run(
            lambda c: c.execute(
                f"SELECT {_prefixed(_KEY_COLS, 'k')}, {_prefixed(_USER_COLS, 'u')} "
                "FROM api_keys k JOIN users u ON u.id = k.user_id WHERE k.key_hash = %s AND k.revoked_at IS NULL "
                "AND (k.expires_at IS NULL OR k.expires_at > %s)",
                (key_hash, time.time()),
            ).fetchone()
        )
        return (_key(row[:_NKEY]), _user(row[_NKEY:])) if row else None

    async def touch_api_key(self, key_id: str, now: float, interval: float) -> None:
        """Record a use: written only when the recorded one is older than ``interval``."""
        await self._run(
            lambda c: c.execute(
                "UPDATE api_keys SET last_used_at = %s WHERE id = %s AND (last_used_at IS NULL OR last_used_at <= %s)",
                (now, key_id, now - interval),
            )
        )

    # ------------------------------------------------------------------ sessions

    async def create_session(self, session: Session) -> None:
        await self._run(
            lambda c: c.execute(
                "INSERT INTO sessions (token_hash, user_id, created_at, expires_at) VALUES (%s, %s, %s, %s)",
                (session.token_hash, session.user_id, session.created_at, session.expires_at),
            )
        )

    async def find_session(self, token_hash: str) -> tuple[Session, User] | None:
        row = await self._run(
            lambda c: c.execute(
                f"SELECT s.token_hash, s.user_id, s.created_at, s.expires_at, {_prefixed(_USER_COLS, 'u')} "
                "FROM sessions s JOIN users u ON u.id = s.user_id WHERE s.token_hash = %s AND s.expires_at > %s",
                (token_hash, time.time()),
            ).fetchone()
        )
        if not row:
            return None
        return Session(token_hash=row[0], user_id=row[1], created_at=row[2], expires_at=row[3]), _user(row[4:])

    async def revoke_session(self, token_hash: str) -> None:
        await self._run(lambda c: c.execute("DELETE FROM sessions WHERE token_hash = %s", (token_hash,)))

    async def purge_sessions(self, now: float, limit: int) -> int:
        """Delete up to ``limit`` sessions expired by ``now``: how many went."""
        return await self._run(
            lambda c: (
                c.execute(
                    "DELETE FROM sessions WHERE token_hash IN "
                    "(SELECT token_hash FROM sessions WHERE expires_at <= %s LIMIT %s)",
                    (now, limit),
                ).rowcount
            )
        )

    # ------------------------------------------------------------------ ledger

    async def ledger_rows(self, task_id: str) -> list[LedgerRow]:
        rows = await self._run(
            lambda c: c.execute(
                f"SELECT {LEDGER_COLS} FROM ledger WHERE task_id = %s ORDER BY ts, id", (task_id,)
            ).fetchall()
        )
        return [ledger_row(r) for r in rows]

    async def usage_summary(self, *, user_id: str | None, since: float, by: str) -> list[UsageBucket]:
        group = _GROUPS[by]
        where, args = ["ts >= %s"], list[Any]([since])
        if user_id is not None:
            where.append("user_id = %s")
            args.append(user_id)
        sql = summary_select(group, where)
        tgroup = _TASK_GROUPS[by]
        twhere, targs = ["created_at >= %s"], list[Any]([since])
        if user_id is not None:
            twhere.append("owner = %s")
            targs.append(user_id)

        def fn(conn: psycopg.Connection):
            rows = conn.execute(sql, args).fetchall()
            compute: dict[str, float] = {}
            if tgroup is not None:
                compute = {
                    k: v
                    for k, v in conn.execute(
                        f"SELECT {tgroup} AS k, sum(compute_s) FROM tasks WHERE {' AND '.join(twhere)} GROUP BY 1",
                        targs,
                    ).fetchall()
                }
            return rows, compute

        rows, compute = await self._run(fn, transaction=True)
        out = {r[0]: bucket(r) for r in rows}
        for k, secs in compute.items():
            if secs:
                out.setdefault(k, UsageBucket(key=k)).compute_s = float(secs)
        return [out[k] for k in sorted(out)]
