"""Client HTTP API (/v1/…), served by hypercorn inside the orchestrator's nursery: one quart-trio
app, its routes in blueprints (tasks, nodes, accounts)."""

from __future__ import annotations

import logging

import trio
from quart import Blueprint, Response
from quart_trio import QuartTrio

from marathon import __version__
from marathon.errors import NotFound
from marathon.metrics import CONTENT_TYPE
from marathon.orchestrator import api_accounts, api_admin, api_nodes, api_tasks
from marathon.orchestrator.http import MAX_BODY, ApiContext, json_response, register_error_handlers
from marathon.orchestrator.openapi import openapi_document
from marathon.orchestrator.web import web_blueprint

log = logging.getLogger("marathon.api")


def _meta(ctx: ApiContext) -> Blueprint:
    bp = Blueprint("meta", __name__)

    @bp.get("/healthz")
    async def healthz():
        return json_response({"ok": True, "version": __version__, "nodes": len(ctx.nodes.connected())})

    @bp.get("/readyz")
    async def readyz():
        """Ready to serve: the store answers and the node gateway listens (200), or 503 with
        what is not ready.  The details of a failure go to the log, not to the caller."""

        async def store_reachable() -> None:
            await ctx.tasks.store.get_task("readyz")

        results = {}
        for name, check in {"store": store_reachable, **ctx.ready_checks}.items():
            try:
                with trio.fail_after(ctx.ready_timeout):
                    await check()
                results[name] = "ok"
            except trio.TooSlowError:
                log.warning("readyz: %s did not answer within %.0fs", name, ctx.ready_timeout)
                results[name] = "timeout"
            except Exception as exc:
                log.warning("readyz: %s is not ready: %s", name, exc)
                results[name] = "failed"
        ready = all(v == "ok" for v in results.values())
        return json_response({"ready": ready, "checks": results}, 200 if ready else 503)

    @bp.get("/metrics")
    async def metrics():
        """Prometheus text format, without credentials (as Prometheus scrapes); no label
        carries a task id, a user or anything else a caller could learn a secret from."""
        if ctx.metrics is None:
            raise NotFound("no metrics here")
        with trio.fail_after(ctx.ready_timeout):
            body = await ctx.metrics.scrape()
        return Response(body, status=200, content_type=CONTENT_TYPE)

    @bp.get("/v1/openapi.json")
    async def openapi():
        return json_response(openapi_document())

    return bp


def create_app(ctx: ApiContext) -> QuartTrio:
    app = QuartTrio("marathon")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    register_error_handlers(app)
    for bp in (_meta(ctx), api_tasks.blueprint(ctx), api_nodes.blueprint(ctx), api_accounts.blueprint(ctx),
               api_admin.blueprint(ctx), web_blueprint()):  # fmt: skip
        app.register_blueprint(bp)
    return app
