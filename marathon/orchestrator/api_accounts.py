"""/v1/auth, /v1/keys and /v1/usage."""

from __future__ import annotations

import re
import time

import msgspec
from quart import Blueprint, request

from marathon.errors import Forbidden, InvalidRequest, NotFound
from marathon.orchestrator.http import ApiContext, body_as, json_response, principal
from marathon.orchestrator.schemas import (
    Credentials,
    GitHubToken,
    GitHubTokenResult,
    KeyList,
    KeyRequest,
    LoginResult,
    NewKey,
    Ok,
    Registration,
    Revoked,
    UsageReport,
    WhoAmI,
    key_view,
    user_view,
)
from marathon.store.models import UsageBucket


SINCE_PATTERN = (
    r"^(?:[0-9]{1,12}(?:\.[0-9]{1,9})?[smhdw]?"  # a duration ago (7d, 24h, 30m, 90s, 2w), or an epoch time
    r"|(?:19[7-9][0-9]|[2-9][0-9]{3})-(?:(?:0[1-9]|1[0-2])-(?:0[1-9]|1[0-9]|2[0-8])"  # YYYY-MM-DD
    r"|(?:0[13-9]|1[0-2])-(?:29|30)|(?:0[13578]|1[02])-31))$"
)
_SINCE = re.compile(SINCE_PATTERN)


def parse_since(text: str | None, now: float | None = None) -> float:
    """'7d', '24h', '30m', '90s', an epoch number, or YYYY-MM-DD; default 30 days.  Exactly
    what SINCE_PATTERN (the OpenAPI document's) allows; anything else is a 400."""
    now = time.time() if now is None else now
    if text is None:
        return now - 30 * 86400
    if not _SINCE.match(text) or text.endswith("\n"):
        raise InvalidRequest(f"bad 'since' {text[:40]!r}: use 7d, 24h, 30m, an epoch time or YYYY-MM-DD")
    m = re.fullmatch(r"([0-9.]+)([smhdw])", text)
    if m:
        return now - float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
    if "-" in text:
        return time.mktime(time.strptime(text, "%Y-%m-%d"))
    return float(text)


def blueprint(ctx: ApiContext) -> Blueprint:
    bp = Blueprint("accounts", __name__)
    accounts = ctx.accounts

    @bp.post("/v1/auth/register")
    async def register():
        by_admin = False
        if request.headers.get("Authorization") or request.headers.get("X-Api-Key"):
            by_admin = (await principal(ctx)).admin
        if not by_admin and request.remote_addr:
            await accounts.registration_attempt(request.remote_addr)  # malformed attempts count too
        body = await body_as(Registration)
        user = await accounts.register(body.email, body.password, by_admin=by_admin, admin=body.admin)
        return json_response(user_view(user), 201)

    @bp.post("/v1/auth/login")
    async def login():
        body = await body_as(Credentials)
        token, session, user = await accounts.login(body.email, body.password, client=request.remote_addr)
        return json_response(LoginResult(token=token, expires_at=session.expires_at, user=user_view(user)))

    @bp.post("/v1/auth/logout")
    async def logout():
        await principal(ctx)
        auth = request.headers.get("Authorization", "")
        await accounts.logout(auth[7:].strip() if auth.lower().startswith("bearer ") else "")
        return json_response(Ok())

    @bp.get("/v1/auth/whoami")
    async def whoami():
        p = await principal(ctx)
        user = await ctx.tasks.store.get_user(p.user)
        return json_response(
            WhoAmI(id=p.user, email=p.email, admin=p.admin, github_token=bool(user and user.github_token))
        )

    @bp.put("/v1/auth/github-token")
    async def github_token():
        p = await principal(ctx)
        body = await body_as(GitHubToken)
        token = (body.token or "").strip() or None
        await ctx.tasks.store.set_github_token(p.user, token)
        return json_response(GitHubTokenResult(github_token="set" if token else "cleared"))

    @bp.post("/v1/keys")
    async def create_key():
        p = await principal(ctx)
        body = await body_as(KeyRequest)
        key, rec = await accounts.create_key(
            p, body.name, None if body.expires_in is None else time.time() + body.expires_in
        )
        return json_response(NewKey(**msgspec.structs.asdict(key_view(rec)), key=key), 201)

    @bp.get("/v1/keys")
    async def list_keys():
        p = await principal(ctx)
        keys = await ctx.tasks.store.list_api_keys(p.user)
        return json_response(KeyList(keys=[key_view(k) for k in keys]))

    @bp.delete("/v1/keys/<key_id>")
    async def revoke_key(key_id: str):
        p = await principal(ctx)
        await accounts.revoke_key(p, key_id)
        return json_response(Revoked(id=key_id))

    @bp.get("/v1/usage")
    async def usage():
        p = await principal(ctx)
        by = request.args.get("by", "total")
        if by not in ("day", "task", "model", "total", "user"):
            raise InvalidRequest("by must be day, task, model, user or total")
        since = parse_since(request.args.get("since"))
        who = request.args.get("user")
        user_id: str | None = p.user
        if who:
            if not p.admin:
                raise Forbidden("only an administrator can see another user's usage")
            if who == "*":
                user_id = None
            else:
                u = await ctx.tasks.store.get_user_by_email(who.lower()) or await ctx.tasks.store.get_user(who)
                if u is None:
                    raise NotFound(f"no user {who!r}")
                user_id = u.id
        if by == "user" and not p.admin:
            raise Forbidden("only an administrator can break usage down by user")
        rows = await ctx.tasks.store.usage_summary(user_id=user_id, since=since, by=by)
        total = UsageBucket(key="total")
        for r in rows:
            for f in UsageBucket.__struct_fields__[1:]:  # every counter after the key
                setattr(total, f, getattr(total, f) + getattr(r, f))
        return json_response(
            UsageReport(
                since=since,
                by=by,  # type: ignore[arg-type]  # checked above
                user=user_id or "*",
                rows=rows,
                total=total,
            )
        )

    return bp
