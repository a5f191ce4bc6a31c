"""Records the stores keep.  Shared by every store implementation."""

from __future__ import annotations

import msgspec

from marathon.protocol import messages as m
from marathon.protocol.messages import Usage


class TaskRequest(m.TaskRequest, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a user submits (POST /v1/tasks): the protocol's TaskRequest, refusing unknown fields.
    Validated at the API boundary."""


class TaskRecord(msgspec.Struct, kw_only=True):
    id: str
    owner: str
    state: str
    request: TaskRequest
    reason: str | None = None
    message: str | None = None
    node_id: str | None = None
    attempt: int = 0  # assignments so far: each one's number fences what its node may report
    free_attempts: int = 0  # of those, the ones a node shutting down gave back (not counted against max_attempts)
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
    compute_s: float = 0.0  # sandbox wall-clock
    claude_usage: Usage | None = None  # what Claude Code reported; ``usage`` is what the proxy metered
    iterations: int = 0
    commits: int = 0
    branch: str | None = None
    head: str | None = None
    pr_url: str | None = None
    pr_error: str | None = None
    reply: str | None = None  # the user's answer, waiting for the next iteration


class StoredEvent(msgspec.Struct, frozen=True):
    task_id: str
    seq: int
    ts: float
    kind: str
    data: bytes  # the event as JSON (with its "type" tag)


class EventIn(msgspec.Struct, frozen=True):
    """An event to persist.  ``node_seq`` (when set) makes the write idempotent: an event
    whose node_seq is not above the task's last one, or from a node that no longer owns
    the task, is dropped.  A ``ledger`` row rides along and is written in the same
    transaction only when the event is (so metering is exactly once too)."""

    task_id: str
    kind: str
    data: bytes
    node_seq: int | None = None
    node_id: str | None = None
    ledger: LedgerRow | None = None


# Columns a store may change with update_task().
UPDATABLE = frozenset(
    {
        "state",
        "reason",
        "message",
        "node_id",
        "attempt",
        "free_attempts",
        "started_at",
        "finished_at",
        "last_node_seq",
        "usage",
        "cost_usd",
        "num_turns",
        "exit_code",
        "is_error",
        "diff_stat",
        "final_text",
        "request",
        "compute_s",
        "claude_usage",
        "iterations",
        "commits",
        "branch",
        "head",
        "pr_url",
        "pr_error",
        "reply",
    }
)


class User(msgspec.Struct, kw_only=True):
    id: str
    email: str
    password_hash: str
    admin: bool = False
    created_at: float = 0.0
    github_token: str | None = None
    disabled_at: float | None = None  # set: the account's keys and sessions stop working, it cannot sign in

    @property
    def disabled(self) -> bool:
        return self.disabled_at is not None


class ApiKey(msgspec.Struct, kw_only=True):
    id: str
    user_id: str
    name: str
    prefix: str  # first characters of the key, for listing; the key itself is only hashed
    key_hash: str
    created_at: float = 0.0
    revoked_at: float | None = None
    last_used_at: float | None = None  # written at most once per LAST_USED_INTERVAL (marathon/orchestrator/auth.py)
    expires_at: float | None = None  # None: never


class Session(msgspec.Struct, kw_only=True):
    token_hash: str
    user_id: str
    created_at: float
    expires_at: float


class LedgerRow(msgspec.Struct, frozen=True, kw_only=True):
    """One API request a task made, as the node's proxy metered it, priced by the orchestrator."""

    task_id: str
    user_id: str
    ts: float
    model: str
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int
    tool_calls: int
    cost_usd: float
    status: int
    duration_s: float
    ttft_s: float | None = None
    request_bytes: int = 0
    response_bytes: int = 0
    complete: bool = True
    priced: bool = True  # False when the model was unknown and the fallback price was used
    web_search_requests: int = 0  # server-side tool requests (usage.server_tool_use), priced per request
    web_fetch_requests: int = 0


class UsageBucket(msgspec.Struct, kw_only=True):
    key: str  # the day, task id or model (or "total")
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    tool_calls: int = 0
    web_search_requests: int = 0
    web_fetch_requests: int = 0
    cost_usd: float = 0.0
    compute_s: float = 0.0
    tasks: int = 0
