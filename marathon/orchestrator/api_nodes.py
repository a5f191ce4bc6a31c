"""/v1/nodes: the fleet as the orchestrator sees it; administrators drain and undrain nodes."""

from __future__ import annotations

from quart import Blueprint

from marathon.errors import NotFound
from marathon.orchestrator.http import ApiContext, administrator, json_response, principal


def blueprint(ctx: ApiContext) -> Blueprint:
    bp = Blueprint("nodes", __name__)

    @bp.get("/v1/nodes")
    async def nodes():
        await principal(ctx)
        return json_response({"nodes": [s.public() for s in ctx.nodes.sessions.values()]})

    async def set_drain(node: str, draining: bool):
        await administrator(ctx, "drain or undrain a node")
        session = ctx.nodes.find(node)
        if session is None:
            raise NotFound(f"no node {node!r}")
        assert ctx.set_drain is not None
        await ctx.set_drain(session.node_id, draining)
        return json_response(session.public())

    @bp.get("/v1/cluster")
    async def cluster():
        """The orchestrator replicas (which one leads) and the nodes with the replica holding each."""
        await administrator(ctx, "see the cluster")
        assert ctx.cluster is not None
        return json_response(await ctx.cluster.describe())

    @bp.post("/v1/nodes/<node>/drain")
    async def drain(node: str):
        """The node takes no new tasks; what runs there runs to its end."""
        return await set_drain(node, True)

    @bp.post("/v1/nodes/<node>/undrain")
    async def undrain(node: str):
        return await set_drain(node, False)

    return bp
