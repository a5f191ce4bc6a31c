"""Node identities in the store (SQLite and PostgreSQL alike): join tokens and enrolled nodes.

One mixin over two tiny adapters (``_nid_query``/``_nid_exec``), with ``?`` placeholders that
the PostgreSQL adapter turns into ``%s``.
"""

from __future__ import annotations

from typing import Any

from marathon.store.models import JoinToken, NodeCredential

SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS join_tokens (
    id TEXT PRIMARY KEY, token_hash TEXT NOT NULL, created_at REAL NOT NULL, expires_at REAL NOT NULL,
    max_slots INTEGER NOT NULL, created_by TEXT NOT NULL DEFAULT '', used_at REAL, used_by TEXT
);
CREATE TABLE IF NOT EXISTS node_credentials (
    node_id TEXT PRIMARY KEY, public_key TEXT NOT NULL, server_key TEXT NOT NULL,
    max_slots INTEGER NOT NULL, created_at REAL NOT NULL, revoked_at REAL
);
"""

POSTGRES_MIGRATION = """
CREATE TABLE join_tokens (
    id text PRIMARY KEY, token_hash text NOT NULL, created_at double precision NOT NULL, expires_at double precision NOT NULL,
    max_slots integer NOT NULL, created_by text NOT NULL DEFAULT '', used_at double precision, used_by text
);
CREATE TABLE node_credentials (
    node_id text PRIMARY KEY, public_key text NOT NULL, server_key text NOT NULL,
    max_slots integer NOT NULL, created_at double precision NOT NULL, revoked_at double precision
);
"""

_TOKEN_COLS = "id, token_hash, created_at, expires_at, max_slots, created_by, used_at, used_by"
_CRED_COLS = "node_id, public_key, server_key, max_slots, created_at, revoked_at"


def _token(row) -> JoinToken:
    return JoinToken(**dict(zip([c.strip() for c in _TOKEN_COLS.split(",")], row, strict=True)))


def _cred(row) -> NodeCredential:
    return NodeCredential(**dict(zip([c.strip() for c in _CRED_COLS.split(",")], row, strict=True)))


class NodeIdentityMixin:
    async def _nid_query(self, sql: str, args: tuple[Any, ...]) -> list[tuple]:
        raise NotImplementedError

    async def _nid_exec(self, sql: str, args: tuple[Any, ...]) -> int:
        """Runs one statement in its own transaction; the number of rows it changed."""
        raise NotImplementedError

    async def create_join_token(self, token: JoinToken) -> None:
        await self._nid_exec(
            f"INSERT INTO join_tokens ({_TOKEN_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                token.id,
                token.token_hash,
                token.created_at,
                token.expires_at,
                token.max_slots,
                token.created_by,
                None,
                None,
            ),
        )

    async def get_join_token(self, token_id: str) -> JoinToken | None:
        rows = await self._nid_query(f"SELECT {_TOKEN_COLS} FROM join_tokens WHERE id = ?", (token_id,))
        return _token(rows[0]) if rows else None

    async def use_join_token(self, token_id: str, node_id: str, now: float) -> bool:
        """Spend the token (atomically: one of two nodes presenting it at once wins)."""
        n = await self._nid_exec(
            "UPDATE join_tokens SET used_at = ?, used_by = ? WHERE id = ? AND used_at IS NULL AND expires_at > ?",
            (now, node_id, token_id, now),
        )
        return n == 1

    async def enroll_node(self, cred: NodeCredential) -> bool:
        """Bind ``cred.node_id`` to its key; False when the id is bound to a credential that is
        not revoked (a revoked one may be replaced: a new join token is an administrator's consent)."""
        n = await self._nid_exec(
            f"INSERT INTO node_credentials ({_CRED_COLS}) VALUES (?, ?, ?, ?, ?, NULL) "
            "ON CONFLICT (node_id) DO UPDATE SET public_key = excluded.public_key, server_key = excluded.server_key, "
            "max_slots = excluded.max_slots, created_at = excluded.created_at, revoked_at = NULL "
            "WHERE node_credentials.revoked_at IS NOT NULL",
            (cred.node_id, cred.public_key, cred.server_key, cred.max_slots, cred.created_at),
        )
        return n == 1

    async def get_node_credential(self, node_id: str) -> NodeCredential | None:
        rows = await self._nid_query(f"SELECT {_CRED_COLS} FROM node_credentials WHERE node_id = ?", (node_id,))
        return _cred(rows[0]) if rows else None

    async def revoke_node_credential(self, node_id: str, now: float) -> bool:
        n = await self._nid_exec(
            "UPDATE node_credentials SET revoked_at = ? WHERE node_id = ? AND revoked_at IS NULL", (now, node_id)
        )
        return n == 1
