"""The scheduler's shell: assigns queued tasks (``scheduler.plan``) and carries out the deadline
decisions (``reconcile.reconcile``).  It wakes on the scheduler topic (a task queued or ended, a
node's capacity changed, a node came or went), at the next deadline, or every PERIOD."""

from __future__ import annotations

import logging
import time
from typing import assert_never

import trio

from marathon.config import Config
from marathon.errors import StoreError
from marathon.orchestrator.cluster import Cluster
from marathon.orchestrator.gateway import Gateway
from marathon.orchestrator.lifecycle import State
from marathon.orchestrator.nodes import NodeRegistry
from marathon.orchestrator.reconcile import ConfirmCancel, Deadline, Fail, Plan, Requeue, TimeOut, reconcile
from marathon.orchestrator.scheduler import TaskView, plan
from marathon.orchestrator.tasks import SCHED_TOPIC, TaskService, active_task
from marathon.protocol import messages as m
from marathon.store import TaskRecord

log = logging.getLogger("marathon.orchestrator")
PERIOD = 5.0  # look again at least this often, whatever was (or was not) announced


class Scheduler:
    """Assigns queued tasks and enforces deadlines (acks, lost nodes, cancels, timeouts)."""

    def __init__(
        self, config: Config, tasks: TaskService, nodes: NodeRegistry, gateway: Gateway, cluster: Cluster | None = None
    ):
        self.config, self.tasks, self.nodes, self.gateway = config, tasks, nodes, gateway
        self.cluster = cluster
        self.started = trio.current_time()
        self.since: dict[tuple, float] = {}  # (state, task id[, attempt]) -> when it entered it (trio clock)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with self.tasks.bus.watch(SCHED_TOPIC) as watch:
            task_status.started()
            while True:
                watch.arm()
                wake_at = trio.current_time() + PERIOD
                try:
                    await self.schedule_once()
                    decided = await self.reconcile_once()
                    if decided.wake_at is not None:
                        wake_at = min(wake_at, decided.wake_at)
                except StoreError as exc:
                    log.warning("scheduler: store unavailable: %s", exc)
                with trio.move_on_at(wake_at):
                    await watch.wait()

    async def schedule_once(self) -> None:
        views = self.nodes.views()
        if self.cluster is not None:  # a node that moved to another replica is placed there, not here
            elsewhere = self.cluster.remote_nodes()
            views = [v for v in views if v.node_id not in elsewhere]
        if not any(v.free for v in views):
            return
        queued, _ = await self.tasks.store.list_tasks(states=[State.QUEUED], limit=200, oldest_first=True)
        if not queued:
            return
        by_id = {r.id: r for r in queued}
        tv = [TaskView(r.id, r.created_at, self.nodes.avoided(r.id)) for r in queued]
        for task_id, node_id in plan(tv, views):
            rec, session = by_id[task_id], self.nodes.get(node_id)
            if session is None:
                continue
            moved = await self.tasks.move(
                task_id,
                State.SCHEDULED,
                expect={State.QUEUED},
                message=f"assigned to node {session.name}",
                changes={"node_id": node_id, "attempt": rec.attempt + 1, "last_node_seq": 0, "reason": None},
            )
            if moved is None:
                continue
            self.tasks.metrics.task_scheduled(rec.updated_at)  # queued since its last change
            session.assigned[task_id] = trio.current_time() + self.config.assign_timeout
            assign, bundle = await self.tasks.assignment(moved)
            await self.gateway.deliver(session, assign, bundle)

    def _since(self, key: tuple, stored: float | None, now: float) -> float:
        """When a task entered its state, on trio's clock: as first seen by this process, from
        the age of its stored time (a wall-clock stamp, read once)."""
        since = self.since.get(key)
        if since is None:
            age = max(0.0, time.time() - stored) if stored else 0.0
            since = self.since[key] = now - age
        return since

    async def reconcile_once(self) -> Plan:
        now = trio.current_time()
        active, _ = await self.tasks.store.list_tasks(
            states=[State.SCHEDULED, State.STARTING, State.RUNNING], limit=10_000, oldest_first=True
        )
        by_id = {r.id: r for r in active}
        facts = []
        for rec in active:
            running = (
                self._since(("running", rec.id), rec.started_at or rec.updated_at, now)
                if rec.state == State.RUNNING
                else None
            )
            scheduled = (
                self._since(("scheduled", rec.id, rec.attempt), rec.updated_at, now)
                if rec.state == State.SCHEDULED
                else None
            )
            facts.append(active_task(rec, running, scheduled))
        current = {("running", r.id) for r in active if r.state == State.RUNNING} | {
            ("scheduled", r.id, r.attempt) for r in active if r.state == State.SCHEDULED
        }
        for key in set(self.since) - current:
            del self.since[key]
        sessions = (
            self.cluster.session_facts(now, {r.node_id for r in active if r.node_id})
            if self.cluster is not None
            else self.nodes.facts()
        )
        decided = reconcile(
            facts,
            sessions,
            now,
            self.config,
            started=self.started,
            cancel_deadlines=dict(self.gateway.cancel_deadlines),
        )
        for action in decided.actions:
            await self._execute(action, by_id)
        return decided

    async def _may_give_back(self, rec: TaskRecord) -> bool:
        """A lost node's task is given back once a fresh read of the registry confirms the node
        is connected nowhere (the watch may lag; this replica may have been stopped a while):
        by the replica it was last connected to, or by the leader for a node no replica has."""
        assert self.cluster is not None
        if not rec.node_id or not await self.cluster.node_is_nowhere(rec.node_id):
            return False
        return self.nodes.get(rec.node_id) is not None or self.cluster.leading

    async def _execute(self, action: Deadline, by_id: dict[str, TaskRecord]) -> None:
        match action:
            case Requeue() | Fail():
                rec = by_id[action.task_id]
                if action.reason == "node_lost" and self.cluster is not None and not await self._may_give_back(rec):
                    return
                self.nodes.forget_task(action.task_id)
                await self.tasks.give_back(rec, action)
            case TimeOut():
                session = self.nodes.get(action.node_id)
                if session is not None:
                    await session.send(m.Cancel(task_id=action.task_id, reason="timed out"))
                await self.tasks.move(
                    action.task_id,
                    State.TIMED_OUT,
                    reason="timeout",
                    message="the node did not end the task in time",
                    expect={State.RUNNING},
                )
            case ConfirmCancel():
                self.gateway.cancel_deadlines.pop(action.task_id, None)
                self.nodes.forget_task(action.task_id)
                await self.tasks.move(
                    action.task_id,
                    State.CANCELLED,
                    reason="cancelled",
                    message="cancelled (the node did not confirm)",
                    expect={State.SCHEDULED, State.STARTING, State.RUNNING},
                )
            case _:
                assert_never(action)
