"""register, login, whoami, logout, keys, usage."""

from __future__ import annotations

import getpass
import json
import re
import sys
import time
from typing import Annotated, Literal

from cyclopts import App, Parameter

from marathon.cli.app import Url, api_client, app, fail
from marathon.cli import render


def expiry_time(text: str, now: float | None = None) -> float:
    """'90d', '12h', '30m', '2w' from now, or YYYY-MM-DD (local midnight): an epoch time."""
    now = time.time() if now is None else now
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([mhdw])", text.strip())
    if m:
        return now + float(m.group(1)) * {"m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
    try:
        when = time.mktime(time.strptime(text.strip(), "%Y-%m-%d"))
    except ValueError:
        raise ValueError(f"bad --expires {text!r}: use 90d, 12h, 30m, 2w or YYYY-MM-DD") from None
    if when <= now:
        raise ValueError(f"--expires {text!r} is in the past")
    return when


def _password(password_stdin: bool, confirm: bool = False) -> str:
    if password_stdin:
        return sys.stdin.readline().rstrip("\n")
    pw = getpass.getpass("password: ")
    if confirm and getpass.getpass("again: ") != pw:
        raise SystemExit(fail("the passwords differ", 2))
    return pw


@app.command
def register(email: str, *, password_stdin: bool = False, url: Url = None) -> int:
    """Create an account on the orchestrator: open registration (``allow_registration``), or
    signed in as an administrator.  The first administrator is made with ``marathon admin create-user``.

    Parameters
    ----------
    password_stdin
        Read the password from standard input instead of prompting.
    """
    from marathon.cli.client import ApiError

    try:
        user = api_client(url).post("/v1/auth/register", {"email": email, "password": _password(password_stdin, True)})
    except ApiError as exc:
        return fail(exc.message, 2 if exc.status in (400, 409) else 1)
    print(f"registered {user['email']}{' (administrator)' if user['admin'] else ''}; now: marathon login {email}")
    return 0


@app.command
def login(email: str, *, password_stdin: bool = False, url: Url = None) -> int:
    """Log in and keep the token in your config directory (mode 0600)."""
    from marathon.cli import credentials

    client = api_client(url)
    res = client.post("/v1/auth/login", {"email": email, "password": _password(password_stdin)})
    where = credentials.save(client.url, res["token"], email=res["user"]["email"])
    print(f"logged in as {res['user']['email']} (token saved in {where})")
    return 0


@app.command
def logout(*, url: Url = None) -> int:
    """Revoke this login token and forget it."""
    from marathon.cli import credentials
    from marathon.cli.client import ApiError

    client = api_client(url)
    try:
        client.post("/v1/auth/logout")
    except ApiError as exc:
        if exc.status != 401:
            return fail(exc.message)
    credentials.forget(client.url)
    print("logged out")
    return 0


@app.command
def whoami(*, url: Url = None) -> int:
    """Who the CLI is authenticated as."""
    me = api_client(url).get("/v1/auth/whoami")
    print(f"{me['email']} ({me['id']}){' administrator' if me['admin'] else ''}")
    return 0


keys = App(name="keys", help="Manage your API keys (for scripts and CI).")
app.command(keys)


@keys.command(name="create")
def keys_create(name: str = "key", *, expires: str | None = None, url: Url = None) -> int:
    """Create an API key; it is shown once.

    Parameters
    ----------
    expires
        When it stops working: a duration (90d, 12h, 30m, 2w) from now, or YYYY-MM-DD. Default: never.
    """
    body: dict = {"name": name}
    if expires:
        try:
            body["expires_in"] = max(60, round(expiry_time(expires) - time.time()))
        except ValueError as exc:
            return fail(str(exc), 2)
    k = api_client(url).post("/v1/keys", body)
    print(k["key"])
    print(f"(id {k['id']}; shown once — use it as MARATHON_TOKEN or 'Authorization: Bearer …')", file=sys.stderr)
    return 0


@keys.command(name="list")
def keys_list(*, url: Url = None) -> int:
    """List your API keys (prefixes only)."""
    data = api_client(url).get("/v1/keys")
    now = time.time()
    for k in data["keys"]:
        expired = k.get("expires_at") is not None and k["expires_at"] <= now
        state = "revoked" if k["revoked_at"] else ("expired" if expired else "active")
        used = render.age(k["last_used_at"]) if k.get("last_used_at") else "-"
        print(f"{k['id']}  {k['prefix']}…  {state:<8} {render.age(k['created_at']):>4}  used {used:>4}  {k['name']}")
    if not data["keys"]:
        print("no keys")
    return 0


@keys.command(name="revoke")
def keys_revoke(key_id: str, *, url: Url = None) -> int:
    """Revoke an API key."""
    api_client(url).request("DELETE", f"/v1/keys/{key_id}")
    print(f"revoked {key_id}")
    return 0


@app.command
def usage(
    *,
    since: str = "30d",
    by: Literal["total", "day", "task", "model", "user"] = "total",
    user: str | None = None,
    json_output: Annotated[bool, Parameter(name="--json")] = False,
    url: Url = None,
) -> int:
    """Tokens, server-side tool requests (web search, web fetch), cost and compute time, metered per API request.

    Parameters
    ----------
    since
        7d, 24h, 30m, YYYY-MM-DD or an epoch time.
    by
        Break down by day, task, model (or user, for administrators).
    user
        Administrators: whose usage (email or id; * for everyone).
    """
    params = {"since": since, "by": by, **({"user": user} if user else {})}
    data = api_client(url).get("/v1/usage", params=params)
    if json_output:
        print(json.dumps(data, indent=2))
        return 0
    head = (
        f"{by:<24} {'requests':>8} {'input':>10} {'output':>10} {'cache w':>9} {'cache r':>9} {'tools':>6} "
        f"{'search':>6} {'fetch':>6} {'cost $':>10} {'compute':>8}"
    )
    print(head)
    rows = data["rows"] + ([data["total"]] if by != "total" else [])
    if by == "total":
        rows = [data["total"]]
    for r in rows:
        print(
            f"{str(r['key'])[:24]:<24} {r['requests']:>8} {r['input_tokens']:>10,} {r['output_tokens']:>10,} "
            f"{r['cache_creation_input_tokens']:>9,} {r['cache_read_input_tokens']:>9,} {r['tool_calls']:>6} "
            f"{r.get('web_search_requests', 0):>6} {r.get('web_fetch_requests', 0):>6} "
            f"{r['cost_usd']:>10.4f} {r['compute_s']:>7.0f}s"
        )
    return 0
