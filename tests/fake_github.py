"""A fake of the one GitHub REST endpoint Marathon uses: POST /repos/{owner}/{repo}/pulls.

It checks what the real one would: the bearer token, that the head branch was pushed to the
repository (a local bare "remote" at ``remotes/<owner>/<repo>.git``), that no pull request
exists yet for that head, and the request body.  ``force_status`` makes it answer an error.
"""

from __future__ import annotations

import json
import subprocess
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import h11
import trio


@dataclass
class FakeGitHub:
    token: str
    remotes: str
    url: str = ""
    force_status: int | None = None
    pulls: list[dict] = field(default_factory=list)
    requests: list[dict] = field(default_factory=list)

    def branch_exists(self, owner: str, repo: str, branch: str) -> bool:
        return (
            subprocess.run(
                [
                    "git",
                    "-C",
                    f"{self.remotes}/{owner}/{repo}.git",
                    "rev-parse",
                    "--verify",
                    "--quiet",
                    f"refs/heads/{branch}",
                ],
                capture_output=True,
            ).returncode
            == 0
        )

    def answer(self, method: str, path: str, headers: dict, body: bytes) -> tuple[int, dict]:
        self.requests.append({"method": method, "path": path, "headers": headers, "body": body})
        parts = path.strip("/").split("/")
        if method != "POST" or len(parts) != 4 or parts[0] != "repos" or parts[3] != "pulls":
            return 404, {"message": "Not Found"}
        if headers.get("authorization") != f"Bearer {self.token}":
            return 401, {"message": "Bad credentials"}
        if self.force_status:
            return self.force_status, {
                "message": {
                    403: "Resource not accessible by integration",
                    404: "Not Found",
                    422: "Validation Failed",
                }.get(self.force_status, "error"),
                "errors": [{"message": "A pull request already exists for acme:x."}]
                if self.force_status == 422
                else [],
            }
        owner, repo = parts[1], parts[2]
        try:
            data = json.loads(body)
        except ValueError:
            return 400, {"message": "Problems parsing JSON"}
        missing = [k for k in ("title", "head", "base") if not data.get(k)]
        if missing:
            return 422, {"message": "Validation Failed", "errors": [{"message": f"missing {m}"} for m in missing]}
        if not self.branch_exists(owner, repo, data["head"]):
            return 422, {"message": "Validation Failed", "errors": [{"message": f"head {data['head']} does not exist"}]}
        if any(p["head"] == data["head"] and p["repo"] == f"{owner}/{repo}" for p in self.pulls):
            return 422, {
                "message": "Validation Failed",
                "errors": [{"message": f"A pull request already exists for {owner}:{data['head']}."}],
            }
        number = len(self.pulls) + 1
        pr = {
            **data,
            "repo": f"{owner}/{repo}",
            "number": number,
            "html_url": f"https://github.example/{owner}/{repo}/pull/{number}",
        }
        self.pulls.append(pr)
        return 201, pr

    async def handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            req, body = None, b""
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(ev, h11.Request):
                    req = ev
                elif isinstance(ev, h11.Data):
                    body += ev.data
                elif isinstance(ev, h11.EndOfMessage):
                    break
                else:
                    return
            assert req is not None
            headers = {k.decode().lower(): v.decode() for k, v in req.headers}
            status, data = self.answer(req.method.decode(), req.target.decode(), headers, body)
            out = json.dumps(data).encode()
            await stream.send_all(
                conn.send(
                    h11.Response(
                        status_code=status,
                        headers=[
                            ("content-type", "application/json"),
                            ("content-length", str(len(out))),
                            ("connection", "close"),
                        ],
                    )
                )
            )
            await stream.send_all(conn.send(h11.Data(data=out)))
            await stream.send_all(conn.send(h11.EndOfMessage()))
        except (trio.BrokenResourceError, h11.ProtocolError):
            pass
        finally:
            await trio.aclose_forcefully(stream)


@asynccontextmanager
async def open_fake_github(token: str, remotes: str):
    fake = FakeGitHub(token, remotes)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    fake.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    async with trio.open_nursery() as n:
        await n.start(trio.serve_listeners, fake.handle, listeners)
        try:
            yield fake
        finally:
            n.cancel_scope.cancel()
