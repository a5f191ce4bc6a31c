"""Deadline decisions (``orchestrator.reconcile``) as pure functions, the node's reconnect
backoff, and placement around nodes that rejected a task — on virtual time, no sockets."""

from __future__ import annotations

import pytest
import trio

from marathon.config import Config
from marathon.node.service import BACKOFF_MAX, BACKOFF_MIN, BACKOFF_REFUSED, NodeService, jittered, next_backoff
from marathon.errors import AuthError, ConnectionClosed
from marathon.orchestrator.lifecycle import State
from marathon.orchestrator.reconcile import (
    ActiveTask,
    Adopt,
    ConfirmCancel,
    Fail,
    Keep,
    Requeue,
    SendCancel,
    SessionView,
    TimeOut,
    give_back,
    reconcile,
    reconcile_node,
    run_limit,
)
from marathon.orchestrator.scheduler import NodeView, TaskView, plan

CFG = Config(data_dir="/nonexistent", node_grace=10.0, max_attempts=3, timeout=100.0, node_timeout=5.0)


def task(tid="t1", state=State.RUNNING, node="n1", attempt=1, **kw) -> ActiveTask:
    return ActiveTask(tid, state, node, attempt=attempt, **kw)


def up(node="n1", acks=None) -> dict[str, SessionView]:
    return {node: SessionView(node, node, True, None, acks or {})}


def down(node="n1", since=0.0) -> dict[str, SessionView]:
    return {node: SessionView(node, node, False, since, {})}


def decide(tasks, sessions, now, *, started=0.0, cancels=None):
    return reconcile(tasks, sessions, now, CFG, started=started, cancel_deadlines=cancels or {})


# ----------------------------------------------------------------------------- node grace


def test_a_lost_node_gets_node_grace_then_its_tasks_are_requeued():
    t = task(state=State.RUNNING, running_since=0.0)
    early = decide([t], down(since=100.0), 109.9)
    assert early.actions == [] and early.wake_at == pytest.approx(110.0)
    late = decide([t], down(since=100.0), 110.0)
    assert late.actions == [Requeue("t1", State.RUNNING, "node_lost", "node n1 was lost; queued again")]


def test_a_node_unknown_after_a_restart_gets_node_grace_from_the_start():
    t = task(state=State.STARTING, node="gone")
    assert decide([t], {}, 19.0, started=10.0).actions == []
    assert decide([t], {}, 20.0, started=10.0).actions == [
        Requeue("t1", State.STARTING, "node_lost", "node gone was lost; queued again")
    ]


def test_lost_after_max_attempts_fails_and_free_attempts_do_not_count():
    assert decide([task(attempt=3)], down(), 50.0).actions == [
        Fail("t1", State.RUNNING, "node_lost", "node n1 was lost; gave up after 3 attempts")
    ]
    # two of the four attempts ended with a node shutting down: two count, one is left
    assert decide([task(attempt=4, free_attempts=2)], down(), 50.0).actions[0] == Requeue(
        "t1", State.RUNNING, "node_lost", "node n1 was lost; queued again"
    )


def test_give_back_free_always_requeues():
    t = task(attempt=9)
    assert give_back(t, "node_shutdown", "bye", 3, free=True) == Requeue(
        "t1", State.RUNNING, "node_shutdown", "bye; queued again", free=True
    )
    assert isinstance(give_back(t, "node_lost", "x", 3), Fail)


# ----------------------------------------------------------------------------- acknowledgements


def test_an_assignment_not_acknowledged_by_its_deadline_is_requeued():
    t = task(state=State.SCHEDULED)
    before = decide([t], up(acks={"t1": 30.0}), 29.0)
    assert before.actions == [] and before.wake_at == 30.0
    assert decide([t], up(acks={"t1": 30.0}), 30.0).actions == [
        Requeue("t1", State.SCHEDULED, "not_acknowledged", "node n1 did not acknowledge; queued again")
    ]
    accepted = decide([t], up(acks={"t1": None}), 1000.0)  # None: accepted
    assert accepted.actions == [] and accepted.wake_at is None


# ----------------------------------------------------------------------------- timeouts


def test_a_running_task_times_out_after_its_limit_plus_slack():
    limit = run_limit(task(timeout=60.0), CFG)
    assert limit == 60.0 + CFG.node_timeout + 30.0
    t = task(timeout=60.0, running_since=1000.0)
    assert decide([t], up(), 1000.0 + limit - 0.001).actions == []
    assert decide([t], up(), 1000.0 + limit).actions == [TimeOut("t1", "n1")]
    default = task(running_since=0.0)  # no timeout of its own: the configured one
    assert decide([default], up(), run_limit(default, CFG)).actions == [TimeOut("t1", "n1")]
    starting = task(state=State.STARTING, running_since=None)  # not running yet: no clock
    assert decide([starting], up(), 1e9).actions == []


# ----------------------------------------------------------------------------- cancels


def test_an_unconfirmed_cancel_is_confirmed_at_its_deadline():
    plan_ = decide([], {}, 5.0, cancels={"a": 5.0, "b": 7.5})
    assert plan_.actions == [ConfirmCancel("a")] and plan_.wake_at == 7.5


