"""Durable state: tasks, events (with per-task sequence numbers), artifacts.

One Protocol, two implementations (SQLite embedded, PostgreSQL distributed), one contract
test suite run against both.
"""

from __future__ import annotations

from typing import Any, Protocol

from marathon.store.models import EventIn, StoredEvent, TaskRecord, TaskRequest

__all__ = ["Store", "EventIn", "StoredEvent", "TaskRecord", "TaskRequest", "open_store"]


class Store(Protocol):
    async def create_task(self, rec: TaskRecord, first_event: EventIn) -> tuple[TaskRecord, StoredEvent]: ...

    async def get_task(self, task_id: str) -> TaskRecord | None: ...

    async def list_tasks(
        self, *, owner: str | None = None, states: list[str] | None = None,
        cursor: str | None = None, limit: int = 50, oldest_first: bool = False,
    ) -> tuple[list[TaskRecord], str | None]: ...

    async def update_task(
        self, task_id: str, *, expect_state: str | None, changes: dict[str, Any],
        event: EventIn | None = None,
    ) -> tuple[TaskRecord, StoredEvent | None] | None:
        """Compare-and-set on the task's state; None when the state was not ``expect_state``."""
        ...

    async def append_events(self, items: list[EventIn]) -> list[StoredEvent | None]: ...

    async def events_after(self, task_id: str, after: int, limit: int = 1000) -> list[StoredEvent]: ...

    async def put_artifact(self, task_id: str, name: str, data: bytes) -> None: ...

    async def get_artifact(self, task_id: str, name: str) -> bytes | None: ...

    async def close(self) -> None: ...


async def open_store(url: str, data_dir: str) -> Store:
    """``sqlite`` (in data_dir), ``sqlite:///path/to.db`` or ``postgresql://…``."""
    if url == "sqlite" or url.startswith("sqlite:"):
        from marathon.store.sqlite import SqliteStore

        path = url[len("sqlite://"):] if url.startswith("sqlite://") else ""
        import os

        return await SqliteStore.open(path or os.path.join(data_dir, "marathon.db"))
    from marathon.errors import ConfigError

    raise ConfigError(f"unsupported store {url!r}: use sqlite or sqlite:///path")
