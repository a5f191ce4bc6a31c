"""The task state machine: one pure function.  Every transition not listed is refused."""

from __future__ import annotations

from marathon.errors import IllegalTransition
from marathon.protocol.messages import State

__all__ = ["ACTIVE", "TERMINAL", "State", "is_terminal", "transition"]

TERMINAL = frozenset({State.SUCCEEDED, State.FAILED, State.CANCELLED, State.TIMED_OUT})
ACTIVE = frozenset({State.SCHEDULED, State.STARTING, State.RUNNING})

_ALLOWED: dict[State, frozenset[State]] = {
    # back to QUEUED from an assignment means: rejected, unacknowledged, or the node was lost
    State.QUEUED: frozenset({State.SCHEDULED, State.CANCELLED, State.FAILED}),
    State.SCHEDULED: frozenset({State.STARTING, State.QUEUED, State.CANCELLED, State.FAILED}),
    State.STARTING: frozenset(
        {State.RUNNING, State.QUEUED, State.CANCELLED, State.FAILED, State.TIMED_OUT, State.SUCCEEDED}
    ),
    State.RUNNING: frozenset(
        {State.SUCCEEDED, State.FAILED, State.CANCELLED, State.TIMED_OUT, State.NEEDS_INPUT, State.QUEUED}
    ),
    State.NEEDS_INPUT: frozenset({State.QUEUED, State.CANCELLED, State.FAILED}),
    State.SUCCEEDED: frozenset(),
    State.FAILED: frozenset(),
    State.CANCELLED: frozenset(),
    State.TIMED_OUT: frozenset(),
}


def transition(current: State | str, target: State | str) -> State:
    """Return the new state, or raise IllegalTransition."""
    try:
        cur, tgt = State(current), State(target)
    except ValueError as exc:
        raise IllegalTransition(str(exc)) from None
    if tgt not in _ALLOWED[cur]:
        raise IllegalTransition(f"a task cannot go from {cur} to {tgt}")
    return tgt


def allowed(current: State | str, target: State | str) -> bool:
    try:
        transition(current, target)
    except IllegalTransition:
        return False
    return True


def is_terminal(state: State | str) -> bool:
    return State(state) in TERMINAL
