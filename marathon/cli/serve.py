"""Role wiring: the only place that imports across the role packages."""

from __future__ import annotations

import logging
import os
import signal
import sys

import msgspec
import trio

from marathon.config import Config, load_config
from marathon.errors import ConfigError, first_leaf
from marathon.logs import _Redact, json_enabled, redact_also  # noqa: F401  (_Redact lives in marathon.logs now)
from marathon.notify import serve_notify

log = logging.getLogger("marathon")


def setup_logging(config: Config, role: str) -> None:
    from marathon.logs import setup_logging as _setup

    _setup(
        role=role,
        level=config.log_level,
        log_format=config.log_format,
        secrets=[
            config.anthropic_api_key,
            config.node_secret,
            config.join_token,
            config.token,
            config.secrets_key,
            *config.secrets_old_key_list(),
        ],  # fmt: skip
    )


def make_backend(config: Config, cgroups=None):
    from marathon.errors import SandboxError
    from marathon.node.sandbox.process import ProcessBackend

    try:
        if config.sandbox == "process":
            return ProcessBackend(bwrap=config.bwrap, data_dir=config.data_dir, claude_bin=config.claude_bin,
                                  log_level=config.log_level, cgroups=cgroups, disk=config.disk_limit)  # fmt: skip
        if config.sandbox == "qemu":
            from marathon.node.sandbox.qemu import QemuBackend

            return QemuBackend(
                image_dir=config.image_dir,
                data_dir=config.data_dir,
                vcpus=config.vm_vcpus,
                mem_mib=config.vm_mem_mib,
                accel=config.qemu_accel,
                cgroups=cgroups,
                default_disk=int(config.default_disk) if config.disk_limit != "off" else 0,
            )
        from marathon.node.sandbox.detect import default_image_dir
        from marathon.node.sandbox.firecracker import FirecrackerBackend

        return FirecrackerBackend(
            firecracker_bin=config.firecracker_bin,
            image_dir=config.image_dir or default_image_dir(config.data_dir),
            vcpus=config.vm_vcpus,
            mem_mib=config.vm_mem_mib,
            cgroups=cgroups,
        )
    except SandboxError as exc:
        raise ConfigError(f"node cannot start: {exc}") from None


def detect_cgroups(config: Config):
    """Which limits this node can enforce; ``limits = required`` refuses to start without memory and pids."""
    from marathon.errors import ConfigError
    from marathon.node.cgroups import Cgroups
    from marathon.node.identity import load_node_id

    cgroups = Cgroups.detect(load_node_id(config), prefer="off" if config.limits == "off" else "auto")
    if config.limits == "required" and not {"memory", "pids"} <= set(cgroups.enforced):
        raise ConfigError(f"limits = required, but {cgroups.describe()}")
    return cgroups


def run_serve(role: str, flags: dict, listen: str | None) -> int:
    if role == "agent":
        # the agent never reads config files from its working directory (the repository),
        # and what it writes is for the sandbox's user to read (whatever umask the node had)
        config = load_config(flags, cwd="/nonexistent")
        os.umask(0o022)
    else:
        config = load_config(flags)
    setup_logging(config, role)
    if role != "agent":
        # state files are private to us; sandboxes under data_dir may be traversed, not listed
        os.umask(0o077)
        os.makedirs(config.data_dir, mode=0o711, exist_ok=True)
        os.chmod(config.data_dir, 0o711)
    try:
        try:
            trio.run(serve_until_signalled, role, config, listen)
        except* ConfigError as group:  # a bad setting found while starting: one line, exit status 2
            raise first_leaf(group) from None
    except KeyboardInterrupt:  # before the signal receiver was up, or after it was gone
        log.info("interrupted; shut down")
    return 0


