"""The orchestrator role: API + node gateway + scheduler, in one nursery."""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass

import trio

from marathon.bus import Bus
from marathon.bus.memory import MemoryBus
from marathon.config import Config, state_value
from marathon.errors import ConfigError, StoreError, Unavailable
from marathon.bus.ratelimit import MemoryRateLimiter
from marathon.orchestrator.api import ApiContext, create_app
from marathon.orchestrator.auth import Accounts, LoginLimits
from marathon.orchestrator.gateway import Gateway
from marathon.orchestrator.lifecycle import State
from marathon.orchestrator.nodes import NodeRegistry
from marathon.orchestrator.scheduler import TaskView, plan
from marathon.orchestrator.tasks import SCHED_TOPIC, TaskService
from marathon.protocol import messages as m
from marathon.store import Store, open_store

log = logging.getLogger("marathon.orchestrator")


@dataclass
class OrchestratorInfo:
    url: str
    gateway: str
    node_secret: str
    tasks: TaskService
    nodes: NodeRegistry
    accounts: Accounts


def load_node_secret(config: Config) -> str:
    """The configured node secret, or one generated once and kept in the data dir (0600)."""
    return config.node_secret or state_value(config.data_dir, "node_secret", lambda: secrets.token_urlsafe(32))


class Scheduler:
    """Assigns queued tasks and enforces deadlines (acks, lost nodes, cancels, timeouts)."""

    def __init__(self, config: Config, tasks: TaskService, nodes: NodeRegistry, gateway: Gateway):
        self.config, self.tasks, self.nodes, self.gateway = config, tasks, nodes, gateway
        self.started = time.time()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with self.tasks.bus.watch(SCHED_TOPIC) as watch:
            task_status.started()
            while True:
                watch.arm()
                try:
                    await self.schedule_once()
                    await self.reconcile_once()
                except StoreError as exc:
                    log.warning("scheduler: store unavailable: %s", exc)
                with trio.move_on_after(1.0):
                    await watch.wait()

    async def schedule_once(self) -> None:
        views = self.nodes.views()
        if not any(v.free for v in views):
            return
        queued, _ = await self.tasks.store.list_tasks(states=[State.QUEUED], limit=200, oldest_first=True)
        if not queued:
            return
        by_id = {r.id: r for r in queued}
        tv = [TaskView(r.id, r.created_at) for r in queued]
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
            session.assigned[task_id] = time.time() + self.config.assign_timeout
            assign, blobs = await self.tasks.assignment(moved)
            for blob in blobs:
                await session.send(blob)
            await session.send(assign)

    async def reconcile_once(self) -> None:
        now = time.time()
        active, _ = await self.tasks.store.list_tasks(
            states=[State.SCHEDULED, State.STARTING, State.RUNNING], limit=10_000, oldest_first=True
        )
        for rec in active:
            session = self.nodes.get(rec.node_id)
            if session is None or not session.connected:
                lost_since = session.disconnected_at if session and session.disconnected_at else self.started
                if now - lost_since >= self.config.node_grace:
                    self.nodes.forget_task(rec.id)
                    name = session.name if session else rec.node_id
                    await self.tasks.requeue_or_fail(rec, "node_lost", f"node {name} was lost")
                continue
            deadline = session.assigned.get(rec.id)
            if rec.state == State.SCHEDULED and deadline is not None and now > deadline:
                session.assigned.pop(rec.id, None)
                await self.tasks.requeue_or_fail(rec, "not_acknowledged", f"node {session.name} did not acknowledge")
                continue
            limit = (rec.request.timeout or self.config.timeout) + self.config.node_timeout + 30
            started = rec.started_at or rec.updated_at
            if rec.state == State.RUNNING and now - started > limit:
                await session.send(m.Cancel(task_id=rec.id, reason="timed out"))
                await self.tasks.move(
                    rec.id,
                    State.TIMED_OUT,
                    reason="timeout",
                    message="the node did not end the task in time",
                    expect={State.RUNNING},
                )
        for task_id, deadline in list(self.gateway.cancel_deadlines.items()):
            if now > deadline:
                self.gateway.cancel_deadlines.pop(task_id, None)
                self.nodes.forget_task(task_id)
                await self.tasks.move(
                    task_id,
                    State.CANCELLED,
                    reason="cancelled",
                    message="cancelled (the node did not confirm)",
                    expect={State.SCHEDULED, State.STARTING, State.RUNNING},
                )


async def serve_orchestrator(
    config: Config,
    *,
    store: Store | None = None,
    bus: Bus | None = None,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    from hypercorn.config import Config as HyperConfig
    from hypercorn.trio import serve as hyper_serve

    own_store = store is None
    store = store or await open_store(config.store, config.data_dir, config=config)
    bus = bus or MemoryBus()
    try:
        secret = load_node_secret(config)
        tasks = TaskService(store, bus, config)
        nodes = NodeRegistry()
        gateway = Gateway(config, tasks, nodes, secret)
        scheduler = Scheduler(config, tasks, nodes, gateway)
        accounts = Accounts(
            store,
            session_ttl=config.session_ttl,
            allow_registration=config.allow_registration,
            limits=LoginLimits.from_config(config),
        )
        gateway_addrs: list[str] = []

        async def gateway_listening() -> None:
            if not gateway_addrs:
                raise Unavailable("the node gateway is not listening yet")

        app = create_app(
            ApiContext(
                tasks,
                nodes,
                bus,
                gateway.send_cancel,
                accounts,
                MemoryRateLimiter(),
                submit_rate=config.submit_rate,
                submit_burst=config.submit_burst,
                ready_checks={"gateway": gateway_listening},
            )
        )

        hc = HyperConfig()
        listen = config.http_listen
        if listen.startswith("tcp:"):
            listen = listen[4:]
        elif not listen.startswith("unix:"):
            raise ConfigError(f"http_listen must be tcp:HOST:PORT or unix:/path, not {listen!r}")
        hc.bind = [listen]
        hc.accesslog = None
        hc.errorlog = logging.getLogger("hypercorn.error")
        hc.graceful_timeout = 2.0
        hc.keep_alive_timeout = 75.0

        async with trio.open_nursery() as nursery:
            gw_addrs = await nursery.start(gateway.serve)
            gateway_addrs[:] = gw_addrs
            binds = await nursery.start(lambda task_status: hyper_serve(app, hc, task_status=task_status))
            await nursery.start(scheduler.run)
            url = binds[0] if binds else ""
            log.info("orchestrator API listening on %s", url)  # "API on" is said once ready (serve_role)
            task_status.started(OrchestratorInfo(url, gw_addrs[0], secret, tasks, nodes, accounts))
    finally:
        if own_store:
            await store.close()
