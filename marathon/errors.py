"""One shallow error hierarchy.  Library exceptions are translated at the boundary."""

from __future__ import annotations


class MarathonError(Exception):
    """Base of every error Marathon raises on purpose."""

    code = "error"


class ConfigError(MarathonError):
    code = "config_error"


class SecretsError(ConfigError):
    """A secret at rest cannot be opened: its key is not configured, or the value was altered."""

    code = "secrets_error"


class ProtocolError(MarathonError):
    """A peer sent something we cannot accept: malformed, oversized or unexpected frame."""

    code = "protocol_error"


class FrameTooLarge(ProtocolError):
    code = "frame_too_large"


class VersionMismatch(ProtocolError):
    code = "version_mismatch"


class ConnectionClosed(MarathonError):
    """The peer went away (cleanly or not)."""

    code = "connection_closed"


class AuthError(MarathonError):
    code = "unauthorized"


class Forbidden(MarathonError):
    code = "forbidden"


class NotFound(MarathonError):
    code = "not_found"


class InvalidRequest(MarathonError):
    code = "invalid_request"


class Conflict(MarathonError):
    code = "conflict"


class RateLimited(MarathonError):
    code = "rate_limited"

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class IllegalTransition(MarathonError):
    code = "illegal_transition"


class SandboxError(MarathonError):
    code = "sandbox_failed"


class RepoError(MarathonError):
    code = "repo_error"


class StoreError(MarathonError):
    code = "store_error"


class StoreUnavailable(StoreError):
    """The database cannot be reached (down, restarting, timed out): retry later (HTTP 503)."""

    code = "store_unavailable"


class Unavailable(MarathonError):
    """A dependency (orchestrator, store, upstream) cannot be reached right now."""

    code = "unavailable"


def first_leaf(group: BaseExceptionGroup) -> BaseException:
    """The first exception that is not a group (``except*`` keeps the nesting of nurseries)."""
    e: BaseException = group
    while isinstance(e, BaseExceptionGroup):
        e = e.exceptions[0]
    return e


def leaves(e: BaseException) -> list[BaseException]:
    """Every exception that is not a group inside ``e`` (``e`` itself when it is not one)."""
    if isinstance(e, BaseExceptionGroup):
        return [leaf for sub in e.exceptions for leaf in leaves(sub)]
    return [e]


def describe(e: BaseException) -> str:
    """What went wrong, each error once: for a message, when ``except*`` caught a group."""
    seen = dict.fromkeys(str(leaf) or type(leaf).__name__ for leaf in leaves(e))
    return "; ".join(seen)
