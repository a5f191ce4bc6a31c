"""Client HTTP API (/v1/…), served by hypercorn inside the orchestrator's nursery: one quart-trio
app, its routes in blueprints (tasks, nodes, accounts)."""

from __future__ import annotations

from quart import Blueprint
from quart_trio import QuartTrio

from marathon import __version__
from marathon.orchestrator import api_accounts, api_nodes, api_tasks
from marathon.orchestrator.http import MAX_BODY, ApiContext, json_response, register_error_handlers
from marathon.orchestrator.openapi import openapi_document


def _meta(ctx: ApiContext) -> Blueprint:
    bp = Blueprint("meta", __name__)

    @bp.get("/healthz")
    async def healthz():
        return json_response({"ok": True, "version": __version__, "nodes": len(ctx.nodes.connected())})

    @bp.get("/v1/openapi.json")
    async def openapi():
        return json_response(openapi_document())

    return bp


def create_app(ctx: ApiContext) -> QuartTrio:
    app = QuartTrio("marathon")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    register_error_handlers(app)
    for bp in (_meta(ctx), api_tasks.blueprint(ctx), api_nodes.blueprint(ctx), api_accounts.blueprint(ctx)):
        app.register_blueprint(bp)
    return app
