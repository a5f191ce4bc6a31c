"""Every message on every channel: frozen, tagged msgspec Structs, one union per channel.

Channels:
- gateway: node <-> orchestrator (TCP)
- agent:   node <-> agent in the sandbox (Unix socket, vsock, TCP via user-net)

Adding a field with a default is backwards compatible; renaming or removing one
needs a PROTOCOL_VERSION bump.
"""

from __future__ import annotations

from enum import StrEnum

import msgspec

PROTOCOL_VERSION = 2  # 2: TaskSpec carries the TaskRequest whole


class _Msg(msgspec.Struct, frozen=True, tag_field="type", forbid_unknown_fields=False):
    pass


# --------------------------------------------------------------------------- data


class State(StrEnum):
    """A task's state: the orchestrator's state machine (lifecycle.py) and what a node reports."""

    QUEUED = "queued"
    SCHEDULED = "scheduled"
    STARTING = "starting"
    RUNNING = "running"
    NEEDS_INPUT = "needs_input"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"


class Usage(msgspec.Struct, frozen=True):
    """What Messages API requests used: tokens, and server-side tool requests (the API's
    ``usage.server_tool_use``), which are billed per request rather than per token."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    web_search_requests: int = 0
    web_fetch_requests: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(*(getattr(self, f) + getattr(other, f) for f in USAGE_FIELDS))

    @property
    def total(self) -> int:
        """All tokens (what a token budget counts); server-tool requests are not tokens."""
        return sum(getattr(self, f) for f in TOKEN_FIELDS)

    def as_dict(self) -> dict[str, int]:
        return {f: getattr(self, f) for f in USAGE_FIELDS}


# The one list of usage fields: ledger columns, sums and API answers are spelled from it.
USAGE_FIELDS: tuple[str, ...] = Usage.__struct_fields__
TOKEN_FIELDS = USAGE_FIELDS[:4]  # the API's usage.<field>
SERVER_TOOL_FIELDS = USAGE_FIELDS[4:]  # usage.server_tool_use.<field>, billed per request


class Price(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """USD per million tokens; server-side tools in USD per 1,000 requests."""

    input: float
    output: float
    cache_write: float | None = None  # default: 1.25 x input (5-minute cache writes)
    cache_read: float | None = None  # default: 0.1 x input
    web_search: float = 10.0  # USD per 1,000 web search requests
    web_fetch: float = 0.0  # USD per 1,000 web fetch requests (tokens only, as the API bills it)

    @property
    def cw(self) -> float:
        return self.cache_write if self.cache_write is not None else self.input * 1.25

    @property
    def cr(self) -> float:
        return self.cache_read if self.cache_read is not None else self.input * 0.1


class TaskRequest(msgspec.Struct, frozen=True, kw_only=True):
    """What a user asks for (POST /v1/tasks), as they asked it; the node gets it whole inside
    its TaskSpec.  The API decodes the strict twin (marathon.store.models.TaskRequest), which
    refuses unknown fields; on the wire an unknown field is ignored (a newer orchestrator)."""

    prompt: str
    repo: str | None = None
    branch: str | None = None
    model: str | None = None
    max_turns: int | None = None
    timeout: float | None = None  # seconds, wall clock for the whole task
    max_tokens: int | None = None  # budget: all tokens of all API requests
    max_cost: float | None = None  # budget: USD
    base: str | None = None  # pull request base (default: the branch the work started from)
    branch_name: str | None = None  # work branch (default marathon/<short task id>)
    pr: bool = False
    pr_title: str | None = None
    keep_workspace: bool = False
    max_iterations: int = 1
    promise: str | None = None
    verify: str | None = None
    verify_timeout: float | None = None
    # resource limits (default: the node's); sizes as bytes or "4GiB", stored as bytes
    memory_limit: int | str | None = None
    cpu_limit: float | None = None
    disk_limit: int | str | None = None

    def size(self, name: str) -> int | None:
        """memory_limit or disk_limit in bytes (the API stores sizes as bytes), else None."""
        v = getattr(self, name)
        return v if isinstance(v, int) and not isinstance(v, bool) else None


class TaskSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What a node needs to run one task: the request whole, and what the orchestrator resolved
    or keeps (defaults, prices, the loop's progress).  Identity (tokens) travels here, never in images."""

    task_id: str
    request: TaskRequest
    attempt: int = 1
    # the request's value, else the orchestrator's default
    model: str | None = None
    max_turns: int = 30
    timeout_s: float = 3600.0
    verify_timeout: float = 600.0
    prices: dict[str, Price] = {}  # the orchestrator's table, so node budgets and the ledger agree
    price_fallback: Price | None = None
    # resuming after needs_input: iterations already run, the user's answer, the notes kept
    iterations_done: int = 0
    reply: str | None = None
    memory: str | None = None
    resume: bool = False  # the task's last result bundle comes with the assignment
    trusted_repo: bool = False  # submitted by an administrator: local paths and private hosts allowed

    @property
    def work_branch(self) -> str:
        return self.request.branch_name or f"marathon/{self.task_id[:8]}"


