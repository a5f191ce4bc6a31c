"""Records the stores keep.  Shared by every store implementation."""

from __future__ import annotations

import msgspec

from marathon.protocol.messages import Usage


class TaskRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a user submits (POST /v1/tasks).  Validated at the API boundary."""

    prompt: str
    repo: str | None = None
    branch: str | None = None
    model: str | None = None
    max_turns: int | None = None
    timeout: float | None = None  # seconds, wall clock for the whole task


class TaskRecord(msgspec.Struct, kw_only=True):
    id: str
    owner: str
    state: str
    request: TaskRequest
    reason: str | None = None
    message: str | None = None
    node_id: str | None = None
    attempt: int = 0
    created_at: float = 0.0
    updated_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    last_seq: int = 0
    last_node_seq: int = 0
    # filled as the task runs / ends
    usage: Usage = Usage()
    cost_usd: float | None = None
    num_turns: int = 0
    exit_code: int | None = None
    is_error: bool = False
    diff_stat: str = ""
    final_text: str = ""


class StoredEvent(msgspec.Struct, frozen=True):
    task_id: str
    seq: int
    ts: float
    kind: str
    data: bytes  # the event as JSON (with its "type" tag)


class EventIn(msgspec.Struct, frozen=True):
    """An event to persist.  ``node_seq`` (when set) makes the write idempotent: an event
    whose node_seq is not above the task's last one, or from a node that no longer owns
    the task, is dropped."""

    task_id: str
    kind: str
    data: bytes
    node_seq: int | None = None
    node_id: str | None = None


# Columns a store may change with update_task().
UPDATABLE = frozenset(
    {
        "state", "reason", "message", "node_id", "attempt", "started_at", "finished_at",
        "last_node_seq", "usage", "cost_usd", "num_turns", "exit_code", "is_error",
        "diff_stat", "final_text", "request",
    }
)
