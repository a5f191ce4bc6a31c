"""Scheduling decisions as plain functions: which queued task goes to which node."""

from __future__ import annotations

import heapq
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


class _Desc(str):
    """A node id that sorts last-first: the heap's ties go to the greater id, as ``max`` would."""

    __slots__ = ()

    def __lt__(self, other: str) -> bool:
        return str.__gt__(self, other)


_NO_AVOID = TaskView("", 0.0)


def plan(tasks: list[TaskView], nodes: list[NodeView]) -> list[tuple[str, str]]:
    """Assign queued tasks (oldest first) to nodes; returns (task_id, node_id) pairs.

    Each assignment takes a slot (and a warm sandbox) on its node before the next task
    is placed, so one call never oversubscribes a node.  A node a task is to avoid (it
    rejected the task) is a candidate only when no other node could take it at all: while
    one could — now or once it has a free slot — the task waits for it.

    The best node for a task that avoids none comes off a heap of the nodes by score (only
    the node just chosen is scored again): O(log nodes) a placement.  A task that avoids
    some nodes (rare: it was rejected) is placed by looking at every node.
    """
    load = {n.node_id: n for n in nodes}
    version = dict.fromkeys(load, 0)
    heap: list[tuple[float, _Desc, int, str]] = []
    for n in nodes:
        if (sc := score(n, _NO_AVOID)) is not None:
            heap.append((-sc, _Desc(n.node_id), 0, n.node_id))
    heapq.heapify(heap)
    out: list[tuple[str, str]] = []
    for task in sorted(tasks, key=lambda t: (t.created_at, t.task_id)):
        chosen: str | None = None
        if task.avoid_nodes:
            others = [n for n in load.values() if n.node_id not in task.avoid_nodes and not n.draining]
            candidates = others if others else list(load.values())
            best: tuple[float, str] | None = None
            for node in candidates:
                sc = score(node, task)
                if sc is not None and (best is None or (sc, node.node_id) > best):
                    best = (sc, node.node_id)
            chosen = best[1] if best is not None else None
        else:
            while heap and heap[0][2] != version[heap[0][3]]:
                heapq.heappop(heap)  # an entry from before the node's last assignment
            chosen = heap[0][3] if heap else None
        if chosen is None:
            continue
        node = load[chosen]
        node = load[chosen] = NodeView(chosen, node.slots, node.active + 1, max(0, node.warm - 1), node.draining)
        version[chosen] += 1
        if (sc := score(node, _NO_AVOID)) is not None:
            heapq.heappush(heap, (-sc, _Desc(chosen), version[chosen], chosen))
        out.append((task.task_id, chosen))
    return out
