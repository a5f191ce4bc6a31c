"""Records the stores keep.  Shared by every store implementation."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from marathon.protocol import messages as m
from marathon.protocol.messages import Usage


# The strict twin's constraints: enforced when the API decodes a submission, and the OpenAPI
# document's TaskRequest schema is generated from them.  Patterns are ASCII and free of
# look-arounds, so Python's re and JSON Schema validators read them alike.
# Python's whitespace (str.isspace, re's \s) spelled out: JSON Schema's \s (ECMA-262) is another
# set (it lacks \x1c-\x1f and \x85), so no pattern here uses \s, \S or "."
WS = "\\t-\\r\\x1c- \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000"
NOT_BLANK = f"[^{WS}]"  # somewhere a character that is not whitespace (what str.strip() keeps)
_BIG = 2**53  # integers and sizes beyond this are refused (JSON numbers are doubles elsewhere)
MIN_SIZE = 16 * 1024 * 1024
REPO_PATTERN = (
    rf"^(?:(?:https?|ssh|git|file)://[^{WS}]+"  # a URL
    r"|/[^\n\r\u2028\u2029]*"  # an absolute path on the node
    r"|[A-Za-z0-9_-][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+"  # owner/name
    rf"|(?:[A-Za-z0-9_.-]+@)?[A-Za-z0-9_-][A-Za-z0-9_.-]*:(?:[^/{WS}][^{WS}]*|/[^/{WS}][^{WS}]*)?"  # scp-like host:path
    r")$"
)
BRANCH_SEGMENT = r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*"
BRANCH_PATTERN = rf"^[A-Za-z0-9_](?:[A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]+)*)(?:/{BRANCH_SEGMENT})*$"
SIZE_PATTERN = (  # at least 16 MiB and at most 2**53 bytes, by the digits alone
    r"^(?:(?:[1-9][0-9]{0,5})(?:\.[0-9]{1,6})?[gG]"  # 1 GiB .. < 1e6 GiB
    r"|(?:[1-9][0-9]{0,2})(?:\.[0-9]{1,6})?[tT]"  # 1 TiB .. < 1000 TiB
    r"|(?:1[6-9]|[2-9][0-9]|[1-9][0-9]{2,8})(?:\.[0-9]{1,6})?[mM]"  # 16 MiB .. < 1e9 MiB
    r"|(?:1[6-9][0-9]{3}|[2-9][0-9]{4}|[1-9][0-9]{5,11})(?:\.[0-9]{1,6})?[kK]"  # 16384 KiB .. < 1e12 KiB
    r")(?:i?[bB])?$"
    r"|^(?:1[6-9][0-9]{6}|[2-9][0-9]{7}|[1-9][0-9]{8,14})[bB]?$"  # bytes: 16 MiB .. < 1e15
)
Size = (
    Annotated[int, Meta(ge=MIN_SIZE, le=_BIG)]
    | Annotated[str, Meta(pattern=SIZE_PATTERN, description="e.g. 4GiB, 512M (powers of 1024), at least 16 MiB")]
    | None
)


class TaskRequest(m.TaskRequest, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a user submits (POST /v1/tasks): the protocol's TaskRequest, refusing unknown fields
    and values out of range.  Validated at the API boundary (and by tasks.validate_request)."""

    # repo: checked by tasks.validate_request against REPO_PATTERN (with a message that says
    # what to give); the OpenAPI document carries the pattern
    max_turns: Annotated[int, Meta(ge=1, le=1000)] | None = None
    timeout: Annotated[float, Meta(ge=1, le=7 * 86400, description="seconds, wall clock for the whole task")] | None = (
        None
    )
    max_tokens: Annotated[int, Meta(ge=1, le=_BIG, description="budget: all tokens of all API requests")] | None = None
    max_cost: Annotated[float, Meta(gt=0, le=1e9, description="budget: USD")] | None = None
    branch_name: Annotated[str, Meta(max_length=200, pattern=BRANCH_PATTERN)] | None = None
    max_iterations: Annotated[int, Meta(ge=1, le=100)] = 1
    promise: Annotated[str, Meta(pattern=f"^[^\\n<]*[^<{WS}][^\\n<]*$", description="one line, no '<'")] | None = None
    verify: Annotated[str, Meta(pattern=NOT_BLANK, description="a shell command run in the workspace")] | None = None
    verify_timeout: Annotated[float, Meta(ge=1, le=86400)] | None = None
    memory_limit: Size = None
    cpu_limit: Annotated[float, Meta(ge=0.01, le=1024)] | None = None
    disk_limit: Size = None


class TaskRecord(msgspec.Struct, kw_only=True):
    id: str
    owner: str
    state: str
    # the protocol's (lenient) type: a stored task always reads back, whatever later versions
    # refuse at submission; what was submitted passed the strict TaskRequest above
    request: m.TaskRequest
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


class JoinToken(msgspec.Struct, kw_only=True):
    """A one-time token an administrator makes for enrolling one node; only its hash is kept."""

    id: str  # the token's public part (``mjt_<id>.<secret>``)
    token_hash: str  # sha256 of the whole token
    created_at: float
    expires_at: float
    max_slots: int  # the enrolled node's slots (and warm sandboxes) are capped at this
    created_by: str = ""
    used_at: float | None = None
    used_by: str | None = None  # the node id it enrolled


class NodeCredential(msgspec.Struct, kw_only=True):
    """A node's own identity: the public half of the key it signs its handshakes with (the
    private half never leaves the node), bound to its node id."""

    node_id: str
    public_key: str  # hex, Ed25519
    server_key: str  # hex: what the orchestrator proves itself to the node with
    max_slots: int
    created_at: float
    revoked_at: float | None = None