class Capacity(msgspec.Struct, frozen=True):
    slots: int
    active: int = 0
    warm: int = 0
    backend: str = "process"
    api_key: bool = True  # whether this node can reach the upstream API with a key
    pool_hits: int = 0
    pool_misses: int = 0
    claim_ms_p50: float | None = None
    pool_note: str | None = None  # why the warm pool is off, when it is
    draining: bool = False  # the node takes no new tasks (told to drain, or shutting down)


class TaskOutcome(msgspec.Struct, frozen=True):
    """The end of one task as the agent/node saw it."""

    state: str  # a TERMINAL_OUTCOMES State (a str on the wire: an unknown one is refused by the orchestrator, not the decoder)
    reason: str | None = None
    message: str | None = None
    exit_code: int | None = None
    is_error: bool = False
    num_turns: int = 0
    usage: Usage = Usage()
    duration_s: float = 0.0
    diff: str = ""
    diff_stat: str = ""
    final_text: str = ""
    claude_usage: Usage | None = None  # what Claude Code itself reported (result.usage)
    iterations: int = 0  # iterations run in total, across replies
    commits: int = 0  # commits on the work branch beyond the base
    head: str | None = None  # the work branch's last commit
    head_subject: str | None = None  # its message's first line
    branch: str | None = None
    memory: str | None = None  # MEMORY.md at the end (kept for a reply)
    pr_url: str | None = None
    pr_error: str | None = None
    has_bundle: bool = False  # the commits follow as a "result" blob


# --------------------------------------------------------------------------- events
# Events flow agent -> node -> orchestrator -> clients.  Clients see them as JSON.


class _Ev(_Msg, kw_only=True):
    iteration: int = 0  # which loop iteration produced it (0: outside any)


class IterationEvent(_Ev, tag="iteration"):
    """Marks the start of a loop iteration."""

    why: str = ""


class TextEvent(_Ev, tag="text"):
    text: str


class ToolCallEvent(_Ev, tag="tool_call"):
    tool_id: str
    name: str
    summary: str


class ToolResultEvent(_Ev, tag="tool_result"):
    tool_id: str
    summary: str
    is_error: bool = False


class StateEvent(_Ev, tag="state"):
    state: str
    reason: str | None = None
    message: str | None = None


class LogEvent(_Ev, tag="log"):
    message: str
    level: str = "info"
    source: str = "node"


class ApiRequestEvent(_Ev, tag="api_request"):
    """One Messages API request the task made, as the node's metering proxy saw it.
    The orchestrator prices it (``cost_usd``) and writes it to the ledger."""

    model: str
    status: int
    usage: Usage
    tool_calls: int = 0
    request_bytes: int = 0
    response_bytes: int = 0
    duration_s: float = 0.0
    ttft_s: float | None = None
    complete: bool = True
    error: str | None = None
    cost_usd: float | None = None


