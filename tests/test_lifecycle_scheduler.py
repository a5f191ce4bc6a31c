import itertools

import pytest

from marathon.errors import IllegalTransition
from marathon.orchestrator.lifecycle import ACTIVE, TERMINAL, State, allowed, transition
from marathon.orchestrator.scheduler import NodeView, TaskView, plan, score

LEGAL = {
    (State.QUEUED, State.SCHEDULED),
    (State.QUEUED, State.CANCELLED),
    (State.QUEUED, State.FAILED),
    (State.SCHEDULED, State.STARTING),
    (State.SCHEDULED, State.QUEUED),
    (State.SCHEDULED, State.CANCELLED),
    (State.SCHEDULED, State.FAILED),
    (State.STARTING, State.RUNNING),
    (State.STARTING, State.QUEUED),
    (State.STARTING, State.CANCELLED),
    (State.STARTING, State.FAILED),
    (State.STARTING, State.TIMED_OUT),
    (State.STARTING, State.SUCCEEDED),
    (State.RUNNING, State.SUCCEEDED),
    (State.RUNNING, State.FAILED),
    (State.RUNNING, State.CANCELLED),
    (State.RUNNING, State.TIMED_OUT),
    (State.RUNNING, State.NEEDS_INPUT),
    (State.RUNNING, State.QUEUED),
    (State.NEEDS_INPUT, State.QUEUED),
    (State.NEEDS_INPUT, State.CANCELLED),
    (State.NEEDS_INPUT, State.FAILED),
}


@pytest.mark.parametrize("cur,tgt", list(itertools.product(State, State)))
def test_every_transition(cur, tgt):
    if (cur, tgt) in LEGAL:
        assert transition(cur, tgt) == tgt
    else:
        with pytest.raises(IllegalTransition):
            transition(cur, tgt)
        assert not allowed(cur, tgt)


def test_terminal_states_are_final_and_unknown_states_refused():
    for t in TERMINAL:
        assert not any(allowed(t, x) for x in State)
    with pytest.raises(IllegalTransition):
        transition("queued", "exploded")
    assert ACTIVE.isdisjoint(TERMINAL)


def node(nid, slots=2, active=0, warm=0, draining=False):
    return NodeView(nid, slots, active, warm, draining)


def test_score_prefers_free_then_warm_and_refuses_full_or_draining():
    t = TaskView("t", 0)
    assert score(node("a", active=2), t) is None
    assert score(node("a", draining=True), t) is None
    assert scored(node("a", slots=4, active=1), t) > scored(node("b", slots=4, active=3), t)
    assert scored(node("a", active=1, warm=1), t) > scored(node("b", active=0), t)
    assert scored(node("a"), TaskView("t", 0, frozenset({"a"}))) < scored(node("b", active=1), t)


def scored(n: NodeView, t: TaskView) -> float:
    s = score(n, t)
    assert s is not None, f"{n} must be able to take {t}"
    return s


def test_plan_is_oldest_first_and_never_oversubscribes():
    tasks = [TaskView(f"t{i}", float(10 - i)) for i in range(6)]
    nodes = [node("a", slots=2), node("b", slots=1, active=0), node("c", slots=3, active=3)]
    out = plan(tasks, nodes)
    assert len(out) == 3
    assert [t for t, _ in out] == ["t5", "t4", "t3"]  # oldest first
    per: dict[str, int] = {}
    for _, n in out:
        per[n] = per.get(n, 0) + 1
    assert per.get("a", 0) <= 2 and per.get("b", 0) <= 1 and "c" not in per


def test_plan_spreads_load():
    out = plan([TaskView("t1", 1), TaskView("t2", 2)], [node("a", slots=4), node("b", slots=4)])
    assert {n for _, n in out} == {"a", "b"}


def test_plan_with_no_capacity_assigns_nothing():
    assert plan([TaskView("t", 0)], [node("a", active=2)]) == []
    assert plan([TaskView("t", 0)], []) == []


def _plan_by_looking_at_every_node(tasks, nodes):
    """The rule spelled directly (what plan() did before its heap): the reference to compare with."""
    from marathon.orchestrator.scheduler import NodeView, score

    load = {n.node_id: n for n in nodes}
    out = []
    for task in sorted(tasks, key=lambda t: (t.created_at, t.task_id)):
        others = [n for n in load.values() if n.node_id not in task.avoid_nodes and not n.draining]
        best = None
        for node in others if others else list(load.values()):
            s = score(node, task)
            if s is not None and (best is None or (s, node.node_id) > best):
                best = (s, node.node_id)
        if best is None:
            continue
        n = load[best[1]]
        load[n.node_id] = NodeView(n.node_id, n.slots, n.active + 1, max(0, n.warm - 1), n.draining)
        out.append((task.task_id, n.node_id))
    return out


def test_plan_places_as_the_rule_says_on_random_fleets():
    import random

    from marathon.orchestrator.scheduler import NodeView, TaskView, plan

    rng = random.Random(7)
    for _ in range(300):
        nodes = [
            NodeView(f"n{i:03d}", s := rng.randint(1, 4), rng.randint(0, s), rng.randint(0, 2), rng.random() < 0.1)
            for i in range(rng.randint(0, 30))
        ]
        ids = [n.node_id for n in nodes]
        tasks = [
            TaskView(
                f"t{i}",
                float(rng.randint(0, 5)),
                frozenset(rng.sample(ids, min(len(ids), rng.randint(0, 2))))
                if ids and rng.random() < 0.3
                else frozenset(),
            )
            for i in range(rng.randint(0, 40))
        ]
        assert plan(tasks, nodes) == _plan_by_looking_at_every_node(tasks, nodes)
