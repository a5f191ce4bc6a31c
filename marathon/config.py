"""Configuration: flags > environment (MARATHON_*) > .env > marathon.toml > defaults.

Everything ends up validated in one msgspec Struct; a bad value is a ConfigError that
names the key and where it came from.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Any
from collections.abc import Mapping

import msgspec

from marathon.errors import ConfigError
from marathon.pricing import DEFAULT_FALLBACK, Price
from marathon.units import parse_size

DEFAULT_URL = "http://127.0.0.1:8600"


def _default_data_dir() -> str:
    if os.geteuid() == 0:
        return "/var/lib/marathon"
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(base, "marathon")


def state_value(data_dir: str, name: str, make) -> str:
    """A value kept in ``<data_dir>/<name>`` (mode 0600): read it, or make it once and keep it."""
    path = os.path.join(data_dir, name)
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        pass
    os.makedirs(data_dir, mode=0o711, exist_ok=True)
    value = make()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # made by someone else meanwhile: theirs wins
        with open(path) as f:
            return f.read().strip()
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``tcp:`` in front allowed; ``[::1]:9464`` for IPv6) -> (host, port)."""
    addr = listen.removeprefix("tcp:")
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"metrics_listen must be HOST:PORT (e.g. 127.0.0.1:9464), not {listen!r}")
    return host.strip("[]"), int(port)


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return Path(base) / "marathon"