Event = IterationEvent | TextEvent | ToolCallEvent | ToolResultEvent | StateEvent | LogEvent | ApiRequestEvent


# the reason a node gives for the tasks it stops because it shuts down: the orchestrator queues
# them again at once, without counting the attempt
NODE_SHUTDOWN = "node_shutdown"
# how a task that was told to stop ends, by the reason it was stopped
STOP_STATES = {"timeout": State.TIMED_OUT, "budget_exhausted": State.FAILED, "node_lost": State.FAILED}
BLOB_CHUNK = 1024 * 1024


def stopped_state(reason: str) -> str:
    return STOP_STATES.get(reason, State.CANCELLED)


class Chunk(_Msg, kw_only=True):
    """One chunk of a file sent in order (``marathon/protocol/blobs.py`` cuts and reassembles
    them).  Every chunk message is one of these plus where it goes: ``AssignBlob`` (orchestrator
    -> node, a task's), ``TaskBlob`` (node -> orchestrator, a task attempt's, in the outbox),
    ``Blob`` (node <-> agent).  The last chunk states the whole file's size and SHA-256, and the
    receiver checks them before it takes the file (-1 and empty: not stated, from older peers)."""

    name: str
    offset: int
    data: bytes
    last: bool = False
    size: int = -1
    sha256: bytes = b""


# --------------------------------------------------------------------------- common


class Hello(_Msg, tag="hello"):
    """First message on every connection, from each side."""

    protocol: int
    role: str
    version: str = ""


class Error(_Msg, tag="error"):
    """Sent before closing a connection on purpose, so the peer can say why."""

    code: str
    message: str


# --------------------------------------------------------------------------- gateway


class Challenge(_Msg, tag="challenge"):
    nonce: bytes


class Authenticate(_Msg, tag="authenticate"):
    node_id: str
    name: str
    mac: bytes
    capacity: Capacity
    running: dict[str, int] = {}  # task id -> attempt, for what the node runs or has results of
    nonce: bytes = b""  # the node's challenge to the orchestrator (mutual authentication)
    # a node with its own key (marathon/protocol/auth.py): ``mac`` is empty, it signs the nonce
    public_key: bytes = b""  # Ed25519, raw
    signature: bytes = b""
    # enrolling with a join token: its id, and an HMAC keyed with the token's hash (never the token)
    join_id: str = ""
    join_mac: bytes = b""


class Welcome(_Msg, tag="welcome"):
    node_id: str
    heartbeat_interval: float
    mac: bytes = b""  # the orchestrator's answer to the node's nonce
    server_key: bytes = b""  # on enrolment: what the orchestrator proves itself with from then on
    max_slots: int = 0  # the enrolled maximum (0: none); slots and warm sandboxes are capped at it


class Heartbeat(_Msg, tag="heartbeat"):
    capacity: Capacity
    running: dict[str, int] = {}


class HeartbeatAck(_Msg, tag="heartbeat_ack"):
    """The highest node_seq the orchestrator has processed from this node; the node may
    forget everything up to it (and resends the rest after a reconnect)."""

    acked: int


class Assign(_Msg, tag="assign"):
    task: TaskSpec
    github_token: str | None = None  # stays on the node: pushes and the PR; never sent to the agent


class AssignBlob(Chunk, tag="assign_blob", kw_only=True):
    """A chunk of an artifact the node needs for an assignment (a resumed task's bundle),
    sent before the Assign."""

    task_id: str


class Accepted(_Msg, tag="accepted"):
    task_id: str
    attempt: int = 0


class Rejected(_Msg, tag="rejected"):
    task_id: str
    reason: str
    attempt: int = 0
    busy: bool = False  # the node had no room (full, draining): not the task's fault, no attempt spent


class Cancel(_Msg, tag="cancel"):
    task_id: str
    reason: str = "cancelled"
    attempt: int = 0  # 0: whatever attempt the node runs


class Drain(_Msg, tag="drain"):
    """Orchestrator -> node: take no new tasks; what runs goes on to its end."""


