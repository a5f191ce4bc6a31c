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


def collapse(group: BaseExceptionGroup) -> BaseException:
    """The single real exception inside a nursery's ExceptionGroup, or the group itself."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub)
        else:
            leaves.append(e)

    walk(group)
    return leaves[0] if len(leaves) == 1 else group


class single_errors:
    """``with single_errors(): async with trio.open_nursery() ...`` re-raises a lone
    exception from the nursery as itself, so ordinary ``except`` clauses catch it."""

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        if isinstance(exc, BaseExceptionGroup):
            leaf = collapse(exc)
            if leaf is not exc:
                raise leaf
        return False
