"""The orchestrator role: API + node gateway + scheduler, in one nursery."""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field

import trio

from marathon.bus import Bus
from marathon.bus.memory import MemoryBus
from marathon.bus.ratelimit import MemoryRateLimiter
from marathon.config import Config, state_value
from marathon.errors import ConfigError, Unavailable
from marathon.orchestrator.api import create_app
from marathon.orchestrator.auth import Accounts, LoginLimits
from marathon.orchestrator.gateway import Gateway
from marathon.orchestrator.http import ApiContext
from marathon.orchestrator.nodes import NodeRegistry
from marathon.orchestrator.scheduling import Scheduler
from marathon.orchestrator.tasks import TaskService
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

        ctx = ApiContext(
            tasks,
            nodes,
            bus,
            gateway.send_cancel,
            accounts,
            MemoryRateLimiter(clock=trio.current_time),
            set_drain=gateway.set_drain,
            submit_rate=config.submit_rate,
            submit_burst=config.submit_burst,
            ready_checks={"gateway": gateway_listening},
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
            await nursery.start(scheduler.run)
            await nursery.start(accounts.serve_session_purge, config.session_purge_interval)
            url = binds[0] if binds else ""
            log.info("orchestrator API listening on %s", url)  # "API on" is said once ready (serve_role)
            task_status.started(
                OrchestratorInfo(url, gw_addrs[0], secret, tasks, nodes, accounts, ctx.stopping, http_done)
            )
    finally:
        if own_store:
            await store.close()
