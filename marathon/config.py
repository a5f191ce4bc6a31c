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
    # orchestrator
    http_listen: str = "tcp:127.0.0.1:8600"
    gateway_listen: str = "tcp:127.0.0.1:8601"
    store: str = "sqlite"  # sqlite | sqlite:///path | postgresql://...
    node_secret: str = ""
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
    slots: int = 2
    sandbox: str = "process"  # process | qemu | firecracker
    bwrap: str = "auto"  # auto | required | off
    sandbox_uid: int = 4242
    claude_bin: str = ""
    image_dir: str = ""  # guest image for qemu/firecracker (default <data_dir>/image or .cache/image/current)
    vm_vcpus: int = 2
    vm_mem_mib: int = 1024
    qemu_accel: str = "auto"  # auto | kvm | tcg
    firecracker_bin: str = ""
    warm_pool_target: int = -1  # VMs kept restored and ready; -1: one per slot (VM backends), 0: off
    connect_timeout: float = 30.0
    drain_timeout: float = 60.0  # on SIGTERM a node lets running tasks go on this long, then stops them
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
    allow_registration: bool = False  # open sign-up; otherwise the first account, then administrators register users
    session_ttl: float = 30 * 86400.0
    submit_rate: float = 60.0  # task submissions per minute per user (token bucket)
    submit_burst: int = 20

    def __post_init__(self) -> None:
        if self.slots < 1:
            raise ValueError("slots must be at least 1")
        if self.sandbox not in ("process", "qemu", "firecracker"):
            raise ValueError(f"sandbox must be process, qemu or firecracker, not {self.sandbox!r}")
        if self.qemu_accel not in ("auto", "kvm", "tcg"):
            raise ValueError(f"qemu_accel must be auto, kvm or tcg, not {self.qemu_accel!r}")
        if self.bwrap not in ("auto", "required", "off"):
            raise ValueError(f"bwrap must be auto, required or off, not {self.bwrap!r}")

    def redacted(self) -> dict[str, Any]:
        out = msgspec.structs.asdict(self)
        for key in ("token", "node_secret", "anthropic_api_key"):
            if out.get(key):
                out[key] = "***"
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