class Config(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    # client
    url: str = DEFAULT_URL
    token: str = ""  # API key or login token the CLI presents
    # shared
    data_dir: str = msgspec.field(default_factory=_default_data_dir)
    log_level: str = "info"
    log_format: str = "auto"  # auto (JSON lines unless stderr is a terminal) | json | text
    # orchestrator
    http_listen: str = "tcp:127.0.0.1:8600"
    gateway_listen: str = "tcp:127.0.0.1:8601"
    store: str = "sqlite"  # sqlite | sqlite:///path | postgresql://...
    store_pool_size: int = 8  # PostgreSQL connections (and worker threads) per process
    store_statement_timeout: float = 30.0  # seconds; PostgreSQL cancels a statement running longer
    store_connect_timeout: float = 5.0  # seconds a call waits for a connection before a 503
    # distributed mode: empty means in-process (one orchestrator)
    redis_url: str = ""  # redis://[:password@]host:port/db: change notifications, rate limits, login throttling
    redis_timeout: float = 5.0  # seconds, connect and each command
    bus_poll_interval: float = 5.0  # a follower looks again at least this often (a lost notification only delays)
    etcd_endpoints: str = ""  # comma-separated http(s)://host:port: membership, leases, scheduler leader
    etcd_timeout: float = 5.0  # seconds, each etcd request
    etcd_prefix: str = "/marathon/"
    lease_ttl: float = 10.0  # seconds a replica's or node's record outlives its last keepalive
    leader_ttl: float = 10.0  # seconds a dead scheduler leader keeps the lead at most
    node_secret: str = ""  # shared by all nodes: embedded mode and single-operator setups (full trust)
    node_max_slots: int = 8  # default cap on an enrolled node's slots (`marathon nodes join-token --max-slots`)
    handshake_timeout: float = 10.0  # seconds a node connection gets to authenticate
    gateway_max_unauthenticated: int = 64  # node connections still authenticating; more are closed at once
    # users' GitHub tokens are encrypted at rest (AES-256-GCM) with this key: 32 bytes, base64url
    # (`marathon admin new-secrets-key`); empty: one is generated into <data_dir>/secrets_key (0600).
    # Several orchestrator replicas need the same key.  Rotation: README, "Rotating the secrets key".
    secrets_key: str = ""
    secrets_old_keys: list[str] | str = []  # keys that still decrypt; in the environment, comma-separated
    gateway_tls_cert: str = ""  # with gateway_listen = tls:HOST:PORT
    gateway_tls_key: str = ""
    orchestrator_ca: str = ""  # node: CA file the orchestrator's certificate must chain to (default: the system's)
    heartbeat_interval: float = 2.0
    node_timeout: float = 10.0  # no heartbeat for this long: the node is lost
    node_grace: float = 10.0  # a lost node's tasks wait this long for it to come back
    assign_timeout: float = 10.0
    max_attempts: int = 3
    max_artifact: int = 512 * 1024 * 1024  # largest result bundle kept per task
    # node
    orchestrator: str = "tcp:127.0.0.1:8601"
    node_name: str = msgspec.field(default_factory=socket.gethostname)
    node_id: str = ""
    join_token: str = ""  # enrol with this one-time token (`marathon nodes join-token`); then the node's own key
    slots: int = 2
    sandbox: str = "process"  # process | qemu | firecracker
    bwrap: str = "auto"  # auto | required | off
    sandbox_uid: int = 4242  # the first sandbox uid: slot i runs as sandbox_uid + i (one uid per slot)
    # resource limits per task (cgroup v2 or v1; disk: a loop-mounted ext4 image per task on root nodes)
    limits: str = "auto"  # auto: enforce what this host can | required: refuse to start without | off
    disk_limit: str = "auto"  # auto | off: cap each task's workspace + HOME + TMPDIR at its disk size
    default_memory: int | str = "4GiB"
    max_memory: int | str = "16GiB"
    default_cpus: float = 2.0
    max_cpus: float = 0.0  # 0: as many as the host has
    default_pids: int = 1024
    max_pids: int = 8192
    default_disk: int | str = "10GiB"
    max_disk: int | str = "100GiB"
    # repositories, on the node
    repo_hosts: list[str] = []  # hosts non-administrators may clone from even when they resolve to private addresses
    git_home: str = ""  # HOME for the node's git (ssh keys, credential helpers); default: an empty one in data_dir
    claude_bin: str = ""
    image_dir: str = ""  # guest image for qemu/firecracker (default <data_dir>/image or .cache/image/current)
    vm_vcpus: int = 2
    vm_mem_mib: int = 1024
    qemu_accel: str = "auto"  # auto | kvm | tcg
    firecracker_bin: str = ""
    warm_pool_target: int = -1  # VMs kept restored and ready; -1: one per slot (VM backends), 0: off
    connect_timeout: float = 30.0
    drain_timeout: float = 60.0  # on SIGTERM a node lets running tasks go on this long, then stops them
    metrics_listen: str = ""  # HOST:PORT (e.g. 127.0.0.1:9464): the node's /metrics, /healthz, /readyz; empty: off
    anthropic_api_key: str = ""
    anthropic_base_url: str = "https://api.anthropic.com"
    github_url: str = "https://github.com"  # where owner/name repositories live (GitHub Enterprise: your host)
    github_api_url: str = "https://api.github.com"
    # task defaults
    model: str = ""
    max_turns: int = 50
    timeout: float = 3600.0
    # metering and access
    prices: dict[str, Price] = {}  # model pattern -> USD per million tokens (marathon.toml [prices."pattern"])
    price_fallback: Price = DEFAULT_FALLBACK
    allow_registration: bool = (
        False  # open sign-up; otherwise administrators create accounts (marathon admin create-user)
    )
    session_ttl: float = 30 * 86400.0  # login sessions expire after this long
    session_purge_interval: float = 600.0  # seconds between purges of expired sessions
    # sign-in throttling (429 + Retry-After while blocked; an administrator can lift it)
    login_account_failures: int = 5  # failed sign-ins per account per login_window
    login_client_failures: int = 20  # failed sign-ins per client address per login_window
    login_window: float = 900.0
    register_attempts: int = 10  # registration attempts per client address per register_window
    register_window: float = 3600.0
    submit_rate: float = 60.0  # task submissions per minute per user (token bucket)
    submit_burst: int = 20

    def __post_init__(self) -> None:
        if self.slots < 1:
            raise ValueError("slots must be at least 1")
        if self.sandbox not in ("process", "qemu", "firecracker"):
            raise ValueError(f"sandbox must be process, qemu or firecracker, not {self.sandbox!r}")
        if self.qemu_accel not in ("auto", "kvm", "tcg"):
            raise ValueError(f"qemu_accel must be auto, kvm or tcg, not {self.qemu_accel!r}")
        if self.log_format not in ("auto", "json", "text"):
            raise ValueError(f"log_format must be auto, json or text, not {self.log_format!r}")
        if self.bwrap not in ("auto", "required", "off"):
            raise ValueError(f"bwrap must be auto, required or off, not {self.bwrap!r}")
        if self.limits not in ("auto", "required", "off"):
            raise ValueError(f"limits must be auto, required or off, not {self.limits!r}")
        if self.disk_limit not in ("auto", "off"):
            raise ValueError(f"disk_limit must be auto or off, not {self.disk_limit!r}")
        for name in ("default_memory", "max_memory", "default_disk", "max_disk"):
            setattr(self, name, parse_size(getattr(self, name)))
        if self.default_cpus <= 0 or self.max_cpus < 0 or self.default_pids < 16 or self.max_pids < self.default_pids:
            raise ValueError("default_cpus must be positive, default_pids at least 16 and at most max_pids")
        if self.sandbox_uid < 1000 or self.sandbox_uid + self.slots > 2**31:
            raise ValueError("sandbox_uid must be at least 1000 (slot i runs as sandbox_uid + i)")
        if min(self.login_account_failures, self.login_client_failures, self.register_attempts) < 1:
            raise ValueError("login_account_failures, login_client_failures and register_attempts must be at least 1")
        if self.session_ttl <= 0 or self.session_purge_interval <= 0:
            raise ValueError("session_ttl and session_purge_interval must be positive (seconds)")
        if self.login_window <= 0 or self.register_window <= 0:
            raise ValueError("login_window and register_window must be positive (seconds)")
        if self.node_max_slots < 1 or self.gateway_max_unauthenticated < 1 or self.handshake_timeout <= 0:
            raise ValueError(
                "node_max_slots and gateway_max_unauthenticated must be at least 1, handshake_timeout positive"
            )
        if self.store_pool_size < 1:
            raise ValueError("store_pool_size must be at least 1")
        for name in ("lease_ttl", "leader_ttl"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be at least 2 seconds (etcd leases count whole seconds)")
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("redis_url must start with redis://, rediss:// or unix://")
        if self.secrets_key or self.secrets_old_keys:
            from marathon.secretbox import parse_key

            try:
                parse_key(self.secrets_key, "secrets_key") if self.secrets_key else None
                for k in self.secrets_old_key_list():
                    parse_key(k, "secrets_old_keys")
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        for gw in self.gateway_list():
            if not gw.startswith(("tcp:", "tls:", "unix:")):
                raise ValueError(
                    f"orchestrator must be tcp:HOST:PORT, tls:HOST:PORT or unix:/path (comma-separated), not {gw!r}"
                )
        if not self.gateway_list():
            raise ValueError("orchestrator must name at least one gateway")
        if self.metrics_listen:
            try:
                parse_listen(self.metrics_listen)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        for ep in self.etcd_endpoint_list():
            if not ep.startswith(("http://", "https://")):
                raise ValueError(f"etcd_endpoints must be http(s)://host:port, not {ep!r}")

    def secrets_old_key_list(self) -> list[str]:
        keys = self.secrets_old_keys
        if isinstance(keys, str):
            keys = keys.split(",")
        return [k.strip() for k in keys if k.strip()]

    def gateway_list(self) -> list[str]:
        """The node's orchestrator gateways (``orchestrator = "tcp:a:8601,tcp:b:8601"``): it
        connects to one, and to the next when that one cannot be reached."""
        return [g.strip() for g in self.orchestrator.split(",") if g.strip()]

    def etcd_endpoint_list(self) -> list[str]:
        return [e.strip().rstrip("/") for e in self.etcd_endpoints.split(",") if e.strip()]

    def redacted(self) -> dict[str, Any]:
        out = msgspec.structs.asdict(self)
        for key in ("token", "node_secret", "join_token", "anthropic_api_key", "secrets_key", "secrets_old_keys"):
            if out.get(key):
                out[key] = "***"
        for key in ("store", "redis_url"):  # URLs may carry a password
            out[key] = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", out[key])
        return out


FIELDS = set(Config.__struct_fields__)
ENV_PREFIX = "MARATHON_"


def parse_dotenv(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[7:]
        key, sep, value = line.partition("=")
        if not sep:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key.strip()] = value
    return out


def _from_env(env: Mapping[str, str]) -> dict[str, str]:
    out = {}
    for key, value in env.items():
        if key.startswith(ENV_PREFIX):
            name = key[len(ENV_PREFIX) :].lower()
            if name in FIELDS:
                out[name] = value
    return out


def load_config(
    flags: Mapping[str, Any] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
) -> Config:
    env = os.environ if env is None else env
    cwd = Path(cwd or os.getcwd())
    merged: dict[str, Any] = {}
    source: dict[str, str] = {}

    toml_path = Path(env["MARATHON_CONFIG"]) if env.get("MARATHON_CONFIG") else cwd / "marathon.toml"
    if toml_path.is_file():
        try:
            data = tomllib.loads(toml_path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{toml_path}: not valid TOML: {exc}") from None
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in FIELDS:
                raise ConfigError(f"{toml_path}: unknown key {key!r}")
            merged[name] = value
            source[name] = str(toml_path)

    dotenv = cwd / ".env"
    if dotenv.is_file():
        for name, value in _from_env(parse_dotenv(dotenv.read_text())).items():
            merged[name] = value
            source[name] = f"{dotenv} ({ENV_PREFIX}{name.upper()})"

    for name, value in _from_env(env).items():
        merged[name] = value
        source[name] = f"environment variable {ENV_PREFIX}{name.upper()}"

    for name, value in (flags or {}).items():
        if value is None:
            continue
        if name not in FIELDS:
            raise ConfigError(f"unknown setting {name!r}")
        merged[name] = value
        source[name] = f"flag --{name.replace('_', '-')}"

    try:
        return msgspec.convert(merged, Config, strict=False)
    except msgspec.ValidationError as exc:
        text = str(exc)
        m = re.search(r"\$\.(\w+)", text) or re.match(r"(\w+) must", text)
        if m and m.group(1) in source:
            key = m.group(1)
            raise ConfigError(f"invalid value for {key!r} from {source[key]}: {text.split(' - at ')[0]}") from None
        raise ConfigError(f"invalid configuration: {text}") from None
