"""A thin synchronous client of the orchestrator's HTTP API (used by the CLI)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from collections.abc import Iterator

import httpx

from marathon.errors import MarathonError


class ApiError(MarathonError):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class Unreachable(ApiError):
    """The orchestrator did not answer (it may be restarting)."""


TERMINAL = frozenset({"succeeded", "failed", "cancelled", "timed_out"})


@dataclass
class SseEvent:
    id: int
    kind: str
    data: dict


class Client:
    def __init__(self, url: str, token: str = "", timeout: float = 30.0, retries: int = 30):
        self.url = url.rstrip("/")
        self.retries = retries
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, trust_env=False)

    def close(self) -> None:
        self._http.close()

    def _check(self, resp: httpx.Response) -> httpx.Response:
        if resp.status_code >= 400:
            try:
                err = resp.json()["error"]
                code, message = err.get("code", "error"), err.get("message", resp.text)
            except (ValueError, KeyError, TypeError):
                code, message = "http_error", resp.text.strip() or resp.reason_phrase
            raise ApiError(resp.status_code, code, message)
        return resp

    def request(self, method: str, path: str, **kw) -> httpx.Response:
        try:
            return self._check(self._http.request(method, path, **kw))
        except httpx.TransportError as exc:
            raise Unreachable(0, "unreachable", f"cannot reach the orchestrator at {self.url}: {exc}") from None

    def get(self, path: str, **kw) -> dict:
        return self.request("GET", path, **kw).json()

    def post(self, path: str, body: dict | None = None) -> dict:
        return self.request("POST", path, json=body or {}).json()

    def events(self, task_id: str, *, after: int = 0, follow: bool = True) -> Iterator[SseEvent]:
        """Yield events in order; on a dropped connection resume after the last one seen.  A
        followed stream that ends before the task did (the orchestrator shut down, or restarts)
        is resumed the same way."""
        failures, retries = 0, self.retries
        ended = False
        while True:
            headers = {"Last-Event-ID": str(after)} if after else {}
            try:
                with self._http.stream(
                    "GET",
                    f"/v1/tasks/{task_id}/events",
                    params={"follow": "1" if follow else "0"},
                    headers=headers,
                    timeout=httpx.Timeout(30.0, read=None),
                ) as resp:
                    if resp.status_code >= 400:
                        resp.read()
                        self._check(resp)
                    for ev in parse_sse(resp.iter_lines()):
                        failures = 0
                        after = ev.id
                        ended = ended or (ev.kind == "state" and ev.data.get("state") in TERMINAL)
                        yield ev
                if not follow or ended or self.get(f"/v1/tasks/{task_id}").get("terminal"):
                    return
                why = "the event stream ended before the task"
            except (httpx.TransportError, httpx.RemoteProtocolError, Unreachable) as exc:
                why = str(exc)
            failures += 1
            if failures > retries:
                raise ApiError(0, "unreachable", f"lost the event stream: {why}") from None
            time.sleep(min(0.05 * 2 ** min(failures, 7), 5.0))


def parse_sse(lines: Iterator[str]) -> Iterator[SseEvent]:
    ev_id: str | None = None
    kind, data = "message", list[str]()
    for line in lines:
        if line == "":
            if data and ev_id is not None:
                try:
                    yield SseEvent(int(ev_id), kind, json.loads("\n".join(data)))
                except ValueError:
                    pass
            ev_id, kind, data = None, "message", []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "id":
                ev_id = value
            elif field == "event":
                kind = value
            elif field == "data":
                data.append(value)
