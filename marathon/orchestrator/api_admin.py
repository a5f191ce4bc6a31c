"""/v1/admin: administrators list users, disable and enable them, revoke any API key and lift
sign-in lockouts.  Every route answers 403 to anyone else."""

from __future__ import annotations

from quart import Blueprint

from marathon.errors import InvalidRequest
from marathon.orchestrator.http import ApiContext, administrator, body_as, json_response
from marathon.orchestrator.schemas import KeyList, Ok, Revoked, Unlock, UserList, key_view, user_view


def blueprint(ctx: ApiContext) -> Blueprint:
    bp = Blueprint("admin", __name__)
    accounts = ctx.accounts

    @bp.get("/v1/admin/users")
    async def users():
        await administrator(ctx, "list users")
        return json_response(UserList(users=[user_view(u) for u in await ctx.tasks.store.list_users()]))

    @bp.get("/v1/admin/users/<user>")
    async def user(user: str):
        await administrator(ctx, "see other users")
        return json_response(user_view(await accounts.find_user(user)))

    @bp.get("/v1/admin/users/<user>/keys")
    async def user_keys(user: str):
        await administrator(ctx, "see other users' keys")
        found = await accounts.find_user(user)
        return json_response(KeyList(keys=[key_view(k) for k in await ctx.tasks.store.list_api_keys(found.id)]))

    @bp.post("/v1/admin/users/<user>/disable")
    async def disable(user: str):
        """The user's keys and sessions stop working at once; they cannot sign in."""
        p = await administrator(ctx, "disable a user")
        return json_response(user_view(await accounts.set_disabled(p, user, True)))

    @bp.post("/v1/admin/users/<user>/enable")
    async def enable(user: str):
        p = await administrator(ctx, "enable a user")
        return json_response(user_view(await accounts.set_disabled(p, user, False)))

    @bp.delete("/v1/admin/keys/<key_id>")
    async def revoke_key(key_id: str):
        p = await administrator(ctx, "revoke another user's key")
        await accounts.admin_revoke_key(p, key_id)
        return json_response(Revoked(id=key_id))

    @bp.post("/v1/admin/unlock")
    async def unlock():
        await administrator(ctx, "lift a sign-in lockout")
        body = await body_as(Unlock)
        if not (body.email or body.client):
            raise InvalidRequest("give email, client or both")
        await accounts.lift_lockout(email=body.email, client=body.client)
        return json_response(Ok())

    return bp
