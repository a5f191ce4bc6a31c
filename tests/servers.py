"""Real PostgreSQL, Redis and etcd servers for the tests, on loopback and free ports.

A pytest plugin (conftest.py loads it): session-scoped servers shared by the contract
suites (each test isolates itself with its own database / key prefix), and factories for
tests that stop and restart a server (those get a server of their own).  Everything a
server wrote is removed at the end.  A missing server binary fails the test with what to
install (``make system-deps`` installs them), it never skips.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_BIN = Path(os.environ.get("MARATHON_PG_BIN", "/usr/lib/postgresql/15/bin"))
START_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def require_binary(path: str | Path, package: str) -> str:
    found = shutil.which(str(path))
    if not found:
        pytest.fail(
            f"{path} not found: the distributed-backend tests need the Debian package {package!r} "
            "(`make system-deps` installs it as root; `make test` does that first)",
            pytrace=False,
        )
    return found


# Servers run detached from the test process (their parent exits at once), so tests that
# check that nothing they started outlives them do not count the servers.  A watchdog, as
# detached, kills a server whose test run died without stopping it.
_LAUNCH = r"""
"$@" >>"$SERVER_LOG" 2>&1 </dev/null &
srv=$!
echo "$srv"
alive() { [ -r /proc/$1/status ] && ! grep -q '^State:[[:space:]]*[ZX]' /proc/$1/status; }
( while [ -d /proc/$TEST_PID ] && alive "$srv"; do sleep 1; done
  alive "$srv" && kill -9 "$srv" ) </dev/null >/dev/null 2>&1 &
"""


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


class Server:
    """One server process; ``stop()``/``start()`` for restart tests (same port, same data)."""

    name = "server"

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix=f"marathon-{self.name}-", dir="/tmp")
        self.pid: int | None = None
        self.log_path = os.path.join(self.dir, "log")
        self.port = free_port()

    # subclasses
    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        return _port_open(self.port)

    def popen_kwargs(self) -> dict:
        return {}

    def running(self) -> bool:
        return self.pid is not None and pid_alive(self.pid)

    def start(self) -> None:
        assert not self.running(), f"{self.name} is running"
        env = {**os.environ, "SERVER_LOG": self.log_path, "TEST_PID": str(os.getpid())}
        out = subprocess.run(
            ["sh", "-c", _LAUNCH, "sh", *self.command()],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
            **self.popen_kwargs(),
        )
        self.pid = int(out.stdout.split()[0])
        deadline = time.monotonic() + START_TIMEOUT
        while not self.ready():
            if not self.running():
                raise RuntimeError(f"{self.name} exited at start:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.name} not ready after {START_TIMEOUT}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def send_signal(self, sig: int) -> None:
        if self.running():
            assert self.pid is not None
            os.kill(self.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        if not self.running():
            return
        self.send_signal(sig)
        deadline = time.monotonic() + timeout
        while self.running():
            if time.monotonic() > deadline:
                self.send_signal(signal.SIGKILL)
                deadline = time.monotonic() + 10
            time.sleep(0.02)
        # the port is free again only when every child (postgres backends) has gone
        wait_until = time.monotonic() + 10
        while _port_open(self.port) and time.monotonic() < wait_until:
            time.sleep(0.02)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class PostgresServer(Server):
    """PostgreSQL 15: initdb as user postgres (initdb refuses root), trust auth on loopback,
    fsync off.  ``url(db)`` for a database; ``create_database()`` for a fresh one."""

    name = "postgres"
    _ids = itertools.count(1)

    def __init__(self) -> None:
        for exe in ("initdb", "postgres"):
            require_binary(PG_BIN / exe, "postgresql-15")
        super().__init__()
        self.data = os.path.join(self.dir, "data")
        self._user = None
        if os.geteuid() == 0:
            self._user = "postgres"
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        subprocess.run(
            [str(PG_BIN / "initdb"), "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"],
            check=True,
            capture_output=True,
            user=self._user,
        )

    def popen_kwargs(self) -> dict:
        return {"user": self._user} if self._user else {}

    def command(self) -> list[str]:
        return [
            str(PG_BIN / "postgres"),
            "-D",
            self.data,
            "-p",
            str(self.port),
            "-k",
            self.dir,
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=300",
            "-c",
            "shared_buffers=64MB",
        ]

    def ready(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.url(), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30.0) -> None:  # SIGINT: fast shutdown
        super().stop(sig, timeout)

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def create_database(self, prefix: str = "t") -> str:
        import psycopg

        name = f"{prefix}_{os.getpid()}_{next(self._ids)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


class RedisServer(Server):
    name = "redis"

    def __init__(self) -> None:
        self.binary = require_binary("redis-server", "redis-server")
        super().__init__()

    def command(self) -> list[str]:
        return [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self.dir,
            "--daemonize",
            "no",
        ]

    def ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


class EtcdServer(Server):
    name = "etcd"

    def __init__(self) -> None:
        self.binary = require_binary("etcd", "etcd-server")
        super().__init__()
        self.peer_port = free_port()

    def command(self) -> list[str]:
        peer = f"http://127.0.0.1:{self.peer_port}"
        client = f"http://127.0.0.1:{self.port}"
        return [
            self.binary,
            "--name",
            "default",
            "--data-dir",
            os.path.join(self.dir, "data"),
            "--listen-client-urls",
            client,
            "--advertise-client-urls",
            client,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            f"default={peer}",
            "--initial-cluster-state",
            "new",
            "--log-level",
            "warn",
        ]

    def ready(self) -> bool:
        import httpx

        try:
            r = httpx.get(f"{self.endpoint}/health", timeout=1)
            return r.status_code == 200 and r.json().get("health") == "true"
        except (httpx.HTTPError, ValueError):
            return False

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"


# ---------------------------------------------------------------------- fixtures


def _started(cls):
    server = cls()
    try:
        server.start()
    except BaseException:
        server.remove()
        raise
    return server


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    server = _started(PostgresServer)
    yield server
    server.remove()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = _started(RedisServer)
    yield server
    server.remove()


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    server = _started(EtcdServer)
    yield server
    server.remove()


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> str:
    """A fresh, empty database on the shared server."""
    return pg_server.create_database()


class ServerFactory:
    """Servers of a test's own, for stop/start tests; all removed when the test ends."""

    def __init__(self) -> None:
        self.servers: list[Server] = []

    def _make(self, cls):
        server = _started(cls)
        self.servers.append(server)
        return server

    def postgres(self) -> PostgresServer:
        return self._make(PostgresServer)

    def redis(self) -> RedisServer:
        return self._make(RedisServer)

    def etcd(self) -> EtcdServer:
        return self._make(EtcdServer)


@pytest.fixture
def own_servers() -> Iterator[ServerFactory]:
    factory = ServerFactory()
    yield factory
    for s in factory.servers:
        s.remove()
