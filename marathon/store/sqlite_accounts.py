"""SQLite: users, API keys, login sessions, and the usage ledger."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

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
from marathon.store.ledger_sql import LEDGER_COLS, LEDGER_NAMES, bucket, ledger_row, ledger_values, summary_select
from marathon.store.models import ApiKey, LedgerRow, Session, UsageBucket, User


def insert_ledger(conn: sqlite3.Connection, r: LedgerRow) -> None:
    conn.execute(f"INSERT INTO ledger ({LEDGER_COLS}) VALUES ({','.join('?' * len(LEDGER_NAMES))})", ledger_values(r))


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


_USER_COLS = "id, email, password_hash, admin, created_at, github_token, disabled_at"
_USER = f"SELECT {_USER_COLS} FROM users"
_KEY_COLS = "id, user_id, name, prefix, key_hash, created_at, revoked_at, last_used_at, expires_at"
_NKEY = len(_KEY_COLS.split(","))


def _prefixed(cols: str, alias: str) -> str:
    return ", ".join(f"{alias}.{c.strip()}" for c in cols.split(","))


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


_GROUPS = {
    "day": "strftime('%Y-%m-%d', ts, 'unixepoch')",
    "task": "task_id",
    "model": "model",
    "user": "user_id",
    "total": "'total'",
}


T = TypeVar("T")


def reseal_tokens(conn: sqlite3.Connection, box: SecretBox, *, rotate: bool) -> tuple[int, int]:
    """Seal every plaintext GitHub token (and with ``rotate`` every one sealed with an old key)
    with the current key, in one transaction; (changed, total).  A token sealed with a key the
    box does not have is a SecretsError and changes nothing.  The writer runs with
    ``secure_delete``, and the WAL is truncated after a change: the old values are gone from
    the file, not just unreferenced."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        row = conn.execute("SELECT value FROM meta WHERE name = ?", (CHECK_NAME,)).fetchone()
        check = check_value(row[0] if row else None, box, rotate=rotate)
        if check is not None:
            conn.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (CHECK_NAME, check))
        rows = conn.execute("SELECT id, github_token FROM users WHERE github_token IS NOT NULL").fetchall()
        updates, unknown = plan_reseal(rows, box, rotate=rotate)
        if unknown:
            raise SecretsError(unknown_keys_message(unknown, box.key_ids))
        for user_id, old, new in updates:
            conn.execute("UPDATE users SET github_token = ? WHERE id = ? AND github_token = ?", (new, user_id, old))
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    if updates:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return len(updates), len(rows)


