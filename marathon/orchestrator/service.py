"""The orchestrator role: API + node gateway + scheduler, in one nursery."""

from __future__ import annotations

import logging
import secrets
from contextlib import AsyncExitStack
from dataclasses import dataclass, field

import trio

from marathon.bus import Bus, open_bus, open_rate_limiter, open_throttle
from marathon.bus.ratelimit import MemoryRateLimiter, RateLimiter
from marathon.bus.throttle import LoginThrottle, MemoryThrottle
from marathon.config import Config, state_value
from marathon.errors import ConfigError, Unavailable
from marathon.orchestrator.api import create_app
from marathon.orchestrator.cluster import Cluster, new_replica_id
from marathon.orchestrator.auth import Accounts, LoginLimits
from marathon.orchestrator.gateway import Gateway
from marathon.orchestrator.http import ApiContext
from marathon.orchestrator.metrics import OrchestratorMetrics
from marathon.orchestrator.nodes import NodeRegistry
from marathon.orchestrator.scheduling import Scheduler
from marathon.orchestrator.tasks import TaskService
from marathon.registry import Registry, open_registry
from marathon.store import Store, open_store

log = logging.getLogger("marathon.orchestrator")


GRACEFUL_TIMEOUT = 5.0  # open HTTP requests get this long to finish when the orchestrator stops


@dataclass
class OrchestratorInfo:
    url: str
    gateway: str
    node_secret: str
    tasks: TaskService
    nodes: NodeRegistry
    accounts: Accounts
    stopping: trio.Event = field(default_factory=trio.Event)  # set: the API shuts down gracefully
    http_done: trio.Event = field(default_factory=trio.Event)  # set once it has

    async def stop_http(self) -> None:
        """Graceful HTTP shutdown: no new connections, event streams end cleanly (followers
        resume with Last-Event-ID), open requests get ``graceful_timeout``.  Then return; the
        rest of the orchestrator stops when its nursery is cancelled."""
        self.stopping.set()
        with trio.move_on_after(GRACEFUL_TIMEOUT + 1.0):
            await self.http_done.wait()


def load_node_secret(config: Config) -> str:
    """The configured node secret, or one generated once and kept in the data dir (0600)."""
    return config.node_secret or state_value(config.data_dir, "node_secret", lambda: secrets.token_urlsafe(32))


async def serve_orchestrator(
    config: Config,
    *,
    store: Store | None = None,
    bus: Bus | None = None,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """One orchestrator replica: the store, bus, limits and registry its configuration names
    (embedded ones by default), then the API, the node gateway, its place in the cluster and
    the scheduler."""
    async with AsyncExitStack() as stack:
        if store is None:
            store = await open_store(config.store, config.data_dir, config=config)
            stack.push_async_callback(store.close)
        if bus is None:  # in-process, or Redis when redis_url is set (several replicas)
            bus = await stack.enter_async_context(open_bus(config))
        if config.redis_url:
            limiter: RateLimiter = await stack.enter_async_context(open_rate_limiter(config))
            throttle: LoginThrottle = await stack.enter_async_context(open_throttle(config))
        else:  # on trio's clock, so tests can use a virtual one
            limiter, throttle = MemoryRateLimiter(clock=trio.current_time), MemoryThrottle(clock=trio.current_time)
        registry = await stack.enter_async_context(open_registry(config))  # etcd when etcd_endpoints is set
        await _serve(config, store, bus, limiter, throttle, registry, task_status)


async def _serve(
    config: Config,
    store: Store,
    bus: Bus,
    limiter: RateLimiter,
    throttle: LoginThrottle,
    registry: Registry,
    task_status,
) -> None:
    from hypercorn.config import Config as HyperConfig
    from hypercorn.trio import serve as hyper_serve

    secret = load_node_secret(config)
    metrics = OrchestratorMetrics()  # this service's own registry (GET /metrics)
    timed_store = metrics.timed_store(store)
    tasks = TaskService(timed_store, bus, config, metrics=metrics)
    nodes = NodeRegistry()
    metrics.attach(timed_store, nodes)
    gateway = Gateway(config, tasks, nodes, secret)
    cluster = Cluster(registry, nodes, new_replica_id(), lease_ttl=config.lease_ttl)
    gateway.nodes_changed = cluster.nodes_changed
    metrics.leading = lambda: cluster.leading
    scheduler = Scheduler(config, tasks, nodes, gateway, cluster)
    accounts = Accounts(
        timed_store,
        session_ttl=config.session_ttl,
        allow_registration=config.allow_registration,
        throttle=throttle,
        limits=LoginLimits.from_config(config),
    )
    gateway_addrs: list[str] = []

    async def leader_known() -> None:
        if await registry.leader("scheduler") is None:
            raise Unavailable("no replica leads the cluster yet")

    async def gateway_listening() -> None:
        if not gateway_addrs:
            raise Unavailable("the node gateway is not listening yet")

    ctx = ApiContext(
        tasks,
        nodes,
        bus,
        gateway.send_cancel,
        accounts,
        limiter,
        set_drain=gateway.set_drain,
        identities=gateway.identities,
        revoke_node=gateway.revoke,
        submit_rate=config.submit_rate,
        submit_burst=config.submit_burst,
        ready_checks={"gateway": gateway_listening, "leader": leader_known},
        cluster=cluster,
        metrics=metrics,
    )
    app = create_app(ctx)

    hc = HyperConfig()
    listen = config.http_listen
    if listen.startswith("tcp:"):
        listen = listen[4:]
    elif not listen.startswith("unix:"):
        raise ConfigError(f"http_listen must be tcp:HOST:PORT or unix:/path, not {listen!r}")
    hc.bind = [listen]
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    hc.graceful_timeout = GRACEFUL_TIMEOUT
    hc.keep_alive_timeout = 75.0

    async def serve_http(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            await hyper_serve(app, hc, shutdown_trigger=ctx.stopping.wait, task_status=task_status)
        finally:
            http_done.set()

    http_done = trio.Event()
    async with trio.open_nursery() as nursery:
        gw_addrs = await nursery.start(gateway.serve)
        gateway_addrs[:] = gw_addrs
        binds = await nursery.start(serve_http)
        url = binds[0] if binds else ""
        await nursery.start(cluster.run, url, gw_addrs[0])
        nursery.start_soon(cluster.lead, config.leader_ttl)
        await nursery.start(scheduler.run)
        await nursery.start(accounts.serve_session_purge, config.session_purge_interval)
        log.info("orchestrator API listening on %s", url)  # "API on" is said once ready (serve_role)
        task_status.started(OrchestratorInfo(url, gw_addrs[0], secret, tasks, nodes, accounts, ctx.stopping, http_done))
