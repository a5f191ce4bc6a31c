"""Deadline decisions as pure functions: which tasks go back to the queue, fail, time out or
have their cancel confirmed, given the active tasks, the node sessions, ``now`` and the config.

Times here are on trio's clock (``trio.current_time()``), never the wall clock, so the
decisions can be tested under a virtual clock; the shells (``scheduling.Scheduler``,
``gateway.Gateway``) build the inputs and execute the actions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from marathon.config import Config
from marathon.orchestrator.lifecycle import TERMINAL, State

# a running task gets its own timeout, plus this much for the node to report how it ended
TIMEOUT_SLACK = 30.0
_UNKNOWN = object()  # no acknowledgement deadline known for the task


@dataclass(frozen=True)
class ActiveTask:
    task_id: str
    state: State
    node_id: str | None
    attempt: int = 0
    free_attempts: int = 0
    timeout: float | None = None  # the task's own limit (seconds); None: the configured default
    running_since: float | None = None  # when it started running (trio clock)
    scheduled_since: float | None = None  # when it was assigned, if it is scheduled (trio clock)


@dataclass(frozen=True)
class SessionView:
    node_id: str
    name: str
    connected: bool
    lost_since: float | None = None  # when its connection dropped (trio clock)
    ack_deadlines: Mapping[str, float | None] = field(default_factory=dict)  # task -> deadline; None: accepted


# ----------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Requeue:
    """Queue the task again (from ``state``); ``free``: the attempt is not counted."""

    task_id: str
    state: State
    reason: str
    message: str
    free: bool = False


@dataclass(frozen=True)
class Fail:
    """Out of attempts: the task fails with ``reason``."""

    task_id: str
    state: State
    reason: str
    message: str


@dataclass(frozen=True)
class TimeOut:
    """The node did not end the task in time: tell it to stop, and record timed_out."""

    task_id: str
    node_id: str


@dataclass(frozen=True)
class ConfirmCancel:
    """A cancel the node did not confirm in time: the task is cancelled here."""

    task_id: str


@dataclass(frozen=True)
class Adopt:
    """A reconnected node runs an assignment whose acknowledgement was lost: it counts as accepted."""

    task_id: str


@dataclass(frozen=True)
class Keep:
    """A reconnected node runs a task the store has on it: nothing changes."""

    task_id: str


@dataclass(frozen=True)
class SendCancel:
    """Tell a node to stop an attempt that is no longer its own."""

    task_id: str
    attempt: int
    reason: str


Deadline = Requeue | Fail | TimeOut | ConfirmCancel  # what reconcile() decides
NodeAction = Adopt | Keep | SendCancel | Requeue | Fail  # what reconcile_node() decides


@dataclass(frozen=True)
class Plan:
    actions: list[Deadline]
    wake_at: float | None  # the next deadline, if any (trio clock)


def out_of_attempts(attempt: int, free_attempts: int, max_attempts: int) -> bool:
    """Whether a task given back after ``attempt`` assignments has had its ``max_attempts``."""
    return attempt - free_attempts >= max_attempts


def give_back(task: ActiveTask, reason: str, message: str, max_attempts: int, *, free: bool = False) -> Requeue | Fail:
    """A task lost its node (or was refused): queue it again, or fail it after max_attempts."""
    if not free and out_of_attempts(task.attempt, task.free_attempts, max_attempts):
        attempts = task.attempt - task.free_attempts
        return Fail(task.task_id, task.state, reason, f"{message}; gave up after {attempts} attempts")
    return Requeue(task.task_id, task.state, reason, f"{message}; queued again", free)


def run_limit(task: ActiveTask, config: Config) -> float:
    return (task.timeout or config.timeout) + config.node_timeout + TIMEOUT_SLACK


def reconcile(
    tasks: Iterable[ActiveTask],
    sessions: Mapping[str, SessionView],
    now: float,
    config: Config,
    *,
    started: float,
    cancel_deadlines: Mapping[str, float],
) -> Plan:
    """What to do about the active tasks now.

    - a task whose node is gone for ``node_grace`` (or, after a restart of ours, has not come
      back within ``node_grace`` of ``started``) is given back: ``node_lost``;
    - an assignment not acknowledged by its deadline is given back: ``not_acknowledged``;
    - a running task past its timeout (plus ``node_timeout`` and a margin) times out;
    - a cancel its node did not confirm by its deadline is confirmed here.
    """
    actions: list[Deadline] = []
    deadlines: list[float] = []

    def due(at: float) -> bool:
        if now >= at:
            return True
        deadlines.append(at)
        return False

    for task in tasks:
        session = sessions.get(task.node_id) if task.node_id else None
        if session is None or not session.connected:
            lost_since = session.lost_since if session is not None and session.lost_since is not None else started
            if due(lost_since + config.node_grace):
                name = session.name if session is not None else task.node_id
                actions.append(give_back(task, "node_lost", f"node {name} was lost", config.max_attempts))
            continue
        ack = session.ack_deadlines.get(task.task_id, _UNKNOWN)
        if task.state == State.SCHEDULED and ack is _UNKNOWN and task.scheduled_since is not None:
            # no one here waits for its acknowledgement (another replica assigned it, to a node
            # that then moved, or this replica restarted): the stored time of the assignment decides
            ack = task.scheduled_since + 2 * config.assign_timeout
        if task.state == State.SCHEDULED and isinstance(ack, float):
            if due(ack):
                actions.append(
                    give_back(task, "not_acknowledged", f"node {session.name} did not acknowledge", config.max_attempts)
                )
            continue
        if (
            task.state == State.RUNNING
            and task.running_since is not None
            and due(task.running_since + run_limit(task, config))
        ):
            actions.append(TimeOut(task.task_id, session.node_id))
    for task_id, deadline in cancel_deadlines.items():
        if due(deadline):
            actions.append(ConfirmCancel(task_id))
    return Plan(actions, min(deadlines, default=None))


def reconcile_node(
    node_id: str,
    name: str,
    running: Mapping[str, int],
    records: Mapping[str, ActiveTask | None],
    on_node: Iterable[ActiveTask],
    max_attempts: int,
) -> list[NodeAction]:
    """After a (re)connect — of the node, or of us after a restart — make the store and the node
    agree.  ``running``: task id -> attempt, as the node reports; ``records``: the store's view of
    each of those (None: unknown task); ``on_node``: the active tasks the store has on this node.

    What the node runs of its current assignments it keeps (an assignment whose acknowledgement
    was lost counts as accepted); what it runs otherwise is cancelled; what the store has on this
    node and the node does not run goes back to the queue.
    """
    actions: list[NodeAction] = []
    for task_id, attempt in running.items():
        rec = records.get(task_id)
        ours = rec is not None and rec.node_id == node_id and rec.attempt == attempt
        if rec is not None and ours and rec.state == State.SCHEDULED:
            actions.append(Adopt(task_id))
        elif rec is not None and ours and rec.state in (State.STARTING, State.RUNNING):
            actions.append(Keep(task_id))
        elif rec is None or not ours or rec.state not in TERMINAL:
            actions.append(SendCancel(task_id, attempt, "no longer assigned to this node"))
    for task in on_node:
        if task.node_id == node_id and task.task_id not in running:
            actions.append(give_back(task, "node_lost", f"node {name} came back without the task", max_attempts))
    return actions
