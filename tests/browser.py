"""A real headless browser for the dashboard's tests and benchmark: Debian's chromium driven
by Selenium through Debian's chromedriver (no browser download, no network), and a TCP proxy
in front of the orchestrator that can drop and hold connections (to prove the event stream
resumes)."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import trio

REPO_ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("MARATHON_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("MARATHON_CHROMEDRIVER", "/usr/bin/chromedriver")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-dev-shm-usage",
    "--disable-extensions",
    "--disable-features=Translate,OptimizationHints,MediaRouter",
    "--window-size=1280,960",
]


async def fill_tasks(store, owner: str, n: int) -> list[str]:
    """``n`` tasks of every state straight into the store (newest last), for pages of many."""
    from marathon.orchestrator.lifecycle import State
    from marathon.orchestrator.tasks import event_in, new_task_id
    from marathon.protocol import messages as m
    from marathon.store import TaskRecord, TaskRequest

    states = [State.SUCCEEDED, State.FAILED, State.RUNNING, State.QUEUED, State.CANCELLED]
    now = time.time()
    ids = []
    for i in range(n):
        state = states[i % len(states)]
        rec = TaskRecord(
            id=new_task_id(),
            owner=owner,
            state=state,
            request=TaskRequest(prompt=f"task {i}: fix the flaky test in module {i % 37}", repo=f"acme/repo{i % 11}"),
            created_at=now - (n - i) * 10,
            started_at=now - (n - i) * 10 + 1,
            finished_at=now - (n - i) * 10 + 30 if state != State.RUNNING else None,
            usage=m.Usage(1000 + i, 200 + i, 0, 50),
            cost_usd=0.01 * (i % 9),
        )
        await store.create_task(rec, event_in(rec.id, m.StateEvent(state=str(state))))
        ids.append(rec.id)
    return ids


def missing() -> str | None:
    """Why the browser cannot run here (None when it can)."""
    for path, pkg in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"{path} not found: install the Debian package {pkg} (make test does)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: make venv installs the dev dependencies"
    return None


def output_dir(name: str) -> Path:
    """Where screenshots go: $MARATHON_TEST_OUTPUT/<name> (default test-output/<name>)."""
    d = Path(os.environ.get("MARATHON_TEST_OUTPUT") or REPO_ROOT / "test-output") / name
    d.mkdir(parents=True, exist_ok=True)
    return d


@contextmanager
def open_chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_AVOID_STATS", "true")
    profile = tempfile.mkdtemp(prefix="marathon-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in CHROMIUM_ARGS:
        opts.add_argument(arg)
    opts.add_argument(f"--user-data-dir={profile}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))
    try:
        driver.set_page_load_timeout(30)
        driver.set_script_timeout(30)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def console_errors(driver) -> list[dict]:
    """Console entries at error level since the last call (the browser's log is drained)."""
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


class DropProxy:
    """Forwards 127.0.0.1:<port> to the orchestrator.  ``drop()`` resets every open
    connection; while ``hold()`` is in force new connections wait before reaching it."""

    def __init__(self, upstream: str):
        host, _, port = upstream.rpartition("//")[2].partition(":")
        self.upstream = (host, int(port.rstrip("/")))
        self.url = ""
        self.connections = 0
        self._open: set[trio.SocketStream] = set()
        self._go = trio.Event()
        self._go.set()

    def hold(self) -> None:
        if self._go.is_set():
            self._go = trio.Event()

    def release(self) -> None:
        self._go.set()

    def drop(self) -> None:
        for s in list(self._open):
            # an abortive close (RST): the browser sees the stream break mid-body
            s.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.socket.close()
        self._open.clear()

    async def _pipe(self, src: trio.SocketStream, dst: trio.SocketStream) -> None:
        try:
            while data := await src.receive_some(65536):
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    async def handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        await self._go.wait()
        try:
            with trio.fail_after(10):
                server = await trio.open_tcp_stream(*self.upstream)
        except (OSError, trio.TooSlowError):
            await trio.aclose_forcefully(client)
            return
        self._open.update((client, server))
        try:
            async with trio.open_nursery() as n:

                async def one_way(a, b):
                    await self._pipe(a, b)
                    n.cancel_scope.cancel()

                n.start_soon(one_way, client, server)
                n.start_soon(one_way, server, client)
        finally:
            self._open.discard(client)
            self._open.discard(server)
            for s in (client, server):
                try:
                    await trio.aclose_forcefully(s)
                except (OSError, trio.ClosedResourceError):
                    pass

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        await trio.serve_listeners(self.handle, listeners, task_status=task_status)
