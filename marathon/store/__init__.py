"""Durable state: tasks, events (with per-task sequence numbers), artifacts, the usage
ledger, users, API keys and login sessions.

One Protocol, two implementations (SQLite embedded, PostgreSQL distributed), one contract
test suite run against both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from marathon.protocol.messages import Usage
from marathon.store.models import (
    ApiKey,
    EventIn,
    JoinToken,
    LedgerRow,
    NodeCredential,
    Session,
    StoredEvent,
    TaskRecord,
    TaskRequest,
    UsageBucket,
    User,
)

if TYPE_CHECKING:
    from marathon.config import Config

__all__ = ["Store", "EventIn", "StoredEvent", "TaskRecord", "TaskRequest", "open_store"]


class Store(Protocol):
    async def create_task(self, rec: TaskRecord, first_event: EventIn) -> tuple[TaskRecord, StoredEvent]: ...

    async def get_task(self, task_id: str) -> TaskRecord | None: ...

    async def list_tasks(
        self,
        *,
        owner: str | None = None,
        states: list[str] | None = None,
        cursor: str | None = None,
        limit: int = 50,
        oldest_first: bool = False,
    ) -> tuple[list[TaskRecord], str | None]: ...

    async def count_tasks_by_state(self) -> dict[str, int]:
        """How many tasks are in each state (states without tasks are absent): one grouped
        query on the state index, cheap enough for every metrics scrape."""
        ...

    async def update_task(
        self,
        task_id: str,
        *,
        expect_state: str | None,
        changes: dict[str, Any],
        event: EventIn | None = None,
    ) -> tuple[TaskRecord, StoredEvent | None] | None:
        """Compare-and-set on the task's state; None when the state was not ``expect_state``."""
        ...

    async def append_events(self, items: list[EventIn]) -> list[StoredEvent | None]: ...

    async def events_after(self, task_id: str, after: int, limit: int = 1000) -> list[StoredEvent]: ...

    async def put_artifact(self, task_id: str, name: str, data: bytes) -> None: ...

    async def get_artifact(self, task_id: str, name: str) -> bytes | None: ...

    async def ledger_totals(self, task_id: str) -> tuple[Usage, float]: ...

    async def ledger_rows(self, task_id: str) -> list[LedgerRow]: ...

    async def usage_summary(self, *, user_id: str | None, since: float, by: str) -> list[UsageBucket]: ...

    # accounts
    async def create_user(self, user: User) -> User: ...

    async def list_users(self) -> list[User]: ...

    async def set_user_disabled(self, user_id: str, disabled: bool) -> User | None:
        """Disabling deletes the user's sessions; their keys are refused while disabled."""
        ...

    async def get_user(self, user_id: str) -> User | None: ...

    async def get_user_by_email(self, email: str) -> User | None: ...

    async def count_users(self) -> int: ...

    async def set_github_token(self, user_id: str, token: str | None) -> None:
        """Kept sealed (marathon/secretbox.py): ``User.github_token`` is the ciphertext."""
        ...

    async def github_token(self, user_id: str) -> str | None:
        """The user's token decrypted, for the one place that uses it (an assignment)."""
        ...

    async def reseal_secrets(self) -> tuple[int, int]:
        """Re-encrypt every GitHub token with the current key: (changed, total)."""
        ...

    async def create_api_key(self, key: ApiKey) -> ApiKey: ...

    async def list_api_keys(self, user_id: str) -> list[ApiKey]: ...

    async def revoke_api_key(self, user_id: str | None, key_id: str) -> bool:
        """``user_id`` None: anyone's key (an administrator's revocation)."""
        ...

    async def find_api_key(self, key_hash: str) -> tuple[ApiKey, User] | None:
        """An active key: not revoked, not expired (its user may be disabled)."""
        ...

    async def touch_api_key(self, key_id: str, now: float, interval: float) -> None:
        """last_used_at = now, unless it was recorded less than ``interval`` ago."""
        ...

    async def create_session(self, session: Session) -> None: ...

    async def find_session(self, token_hash: str) -> tuple[Session, User] | None: ...

    async def revoke_session(self, token_hash: str) -> None: ...

    # node identities (marathon/store/node_identity.py)
    async def create_join_token(self, token: JoinToken) -> None: ...

    async def get_join_token(self, token_id: str) -> JoinToken | None: ...

    async def use_join_token(self, token_id: str, node_id: str, now: float) -> bool:
        """Spend an unused, unexpired token, atomically."""
        ...

    async def enroll_node(self, cred: NodeCredential) -> bool:
        """Bind a node id to its key; False when it is bound to one not revoked."""
        ...

    async def get_node_credential(self, node_id: str) -> NodeCredential | None: ...

    async def revoke_node_credential(self, node_id: str, now: float) -> bool: ...

    async def purge_sessions(self, now: float, limit: int) -> int:
        """Delete at most ``limit`` sessions expired by ``now``; how many."""
        ...

    async def close(self) -> None: ...


async def open_store(url: str, data_dir: str, *, config: Config | None = None) -> Store:
    """``sqlite`` (in data_dir), ``sqlite:///path/to.db`` or ``postgresql://…`` (``postgres://``
    too); ``config`` supplies the PostgreSQL pool size and timeouts, and the secrets key
    (``secrets_key``/``secrets_old_keys``; without one, the key generated in data_dir)."""
    from marathon.secretbox import load_secret_box

    secrets = load_secret_box(config, data_dir)
    if url == "sqlite" or url.startswith("sqlite:"):
        from marathon.store.sqlite import SqliteStore

        path = url[len("sqlite://") :] if url.startswith("sqlite://") else ""
        import os

        return await SqliteStore.open(path or os.path.join(data_dir, "marathon.db"), secrets=secrets)
    if url.startswith(("postgresql://", "postgres://")):
        from marathon.store.postgres import PostgresStore

        if config is None:
            return await PostgresStore.open(url, secrets=secrets)
        return await PostgresStore.open(
            url,
            pool_size=config.store_pool_size,
            statement_timeout=config.store_statement_timeout,
            connect_timeout=config.store_connect_timeout,
            secrets=secrets,
        )
    from marathon.errors import ConfigError

    raise ConfigError(f"unsupported store {url!r}: use sqlite, sqlite:///path or postgresql://user@host/db")
