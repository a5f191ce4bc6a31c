"""The API's request and response bodies as msgspec types: the handlers decode and encode
them, and the OpenAPI document (openapi.py) is generated from them, so the two cannot disagree.

Constraints (``Meta``) are enforced when a body is decoded; what no JSON Schema keyword can say
(a prompt's size in UTF-8 bytes, cross-field rules) is checked by the handlers and documented in
the field's description."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from marathon.store.models import NOT_BLANK, WS, TaskRecord, UsageBucket

EMAIL_PATTERN = f"^[^@{WS}]+@[^@{WS}]+$"
Email = Annotated[str, Meta(min_length=3, max_length=254, pattern=EMAIL_PATTERN, description="an email address")]
Password = Annotated[str, Meta(min_length=8, max_length=1024, description="at least 8 characters")]
Epoch = Annotated[float, Meta(description="seconds since the epoch (UTC)")]


class ErrorDetail(msgspec.Struct):
    code: str
    message: str


class Error(msgspec.Struct):
    """Every error answer: 4xx and 5xx alike."""

    error: ErrorDetail


# ---------------------------------------------------------------------- accounts


class Credentials(msgspec.Struct, forbid_unknown_fields=True):
    email: Annotated[str, Meta(max_length=1024)]
    password: Annotated[str, Meta(max_length=1024)]


class Registration(msgspec.Struct, forbid_unknown_fields=True):
    email: Email
    password: Password
    admin: Annotated[bool, Meta(description="an administrator account (administrators only)")] = False


class UserView(msgspec.Struct):
    id: str
    email: str
    admin: bool
    created_at: Epoch
    disabled: bool = False
    disabled_at: Epoch | None = None


class LoginResult(msgspec.Struct):
    token: Annotated[str, Meta(description="a login token: send it as 'Authorization: Bearer <token>'")]
    expires_at: Epoch
    user: UserView


class WhoAmI(msgspec.Struct):
    id: str
    email: str
    admin: bool
    github_token: Annotated[bool, Meta(description="whether a GitHub token is set")]


class GitHubToken(msgspec.Struct, forbid_unknown_fields=True):
    token: Annotated[str, Meta(max_length=4096)] | None


class GitHubTokenResult(msgspec.Struct):
    github_token: Literal["set", "cleared"]


class Ok(msgspec.Struct):
    ok: bool = True


class KeyRequest(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, Meta(max_length=100)] = "key"
    expires_in: (
        Annotated[int, Meta(ge=60, le=10 * 366 * 86400, description="seconds from now until the key stops working")]
        | None
    ) = None


class KeyView(msgspec.Struct):
    id: str
    name: str
    prefix: Annotated[str, Meta(description="the key's first characters; the key itself is stored hashed")]
    created_at: Epoch
    revoked_at: Epoch | None = None
    last_used_at: Annotated[float | None, Meta(description="recorded at most once a minute")] = None
    expires_at: Epoch | None = None


class NewKey(KeyView):
    key: Annotated[str, Meta(description="the key, shown once")] = ""


class KeyList(msgspec.Struct):
    keys: list[KeyView]


class Revoked(msgspec.Struct):
    id: str
    revoked: bool = True


class UsageReport(msgspec.Struct):
    since: Epoch
    by: Literal["day", "task", "model", "user", "total"]
    user: Annotated[str, Meta(description="whose usage: a user id, or * for everyone")]
    rows: list[UsageBucket]
    total: UsageBucket


# ---------------------------------------------------------------------- administrators


class UserList(msgspec.Struct):
    users: list[UserView]


class Unlock(msgspec.Struct, forbid_unknown_fields=True):
    """Lift a sign-in lockout: an account's failed sign-ins, or a client address's."""

    email: Annotated[str, Meta(max_length=1024)] | None = None
    client: Annotated[str, Meta(max_length=1024, description="a client IP address")] | None = None


# ---------------------------------------------------------------------- tasks


class TaskView(TaskRecord, kw_only=True):
    """A task as the API shows it."""

    question: str | None = None  # in needs_input: what the agent asked
    terminal: bool = False
    duration_s: float | None = None


class TaskPage(msgspec.Struct):
    tasks: list[TaskView]
    next_cursor: Annotated[str | None, Meta(description="pass it as cursor for the next page; null at the end")]


class Reply(msgspec.Struct, forbid_unknown_fields=True):
    answer: Annotated[str, Meta(min_length=1, pattern=NOT_BLANK)]


class Health(msgspec.Struct):
    ok: bool
    version: str
    nodes: int


def user_view(user) -> UserView:
    return UserView(
        id=user.id,
        email=user.email,
        admin=user.admin,
        created_at=user.created_at,
        disabled=user.disabled_at is not None,
        disabled_at=user.disabled_at,
    )


def key_view(k) -> KeyView:
    return KeyView(
        id=k.id,
        name=k.name,
        prefix=k.prefix,
        created_at=k.created_at,
        revoked_at=k.revoked_at,
        last_used_at=k.last_used_at,
        expires_at=k.expires_at,
    )