class AccountsMixin:
    secrets: SecretBox | None = None

    if TYPE_CHECKING:  # SqliteStore provides them

        async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T: ...

        async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T: ...

        async def _raw_write(self, fn: Callable[[sqlite3.Connection], T]) -> T: ...

    def _box(self) -> SecretBox:
        if self.secrets is None:
            raise StoreError("this store was opened without a secrets key: GitHub tokens cannot be stored or read")
        return self.secrets

    # ------------------------------------------------------------------ users

    async def create_user(self, user: User) -> User:
        user.created_at = user.created_at or time.time()

        def fn(conn):
            try:
                conn.execute(
                    "INSERT INTO users (id, email, password_hash, admin, created_at) VALUES (?, ?, ?, ?, ?)",
                    (user.id, user.email, user.password_hash, int(user.admin), user.created_at),
                )
            except sqlite3.IntegrityError:
                raise Conflict(f"{user.email} is already registered") from None
            return user

        return await self._write(fn)

    async def list_users(self) -> list[User]:
        rows = await self._read(lambda c: c.execute(f"{_USER} ORDER BY created_at, id").fetchall())
        return [_user(r) for r in rows]

    async def set_user_disabled(self, user_id: str, disabled: bool) -> User | None:
        """Disable (their sessions are deleted; keys stay, refused while disabled) or enable."""

        def fn(conn):
            if disabled:
                conn.execute(
                    "UPDATE users SET disabled_at = ? WHERE id = ? AND disabled_at IS NULL", (time.time(), user_id)
                )
                conn.execute("DELETE FROM sessions WHERE user_id = ?", (user_id,))
            else:
                conn.execute("UPDATE users SET disabled_at = NULL WHERE id = ?", (user_id,))
            row = conn.execute(f"{_USER} WHERE id = ?", (user_id,)).fetchone()
            return _user(row) if row else None

        return await self._write(fn)

    async def get_user(self, user_id: str) -> User | None:
        row = await self._read(lambda c: c.execute(f"{_USER} WHERE id = ?", (user_id,)).fetchone())
        return _user(row) if row else None

    async def get_user_by_email(self, email: str) -> User | None:
        row = await self._read(lambda c: c.execute(f"{_USER} WHERE email = ?", (email,)).fetchone())
        return _user(row) if row else None

    async def set_github_token(self, user_id: str, token: str | None) -> None:
        """Stored sealed (AEAD, bound to the user): the database never holds the token itself."""
        value = self._box().seal(token, aad=token_aad(user_id)) if token else None
        await self._write(lambda c: c.execute("UPDATE users SET github_token = ? WHERE id = ?", (value, user_id)))

    async def github_token(self, user_id: str) -> str | None:
        """The user's GitHub token, decrypted: call it only where the token is used."""
        row = await self._read(
            lambda c: c.execute("SELECT github_token FROM users WHERE id = ?", (user_id,)).fetchone()
        )
        if not row or not row[0]:
            return None
        if not is_sealed(row[0]):  # written by another process before it migrated: still the user's token
            return row[0]
        return self._box().open(row[0], aad=token_aad(user_id), what=f"the GitHub token of user {user_id}")

    async def reseal_secrets(self) -> tuple[int, int]:
        """Re-encrypt every GitHub token with the current key: (changed, total)."""
        box = self._box()
        return await self._raw_write(lambda c: reseal_tokens(c, box, rotate=True))

    async def count_users(self) -> int:
        return (await self._read(lambda c: c.execute("SELECT count(*) FROM users").fetchone()))[0]

    # ------------------------------------------------------------------ API keys

    async def create_api_key(self, key: ApiKey) -> ApiKey:
        key.created_at = key.created_at or time.time()
        await self._write(
            lambda c: c.execute(
                f"INSERT INTO api_keys ({_KEY_COLS}) VALUES ({', '.join('?' * _NKEY)})",
                (key.id, key.user_id, key.name, key.prefix, key.key_hash, key.created_at, None, None, key.expires_at),
            )
        )
        return key

    async def list_api_keys(self, user_id: str) -> list[ApiKey]:
        rows = await self._read(
            lambda c: c.execute(
                f"SELECT {_KEY_COLS} FROM api_keys WHERE user_id = ? ORDER BY created_at", (user_id,)
            ).fetchall()
        )
        return [_key(r) for r in rows]

    async def revoke_api_key(self, user_id: str | None, key_id: str) -> bool:
        """Revoke ``user_id``'s key (None: anyone's, for an administrator); False when there
        was no such active key."""
        sql = "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL"
        args: tuple = (time.time(), key_id)
        if user_id is not None:
            sql, args = sql + " AND user_id = ?", (*args, user_id)
        cur = await self._write(lambda c: c.execute(sql, args))
        return cur.rowcount == 1

    async def find_api_key(self, key_hash: str) -> tuple[ApiKey, User] | None:
        """An active key (not revoked, not expired) and its user (who may be disabled)."""
        row = await self._read(
            lambda c: c.execute(
                f"SELECT {_prefixed(_KEY_COLS, 'k')}, {_prefixed(_USER_COLS, 'u')} "
                "FROM api_keys k JOIN users u ON u.id = k.user_id WHERE k.key_hash = ? AND k.revoked_at IS NULL "
                "AND (k.expires_at IS NULL OR k.expires_at > ?)",
                (key_hash, time.time()),
            ).fetchone()
        )
        return (_key(row[:_NKEY]), _user(row[_NKEY:])) if row else None

    async def touch_api_key(self, key_id: str, now: float, interval: float) -> None:
        """Record a use: written only when the recorded one is older than ``interval``."""
        await self._write(
            lambda c: c.execute(
                "UPDATE api_keys SET last_used_at = ? WHERE id = ? AND (last_used_at IS NULL OR last_used_at <= ?)",
                (now, key_id, now - interval),
            )
        )

    # ------------------------------------------------------------------ sessions

    async def create_session(self, session: Session) -> None:
        await self._write(
            lambda c: c.execute(
                "INSERT INTO sessions (token_hash, user_id, created_at, expires_at) VALUES (?, ?, ?, ?)",
                (session.token_hash, session.user_id, session.created_at, session.expires_at),
            )
        )

    async def find_session(self, token_hash: str) -> tuple[Session, User] | None:
        row = await self._read(
            lambda c: c.execute(
                f"SELECT s.token_hash, s.user_id, s.created_at, s.expires_at, {_prefixed(_USER_COLS, 'u')} "
                "FROM sessions s JOIN users u ON u.id = s.user_id WHERE s.token_hash = ? AND s.expires_at > ?",
                (token_hash, time.time()),
            ).fetchone()
        )
        if not row:
            return None
        return Session(token_hash=row[0], user_id=row[1], created_at=row[2], expires_at=row[3]), _user(row[4:])

    async def revoke_session(self, token_hash: str) -> None:
        await self._write(lambda c: c.execute("DELETE FROM sessions WHERE token_hash = ?", (token_hash,)))

    async def purge_sessions(self, now: float, limit: int) -> int:
        """Delete up to ``limit`` sessions expired by ``now``: how many went."""
        cur = await self._write(
            lambda c: c.execute(
                "DELETE FROM sessions WHERE token_hash IN "
                "(SELECT token_hash FROM sessions WHERE expires_at <= ? LIMIT ?)",
                (now, limit),
            )
        )
        return cur.rowcount

    # ------------------------------------------------------------------ ledger

    async def ledger_rows(self, task_id: str) -> list[LedgerRow]:
        rows = await self._read(
            lambda c: c.execute(
                f"SELECT {LEDGER_COLS} FROM ledger WHERE task_id = ? ORDER BY ts", (task_id,)
            ).fetchall()
        )
        return [ledger_row(r) for r in rows]

    async def usage_summary(self, *, user_id: str | None, since: float, by: str) -> list[UsageBucket]:
        group = _GROUPS[by]
        where, args = ["ts >= ?"], list[Any]([since])
        if user_id is not None:
            where.append("user_id = ?")
            args.append(user_id)
        sql = summary_select(group, where)
        tgroup = {
            "day": "strftime('%Y-%m-%d', created_at, 'unixepoch')",
            "task": "id",
            "model": None,
            "user": "owner",
            "total": "'total'",
        }[by]
        twhere, targs = ["created_at >= ?"], list[Any]([since])
        if user_id is not None:
            twhere.append("owner = ?")
            targs.append(user_id)

        def fn(conn):
            rows = conn.execute(sql, args).fetchall()
            compute = {}
            if tgroup is not None:
                compute = dict(
                    conn.execute(
                        f"SELECT {tgroup} AS k, sum(compute_s) FROM tasks WHERE {' AND '.join(twhere)} GROUP BY k",
                        targs,
                    ).fetchall()
                )
            return rows, compute

        rows, compute = await self._read(fn)
        out = {r[0]: bucket(r) for r in rows}
        for k, secs in compute.items():
            if secs:
                out.setdefault(k, UsageBucket(key=k)).compute_s = secs
        return [out[k] for k in sorted(out)]