def test_wake_at_is_the_earliest_pending_deadline():
    tasks = [
        task("lost", node="n2"),
        task("acked", state=State.SCHEDULED),
        task("running", timeout=1.0, running_since=0.0),
    ]
    sessions = {**up(acks={"acked": 20.0}), **down("n2", since=0.0)}
    assert decide(tasks, sessions, 1.0, cancels={"c": 50.0}).wake_at == 10.0  # node grace of n2


# ----------------------------------------------------------------------------- reconnects


def test_reconcile_node_keeps_adopts_cancels_and_requeues():
    sched, run, old = task("sched", State.SCHEDULED, attempt=2), task("run"), task("old", attempt=2)
    records: dict[str, ActiveTask | None] = {
        "sched": sched,
        "run": run,
        "moved": task("moved", State.RUNNING, node="other"),
        "old": old,
        "done": task("done", State.SUCCEEDED),
        "unknown": None,
    }
    running = {"sched": 2, "run": 1, "moved": 1, "old": 1, "done": 1, "unknown": 1}
    on_node = [sched, run, old, task("missing", State.STARTING)]
    actions = reconcile_node("n1", "n1", running, records, on_node, 3)
    assert actions == [
        Adopt("sched"),
        Keep("run"),
        SendCancel("moved", 1, "no longer assigned to this node"),
        SendCancel("old", 1, "no longer assigned to this node"),
        SendCancel("unknown", 1, "no longer assigned to this node"),
        Requeue("missing", State.STARTING, "node_lost", "node n1 came back without the task; queued again"),
    ]  # "done": its result is on the way; nothing to do


# ----------------------------------------------------------------------------- placement


def test_a_node_that_rejected_a_task_is_avoided_while_another_could_take_it():
    avoid = TaskView("t", 0, frozenset({"bad"}))
    bad, good = NodeView("bad", 2, 0, warm=1), NodeView("good", 1, 0)
    assert plan([avoid], [bad, good]) == [("t", "good")]
    busy = NodeView("good", 1, 1)
    assert plan([avoid], [bad, busy]) == []  # it waits for the other node
    assert plan([avoid], [bad]) == [("t", "bad")]  # no other node at all: try it again
    assert plan([avoid], [bad, NodeView("draining", 2, 0, draining=True)]) == [("t", "bad")]


# ----------------------------------------------------------------------------- backoff


def test_backoff_doubles_to_its_cap_with_jitter_around_it():
    b, seen = BACKOFF_MIN, []
    for _ in range(10):
        seen.append(b)
        b = next_backoff(b)
    assert seen[:4] == [0.1, 0.2, 0.4, 0.8] and max(seen) == BACKOFF_MAX == seen[-1]
    assert jittered(2.0, 0.0) == 1.0 and jittered(2.0, 0.999) == pytest.approx(2.998)


async def test_the_node_redials_with_backoff_on_trios_clock(autojump_clock):
    """The connection loop's delays under a virtual clock: 60 virtual seconds in milliseconds."""
    svc = NodeService.__new__(NodeService)  # only the connection loop: no backend, no pool
    svc.config = CFG
    svc.connected = trio.Event()
    svc._link = None
    svc._gateway_turn = 0
    svc._random = lambda: 0.5  # no jitter: each delay is the backoff itself
    dials: list[float] = []
    outcomes = iter(["refused_by_os"] * 8 + ["ok", "refused_by_os", "auth"] + ["refused_by_os"] * 50)

    async def session() -> None:
        dials.append(trio.current_time())
        what = next(outcomes)
        if what == "refused_by_os":
            raise OSError("connection refused")
        if what == "auth":
            raise AuthError("wrong secret")

    svc._session = session  # type: ignore[method-assign]
    with trio.move_on_after(60):
        await svc._connection_loop()
    gaps = [round(b - a, 6) for a, b in zip(dials, dials[1:], strict=False)]
    assert gaps[:8] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]  # doubling, capped
    assert gaps[8:10] == [0.1, 0.2]  # the ninth dial connected (then the link dropped): it starts over
    assert gaps[10] == BACKOFF_REFUSED  # refused by the orchestrator: the long delay


async def test_the_node_redials_when_a_link_fails_in_two_ways_at_once(autojump_clock):
    """Sender and receiver both see the link break: a group of two errors is still a broken
    link (the node dials again), and a refusal inside a group is still a refusal."""
    svc = NodeService.__new__(NodeService)
    svc.config = CFG
    svc.connected = trio.Event()
    svc._link = None
    svc._gateway_turn = 0
    svc._random = lambda: 0.5
    dials: list[float] = []
    both = ExceptionGroup("link", [ConnectionClosed("peer closed"), OSError("broken pipe")])
    refused = ExceptionGroup("link", [AuthError("wrong secret"), ConnectionClosed("peer closed")])
    outcomes = iter([both, both, refused, both])

    async def session() -> None:
        dials.append(trio.current_time())
        raise next(outcomes, OSError("connection refused"))

    svc._session = session  # type: ignore[method-assign]
    with trio.move_on_after(120):
        await svc._connection_loop()
    gaps = [round(b - a, 6) for a, b in zip(dials, dials[1:], strict=False)]
    assert gaps[:3] == [0.1, 0.2, BACKOFF_REFUSED]
    assert len(dials) > 4  # it went on dialling