class Undrain(_Msg, tag="undrain"):
    """Orchestrator -> node: take tasks again."""


class TaskEvent(_Msg, tag="task_event"):
    """node_seq comes from one counter per node process, so it orders everything the node
    sends; the orchestrator drops anything at or below what it already has."""

    task_id: str
    node_seq: int
    event: Event
    attempt: int = 0


class TaskBlob(Chunk, tag="task_blob", kw_only=True):
    """A chunk of a task's artifact (the result bundle), before its TaskResult."""

    task_id: str
    node_seq: int
    attempt: int = 0


class TaskResult(_Msg, tag="task_result"):
    task_id: str
    node_seq: int
    outcome: TaskOutcome
    attempt: int = 0


GatewayMessage = (
    Hello
    | Error
    | Challenge
    | Authenticate
    | Welcome
    | Heartbeat
    | HeartbeatAck
    | Assign
    | AssignBlob
    | Accepted
    | Rejected
    | Cancel
    | Drain
    | Undrain
    | TaskEvent
    | TaskBlob
    | TaskResult
)
# each direction decodes only what it may receive: anything else is a protocol error
FromNode = Hello | Error | Authenticate | Heartbeat | Accepted | Rejected | TaskEvent | TaskBlob | TaskResult
ToNode = Hello | Error | Challenge | Welcome | HeartbeatAck | Assign | AssignBlob | Cancel | Drain | Undrain


# --------------------------------------------------------------------------- agent


class Ready(_Msg, tag="ready"):
    agent_version: str
    sandbox: str = ""


class Start(_Msg, tag="start"):
    """The task.  The workspace starts from the "repo" bundle that follows in Blob chunks."""

    task: TaskSpec
    workspace: str
    base_branch: str  # the branch in the bundle the work starts from
    api_base_path: str = ""  # path prefix the tunnel's upstream expects
    api_key: str = ""  # the credential Claude Code presents: a per-task token, never the real key
    # who and where, as the node set the sandbox up (empty/0: the agent's defaults, as in a VM guest)
    run_uid: int = 0  # the slot's sandbox user Claude Code runs as (when the agent is root)
    run_gid: int = 0
    claude_bin: str = ""  # Claude Code's binary as the agent sees it
    home: str = ""  # HOME and TMPDIR of Claude Code (on the task's capped disk)
    tmp_dir: str = ""
    private_dir: str = ""  # the agent's own files (bundles): out of the sandbox user's reach where it can be
    # identity re-injected into a VM restored from a snapshot (never baked into the snapshot)
    now: float = 0.0  # the node's clock: a restored guest's clock is behind by the time since the snapshot
    entropy: bytes = b""  # mixed into the guest's RNG, so clones of one snapshot diverge


class AgentEvent(_Msg, tag="event"):
    event: Event


class AgentResult(_Msg, tag="result"):
    outcome: TaskOutcome


class Blob(Chunk, tag="blob", kw_only=True):
    """A chunk of a file between node and agent: "repo" (the bundle the workspace starts from)
    after Start, "result" (the work as a bundle) before AgentResult."""


class CancelRun(_Msg, tag="cancel_run"):
    reason: str = "cancelled"


class TunnelOpen(_Msg, tag="t_open"):
    conn: int


class TunnelData(_Msg, tag="t_data"):
    conn: int
    data: bytes


class TunnelAck(_Msg, tag="t_ack"):
    conn: int
    n: int


class TunnelClose(_Msg, tag="t_close"):
    conn: int
    error: str | None = None


AgentMessage = (
    Hello
    | Error
    | Ready
    | Start
    | AgentEvent
    | AgentResult
    | Blob
    | CancelRun
    | TunnelOpen
    | TunnelData
    | TunnelAck
    | TunnelClose
)

TERMINAL_OUTCOMES = (State.SUCCEEDED, State.FAILED, State.CANCELLED, State.TIMED_OUT, State.NEEDS_INPUT)
