"""The OpenAPI document for the whole API, generated from the same msgspec types the handlers
decode and encode (marathon/orchestrator/schemas.py, marathon/store/models.py).

Every route is one ``Op`` row in a table (one table per area, joined in ``ROUTES``): adding a
route means adding a row, and tests/test_openapi.py fails for a route of the app without one.
Each row's error answers are derived from what it takes (authentication: 401/403; a body:
400/413; parameters: 400; a path parameter: 404) plus those it names, all with the one
``Error`` body; every operation may answer 5XX (the store unavailable)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import msgspec

from marathon import __version__
from marathon.orchestrator import schemas as s
from marathon.orchestrator.identity import JoinTokenCreated, JoinTokenRequest
from marathon.orchestrator.api_accounts import SINCE_PATTERN
from marathon.orchestrator.api_tasks import MAX_PAGE, MAX_SEQ
from marathon.protocol.messages import State
from marathon.store.models import NOT_BLANK, REPO_PATTERN, TaskRequest, UsageBucket
from marathon.store.sqlite import CURSOR_PATTERN

REF = "#/components/schemas/{name}"
JSON = "application/json"

# ---------------------------------------------------------------------- parameters


def path_param(name: str, description: str = "") -> dict:
    p: dict = {"name": name, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
    if description:
        p["description"] = description
    return p


def query_param(name: str, schema: dict, description: str = "") -> dict:
    p: dict = {"name": name, "in": "query", "required": False, "schema": schema}
    if description:
        p["description"] = description
    return p


TASK_ID = path_param("task_id")
NODE = path_param("node", "the node's id, or its name when no other node has it")
USER = path_param("user", "a user's id or email")
KEY_ID = path_param("key_id")
SEQ = {"type": "integer", "minimum": 0, "maximum": MAX_SEQ}


# ---------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Op:
    method: str
    path: str  # OpenAPI template: /v1/tasks/{task_id}
    summary: str
    response: Any = None  # a msgspec type (JSON), a {media type: schema} dict, or None (no body)
    ok: int = 200
    body: Any = None  # the request body's msgspec type
    params: tuple[dict, ...] = ()
    errors: tuple[int, ...] = ()  # beyond those derived from the row
    auth: str = "required"  # required | optional (an administrator's credentials change what it does) | none
    tag: str = "tasks"
    description: str = ""
    extra_responses: dict = field(default_factory=dict)  # e.g. 304 for the dashboard's files
    body_required: bool | None = None  # None: when some field of the body has no default


_NODE_SCHEMA = {"type": "object", "description": "a node as the orchestrator sees it", "additionalProperties": True}
NODE_LIST = {
    JSON: {"type": "object", "required": ["nodes"], "properties": {"nodes": {"type": "array", "items": _NODE_SCHEMA}}}
}
NODE_ONE = {JSON: _NODE_SCHEMA}
REVOKED_NODE = {
    "type": "object",
    "required": ["id", "revoked", "disconnected"],
    "properties": {
        "id": {"type": "string"},
        "revoked": {"type": "boolean", "description": "it had a credential"},
        "disconnected": {"type": "boolean"},
    },
}
_REPLICA = {
    "type": "object",
    "required": ["id", "url", "gateway", "version", "started_at", "leader", "self"],
    "properties": {
        "id": {"type": "string"},
        "url": {"type": "string"},
        "gateway": {"type": "string"},
        "version": {"type": "string"},
        "started_at": {"type": "number"},
        "leader": {"type": "boolean"},
        "self": {"type": "boolean", "description": "the replica that answered"},
    },
}
CLUSTER = {
    "type": "object",
    "required": ["replica", "replicas", "nodes", "epoch"],
    "properties": {
        "replica": {"type": "string", "description": "the replica that answered"},
        "epoch": {"type": ["integer", "null"], "description": "the leader's term"},
        "replicas": {"type": "array", "items": _REPLICA},
        "nodes": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["id", "name", "replica"],
                "properties": {"id": {"type": "string"}, "name": {"type": "string"}, "replica": {"type": "string"}},
            },
        },
    },
}
READY = {
    "type": "object",
    "required": ["ready", "checks"],
    "properties": {
        "ready": {"type": "boolean"},
        "checks": {
            "type": "object",
            "description": "each check (store, gateway, …): ok, failed or timeout",
            "additionalProperties": {"type": "string", "enum": ["ok", "failed", "timeout"]},
        },
    },
}

SSE_EVENT = {  # OpenAPI 3.1: the schema of one event
    "type": "object",
    "required": ["data"],
    "properties": {
        "id": {"type": "string", "pattern": "^[0-9]+$", "description": "the event's sequence number"},
        "event": {"type": "string", "description": "the event's type: state, log, api_request, …"},
        "data": {"type": "string", "contentMediaType": "application/json", "description": "the event as JSON"},
        "retry": {"type": "integer"},
    },
}

META_ROUTES = [
    Op("get", "/healthz", "Liveness", s.Health, auth="none", tag="meta"),
    Op(
        "get",
        "/readyz",
        "Readiness: the store answers and the node gateway listens",
        {JSON: READY},
        auth="none",
        tag="meta",
        extra_responses={"503": {"description": "not ready", "content": {JSON: {"schema": READY}}}},
    ),
    Op("get", "/v1/openapi.json", "This document", {JSON: {"type": "object"}}, auth="none", tag="meta"),
    Op(
        "get",
        "/metrics",
        "Prometheus metrics (text format 0.0.4): tasks by state, queue depth, scheduling latency, "
        "task duration by outcome, tokens and cost by model, connected nodes, store latency",
        {"text/plain": {"type": "string"}},
        auth="none",
        tag="meta",
    ),
]

TASK_ROUTES = [
    Op(
        "post",
        "/v1/tasks",
        "Submit a task",
        s.TaskView,
        ok=201,
        body=TaskRequest,
        params=(
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "schema": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,255}$"},
                "description": "the same key from the same user gives the same task (the answer then carries "
                "Idempotent-Replayed: true); the key reused for a different request is a 409",
            },
        ),
        errors=(409, 429),
        description="The prompt is at most 1 MiB of UTF-8. Local paths and file:// repositories are for "
        "administrators (403 for others), as are repositories on hosts that are not public.",
    ),
    Op(
        "get",
        "/v1/tasks",
        "List tasks (newest first; administrators see everyone's)",
        s.TaskPage,
        params=(
            query_param(
                "state",
                {"type": "array", "items": {"type": "string", "enum": [st.value for st in State]}},
                "only tasks in these states (repeat it, or separate states with commas)",
            ),
            query_param("cursor", {"type": "string", "pattern": CURSOR_PATTERN}, "next_cursor of the previous page"),
            query_param("limit", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": 50}),
        ),
    ),
    Op("get", "/v1/tasks/{task_id}", "Get a task", s.TaskView, params=(TASK_ID,)),
    Op(
        "post",
        "/v1/tasks/{task_id}/cancel",
        "Cancel a task (a finished one is returned as it is)",
        s.TaskView,
        ok=202,
        params=(TASK_ID,),
    ),
    Op(
        "post",
        "/v1/tasks/{task_id}/reply",
        "Answer a task's question: it is queued again",
        s.TaskView,
        ok=202,
        body=s.Reply,
        params=(TASK_ID,),
        errors=(409,),
        description="409 when the task is not waiting for an answer (needs_input).",
    ),
    Op(
        "get",
        "/v1/tasks/{task_id}/diff",
        "The change as a patch (empty when there is none)",
        {"text/x-diff": {"type": "string"}},
        params=(TASK_ID,),
    ),
    Op(
        "get",
        "/v1/tasks/{task_id}/bundle",
        "The task's commits as a git bundle (404 when there are none)",
        {"application/octet-stream": {"type": "string", "format": "binary"}},
        params=(TASK_ID,),
    ),
    Op(
        "get",
        "/v1/tasks/{task_id}/events",
        "Task events as Server-Sent Events; resume with Last-Event-ID",
        {"text/event-stream": SSE_EVENT},
        params=(
            TASK_ID,
            {
                "name": "Last-Event-ID",
                "in": "header",
                "required": False,
                "schema": SEQ,
                "description": "the last event seen: the stream starts after it",
            },
            query_param("after", SEQ, "as Last-Event-ID (the header wins)"),
            query_param("follow", {"type": "boolean", "default": True}, "false: replay and end"),
        ),
    ),
]

NODE_ROUTES = [
    Op("get", "/v1/nodes", "Connected nodes", NODE_LIST, tag="nodes"),
    Op(
        "post",
        "/v1/nodes/{node}/drain",
        "Drain a node (administrators): it takes no new tasks; what runs there runs to its end",
        NODE_ONE,
        params=(NODE,),
        tag="nodes",
    ),
    Op(
        "post",
        "/v1/nodes/{node}/undrain",
        "Undrain a node (administrators): it takes tasks again",
        NODE_ONE,
        params=(NODE,),
        tag="nodes",
    ),
    Op(
        "post",
        "/v1/nodes/join-tokens",
        "Make a one-time join token a new node enrols with (administrators); shown once",
        JoinTokenCreated,
        ok=201,
        body=JoinTokenRequest,
        tag="nodes",
    ),
    Op(
        "post",
        "/v1/nodes/{node}/revoke",
        "Revoke a node's credential (administrators): it is disconnected at once and refused from then on; "
        "its tasks go back as a lost node's",
        {JSON: REVOKED_NODE},
        params=(NODE,),
        tag="nodes",
    ),
    Op(
        "get",
        "/v1/cluster",
        "The orchestrator replicas (which one leads) and the replica holding each node (administrators)",
        {JSON: CLUSTER},
        tag="nodes",
    ),
]

ACCOUNT_ROUTES = [
    Op(
        "post",
        "/v1/auth/register",
        "Create an account: open registration (allow_registration), or as an administrator",
        s.UserView,
        ok=201,
        body=s.Registration,
        errors=(409, 429),
        auth="optional",
        tag="accounts",
        description="403 when registration is closed and the caller is not an administrator, or when a "
        "non-administrator asks for an administrator account; 409 when the email is registered.",
    ),
    Op(
        "post",
        "/v1/auth/login",
        "Sign in: a login token (expires after session_ttl)",
        s.LoginResult,
        body=s.Credentials,
        errors=(401, 403, 429),
        auth="none",
        tag="accounts",
        description="401 for a wrong password or an unknown account (the same answer); 403 for a disabled "
        "account; 429 while the account or the client address is locked out.",
    ),
    Op("post", "/v1/auth/logout", "Revoke this login token", s.Ok, tag="accounts"),
    Op("get", "/v1/auth/whoami", "Who the credentials are", s.WhoAmI, tag="accounts"),
    Op(
        "put",
        "/v1/auth/github-token",
        "Set (or, with null, clear) your GitHub token; stored encrypted",
        s.GitHubTokenResult,
        body=s.GitHubToken,
        tag="accounts",
    ),
    Op("post", "/v1/keys", "Create an API key (shown once)", s.NewKey, ok=201, body=s.KeyRequest, tag="accounts"),
    Op("get", "/v1/keys", "Your API keys (prefixes only)", s.KeyList, tag="accounts"),
    Op("delete", "/v1/keys/{key_id}", "Revoke one of your API keys", s.Revoked, params=(KEY_ID,), tag="accounts"),
    Op(
        "get",
        "/v1/usage",
        "Metered usage: tokens, server-tool requests, cost, compute",
        s.UsageReport,
        params=(
            query_param(
                "since", {"type": "string", "pattern": SINCE_PATTERN}, "7d, 24h, 30m, an epoch time or YYYY-MM-DD"
            ),
            query_param(
                "by", {"type": "string", "enum": ["total", "day", "task", "model", "user"], "default": "total"}
            ),
            query_param("user", {"type": "string"}, "administrators: whose usage (email or id; * for everyone)"),
        ),
        errors=(404,),
        tag="accounts",
    ),
]

ADMIN_ROUTES = [
    Op("get", "/v1/admin/users", "Every account (administrators)", s.UserList, tag="admin"),
    Op("get", "/v1/admin/users/{user}", "One account (administrators)", s.UserView, params=(USER,), tag="admin"),
    Op(
        "get",
        "/v1/admin/users/{user}/keys",
        "An account's API keys (administrators)",
        s.KeyList,
        params=(USER,),
        tag="admin",
    ),
    Op(
        "post",
        "/v1/admin/users/{user}/disable",
        "Disable an account: its keys and sessions stop working at once",
        s.UserView,
        params=(USER,),
        errors=(409,),
        tag="admin",
        description="409 for your own account.",
    ),
    Op("post", "/v1/admin/users/{user}/enable", "Enable an account again", s.UserView, params=(USER,), tag="admin"),
    Op("delete", "/v1/admin/keys/{key_id}", "Revoke anyone's API key", s.Revoked, params=(KEY_ID,), tag="admin"),
    Op(
        "post",
        "/v1/admin/unlock",
        "Lift a sign-in lockout (an account's, a client address's)",
        s.Ok,
        body=s.Unlock,
        body_required=True,
        tag="admin",
    ),
]

_ASSET_TYPES = [
    "text/html; charset=utf-8",
    "text/javascript; charset=utf-8",
    "text/css; charset=utf-8",
    "image/svg+xml",
    JSON,
]
_NOT_MODIFIED = {"304": {"description": "not modified (If-None-Match)"}}
_ASSET_404 = {
    "404": {"description": "no such file", "content": {"text/plain; charset=utf-8": {"schema": {"type": "string"}}}}
}
WEB_ROUTES = [
    Op(
        "get",
        "/",
        "The web dashboard",
        {"text/html; charset=utf-8": {"type": "string"}},
        auth="none",
        tag="web",
        extra_responses={**_NOT_MODIFIED, **_ASSET_404},
    ),  # fmt: skip
    Op(
        "get",
        "/ui/{name}",
        "A file of the dashboard",
        {t: {"type": "string"} for t in _ASSET_TYPES},
        params=(path_param("name"),),
        auth="none",
        tag="web",
        extra_responses={**_NOT_MODIFIED, **_ASSET_404},
    ),  # fmt: skip
    Op(
        "get",
        "/favicon.ico",
        "The dashboard's icon",
        {"image/svg+xml": {"type": "string"}},
        auth="none",
        tag="web",
        extra_responses={**_NOT_MODIFIED, **_ASSET_404},
    ),  # fmt: skip
]

ROUTES: list[Op] = [*META_ROUTES, *TASK_ROUTES, *NODE_ROUTES, *ACCOUNT_ROUTES, *ADMIN_ROUTES, *WEB_ROUTES]

# ---------------------------------------------------------------------- building the document

SCHEMA_TYPES = [
    s.Error, TaskRequest, s.TaskView, s.TaskPage, s.Reply, s.Health, s.Registration, s.Credentials, s.UserView,
    s.LoginResult, s.WhoAmI, s.GitHubToken, s.GitHubTokenResult, s.Ok, s.KeyRequest, s.KeyView, s.NewKey, s.KeyList,
    s.Revoked, s.UsageReport, UsageBucket, s.UserList, s.Unlock, JoinTokenRequest, JoinTokenCreated,
]  # fmt: skip

_ERROR_TEXT = {
    400: "invalid request (body, parameter or header)",
    401: "missing, invalid, expired or revoked credentials",
    403: "not allowed (an administrator's route, a disabled account, closed registration)",
    404: "no such resource (another user's task is 404 too)",
    409: "conflicts with the resource's state",
    413: "request body too large",
    429: "too many requests: retry after Retry-After seconds",
}
_ERROR_HEADERS = {
    401: {"WWW-Authenticate": {"required": True, "schema": {"type": "string"}}},
    429: {"Retry-After": {"required": True, "schema": {"type": "integer", "minimum": 1}}},
}


def _error(status: int | str, description: str) -> dict:
    out: dict = {"description": description, "content": {JSON: {"schema": {"$ref": REF.format(name="Error")}}}}
    if isinstance(status, int) and status in _ERROR_HEADERS:
        out["headers"] = _ERROR_HEADERS[status]
    return out


def _content(response: Any) -> dict:
    if isinstance(response, dict):
        return {media: {"schema": schema} for media, schema in response.items()}
    return {JSON: {"schema": {"$ref": REF.format(name=response.__name__)}}}


def error_statuses(op: Op) -> list[int]:
    """What a row can answer besides success, derived from what it takes."""
    codes = set(op.errors)
    if op.auth != "none":
        codes |= {401, 403}
    if op.body is not None:
        codes |= {400, 413}
    if any(p["in"] in ("query", "header") for p in op.params):
        codes.add(400)
    if any(p["in"] == "path" for p in op.params) and op.tag != "web":
        codes.add(404)
    return sorted(codes)


def operation(op: Op) -> dict:
    responses: dict = {
        str(op.ok): {"description": op.summary, **({"content": _content(op.response)} if op.response else {})},
        **op.extra_responses,
    }
    for code in error_statuses(op):
        responses[str(code)] = _error(code, _ERROR_TEXT[code])
    if op.tag != "web" and not any(code.startswith("5") for code in op.extra_responses):
        responses["5XX"] = _error("5XX", "the orchestrator cannot answer now (its store is unavailable)")
    out: dict = {
        "operationId": f"{op.method}_{op.path}".replace("/", "_").replace("{", "").replace("}", "").replace(".", "_"),
        "summary": op.summary,
        "tags": [op.tag],
        "responses": responses,
    }
    if op.description:
        out["description"] = op.description
    if op.params:
        out["parameters"] = list(op.params)
    if op.body is not None:
        # an absent body is {}: required only when some field has no default
        required = op.body_required
        if required is None:
            required = any(
                f.default is msgspec.NODEFAULT and f.default_factory is msgspec.NODEFAULT
                for f in msgspec.structs.fields(op.body)
            )
        out["requestBody"] = {
            "required": required,
            "content": {JSON: {"schema": {"$ref": REF.format(name=op.body.__name__)}}},
        }
    if op.auth == "none":
        out["security"] = []
    elif op.auth == "optional":
        out["security"] = [{}, {"bearer": []}, {"apiKey": []}]
    return out


def _refine(components: dict) -> None:
    """What the types do not say by themselves: checks the handlers make (tasks.validate_request,
    the unlock route), and the state enum of a stored task."""
    states = {"type": "string", "enum": [st.value for st in State]}
    components["TaskView"]["properties"]["state"] = states
    # what was submitted, as the submission's schema says (stored with the protocol's lenient type)
    components["TaskView"]["properties"]["request"] = {"$ref": REF.format(name="TaskRequest")}
    req = components["TaskRequest"]
    req["properties"]["prompt"] = {
        "type": "string",
        "pattern": NOT_BLANK,
        "description": "what to do: not blank, at most 1 MiB of UTF-8 (checked by the server)",
    }
    # pr needs a repository
    req["anyOf"] = [
        {"properties": {"pr": {"const": False}}},
        {"required": ["repo"], "properties": {"repo": {"type": "string"}}},
    ]
    req["properties"]["repo"] = {
        "anyOf": [{"type": "string", "pattern": REPO_PATTERN}, {"type": "null"}],
        "default": None,
        "description": "a URL, owner/name, or an absolute path on the node (administrators); checked by the server",
    }
    unlock = components["Unlock"]
    unlock["anyOf"] = [
        {"required": [name], "properties": {name: {"type": "string", "minLength": 1}}} for name in ("email", "client")
    ]


@lru_cache(maxsize=1)
def openapi_document() -> dict:
    _, components = msgspec.json.schema_components(SCHEMA_TYPES, ref_template=REF)
    # two types are named TaskRequest: the document's is the strict one (what the API accepts);
    # the protocol's lenient one is how a stored task's request is typed (shown as the strict one)
    components["TaskRequest"] = components.pop("marathon.store.models.TaskRequest")
    components.pop("marathon.protocol.messages.TaskRequest")
    _refine(components)
    paths: dict[str, dict] = {}
    for op in ROUTES:
        paths.setdefault(op.path, {})[op.method] = operation(op)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Marathon",
            "version": __version__,
            "description": "Run Claude Code tasks in isolated sandboxes. Authenticate with "
            "'Authorization: Bearer <API key or login token>' (or X-Api-Key: <API key>). Every error "
            "answer has the Error body; 405 answers carry Allow.",
        },
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "an API key (mk_…) or a login token (ms_…)",
                },
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-Api-Key"},
            },
        },
        "security": [{"bearer": []}, {"apiKey": []}],
        "paths": paths,
    }
