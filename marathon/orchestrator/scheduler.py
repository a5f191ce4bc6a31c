"""Scheduling decisions as plain functions: which queued task goes to which node."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class NodeView:
    node_id: str
    slots: int
    active: int  # running plus assigned-but-unacknowledged
    warm: int = 0
    draining: bool = False

    @property
    def free(self) -> int:
        return max(0, self.slots - self.active)


@dataclass(frozen=True)
class TaskView:
    task_id: str
    created_at: float
    avoid_nodes: frozenset[str] = field(default_factory=frozenset)


def score(node: NodeView, task: TaskView) -> float | None:
    """Higher is better; None means the node must not take the task.

    Prefers nodes with a warm sandbox ready (no boot on the critical path), then the
    least loaded node (spread work), and avoids nodes this task already failed on.
    """
    if node.draining or node.free <= 0:
        return None
    s = node.free / node.slots
    if node.warm > 0:
        s += 1.0
    if node.node_id in task.avoid_nodes:
        s -= 2.0
    return s


def plan(tasks: list[TaskView], nodes: list[NodeView]) -> list[tuple[str, str]]:
    """Assign queued tasks (oldest first) to nodes; returns (task_id, node_id) pairs.

    Each assignment takes a slot (and a warm sandbox) on its node before the next task
    is placed, so one call never oversubscribes a node.  A node a task is to avoid (it
    rejected the task) is a candidate only when no other node could take it at all: while
    one could — now or once it has a free slot — the task waits for it.
    """
    load = {n.node_id: n for n in nodes}
    out: list[tuple[str, str]] = []
    for task in sorted(tasks, key=lambda t: (t.created_at, t.task_id)):
        others = [n for n in load.values() if n.node_id not in task.avoid_nodes and not n.draining]
        candidates = others if others else list(load.values())
        best: tuple[float, str] | None = None
        for node in candidates:
            s = score(node, task)
            if s is not None and (best is None or (s, node.node_id) > best):
                best = (s, node.node_id)
        if best is None:
            continue
        node = load[best[1]]
        load[node.node_id] = NodeView(node.node_id, node.slots, node.active + 1, max(0, node.warm - 1), node.draining)
        out.append((task.task_id, node.node_id))
    return out