async def serve_until_signalled(role: str, config: Config, listen: str | None = None) -> None:
    """Serve ``role`` until SIGTERM or SIGINT, then stop: gracefully first (a node drains its
    tasks, the API ends its event streams and open requests), then by cancelling everything;
    every cleanup on the way is shielded and bounded.  A second signal cuts the graceful part short."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as root:
            started: list = []

            async def start() -> None:
                started.append(await root.start(serve_role, role, config, listen))

            root.start_soon(start)
            async for signum in signals:
                log.info("%s: shutting down", signal.Signals(signum).name)
                break
            if started and role != "agent":
                with trio.CancelScope() as graceful:

                    async def cut_short() -> None:
                        async for signum in signals:
                            log.warning("%s again: stopping now", signal.Signals(signum).name)
                            graceful.cancel()
                            return

                    root.start_soon(cut_short)
                    info, node = started[0]
                    await stop_gracefully(config, info, node)
            root.cancel_scope.cancel()
    log.info("shut down")


async def stop_gracefully(config: Config, info, node) -> None:
    """The graceful part of a shutdown: the node first (in ``all`` its results still reach the
    orchestrator in this process), then the API."""
    if node is not None:
        await node.shutdown(config.drain_timeout)
    if info is not None:
        await info.stop_http()


async def serve_role(role: str, config: Config, listen: str | None = None, *, task_status=trio.TASK_STATUS_IGNORED):
    if role == "agent":
        from marathon.agent.service import serve_agent

        if not listen:
            raise ConfigError("the agent needs --listen ADDRESS")
        await serve_agent(config, listen, task_status=task_status)
        return

    async with trio.open_nursery() as nursery:
        info = None
        if role in ("orchestrator", "all"):
            from marathon.orchestrator.service import serve_orchestrator

            info = await nursery.start(serve_orchestrator, config)
            redact_also(info.node_secret)
        node = None
        if role in ("node", "all"):
            from marathon.node.service import serve_node
            from marathon.orchestrator.service import load_node_secret

            node_config = config
            if info is not None:  # in one process the node trusts its own orchestrator's certificate
                node_config = msgspec.structs.replace(
                    config, orchestrator=info.gateway, orchestrator_ca=config.orchestrator_ca or config.gateway_tls_cert
                )
            if info is not None:
                secret = info.node_secret
            elif config.node_secret:
                secret = config.node_secret
            elif await trio.Path(config.data_dir, "node_secret").exists():
                secret = load_node_secret(config)
            elif config.join_token or await trio.Path(config.data_dir, "node_credential").exists():
                secret = ""  # the node's own key (enrolled with a join token)
            else:
                raise ConfigError(
                    "a node needs a join token (MARATHON_JOIN_TOKEN, from `marathon nodes join-token`) "
                    "or the orchestrator's node secret (MARATHON_NODE_SECRET)"
                )
            cgroups = detect_cgroups(node_config)
            backend = make_backend(node_config, cgroups)
            log.info("sandbox backend %s: %s", backend.name, backend.info.isolation)
            log.info("limits: %s; disk: %s", cgroups.describe(), getattr(backend, "disk_note", "the guest's own disk"))
            for w in backend.info.warnings:
                log.warning("%s", w)
            if not config.anthropic_api_key:
                log.warning("no Anthropic API key: set MARATHON_ANTHROPIC_API_KEY (environment, .env or marathon.toml)")
            redact_also(secret)
            node = await nursery.start(serve_node, node_config, backend, secret)
        if info is not None:
            if role == "all":
                await bootstrap_local_admin(info, config)
            if json_enabled():  # stderr is JSON lines: say it in a record
                log.info("marathon %s: API on %s", role, info.url)
            else:
                print(f"marathon {role}: API on {info.url}", file=sys.stderr, flush=True)
        nursery.start_soon(serve_notify, f"marathon {role}: API on {info.url}" if info else f"marathon {role}")
        task_status.started((info, node))


async def bootstrap_local_admin(info, config: Config) -> None:
    """Embedded mode on a laptop: whoever starts the server owns it.  The first start creates
    a local administrator; any start whose saved credentials no longer work mints a new key
    for it and saves it where the CLI looks, so `marathon run` needs no set-up."""
    from marathon.cli import credentials
    from marathon.errors import AuthError
    from marathon.orchestrator.auth import Principal

    urls = {info.url.rstrip("/"), config.url.rstrip("/")}
    for url in urls:
        saved = credentials.load(url)
        if saved:
            try:
                await info.accounts.authenticate(f"Bearer {saved['token']}")
                continue
            except AuthError:
                pass
        admin = await info.accounts.ensure_local_admin()
        key, _ = await info.accounts.create_key(
            Principal(admin.id, admin.email, True), "local (marathon serve --role all)"
        )
        where = credentials.save(url, key, email=admin.email)
        log.info("local administrator %s: API key saved in %s for %s", admin.email, where, url)
