"""Firecracker's REST API over its Unix socket (httpx over UDS, under trio).

Every call has an explicit timeout; transport failures and API faults become
``SandboxError`` carrying Firecracker's own ``fault_message``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import httpx
import trio

from marathon.errors import SandboxError


class FirecrackerAPI:
    """One VMM's API.  ``timeout`` bounds each request (connect + read + write)."""

    def __init__(self, sock_path: str, *, timeout: float = 5.0):
        self.sock_path = sock_path
        self.timeout = timeout
        self._client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=sock_path, retries=0),
            base_url="http://localhost",
            timeout=httpx.Timeout(timeout),
        )

    async def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                      *, timeout: float | None = None) -> Any:
        t = self.timeout if timeout is None else timeout
        try:
            with trio.fail_after(t + 1):  # belt and braces over httpx's own timeouts
                resp = await self._client.request(
                    method, path, json=body, timeout=httpx.Timeout(t),
                    headers={"Accept": "application/json"},
                )
        except trio.TooSlowError:
            raise SandboxError(f"firecracker API {method} {path}: no answer within {t:.1f}s") from None
        except httpx.TimeoutException:
            raise SandboxError(f"firecracker API {method} {path}: no answer within {t:.1f}s") from None
        except httpx.HTTPError as exc:
            raise SandboxError(f"firecracker API {method} {path}: {type(exc).__name__}: {exc}") from None
        if resp.status_code >= 300:
            raise SandboxError(f"firecracker API {method} {path} -> {resp.status_code}: {fault_message(resp.content)}")
        if not resp.content:
            return None
        try:
            return resp.json()
        except ValueError:
            return resp.text

    async def put(self, path: str, body: dict[str, Any], *, timeout: float | None = None) -> Any:
        return await self.request("PUT", path, body, timeout=timeout)

    async def patch(self, path: str, body: dict[str, Any], *, timeout: float | None = None) -> Any:
        return await self.request("PATCH", path, body, timeout=timeout)

    async def get(self, path: str, *, timeout: float | None = None) -> Any:
        return await self.request("GET", path, timeout=timeout)

    async def wait_ready(self, deadline: float, *, died: Callable[[], str | None]) -> dict[str, Any]:
        """Poll until the API answers ``GET /`` (instance info), the process dies (``died()``
        returns a reason) or the trio-clock ``deadline`` passes."""
        delay = 0.001
        last = "the API socket does not exist yet"
        while True:
            reason = died()
            if reason:
                raise SandboxError(f"firecracker exited before its API was up: {reason}")
            if os.path.exists(self.sock_path):
                try:
                    return await self.get("/", timeout=max(0.05, min(1.0, deadline - trio.current_time())))
                except SandboxError as exc:
                    last = str(exc)
            if trio.current_time() >= deadline:
                raise SandboxError(f"firecracker API not ready in time ({self.sock_path}): {last}")
            await trio.sleep(delay)
            delay = min(delay * 2, 0.02)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await self._client.aclose()


def fault_message(content: bytes) -> str:
    """Firecracker answers errors with ``{"fault_message": "..."}``."""
    try:
        doc = json.loads(content)
    except ValueError:
        return content.decode(errors="replace").strip()[:500] or "(empty body)"
    if isinstance(doc, dict) and "fault_message" in doc:
        return str(doc["fault_message"])
    return json.dumps(doc)[:500]
