"""/v1/nodes: the fleet as the orchestrator sees it; administrators drain and undrain nodes,
make join tokens and revoke nodes."""

from __future__ import annotations

from quart import Blueprint

from marathon.errors import NotFound
from marathon.orchestrator.http import ApiContext, administrator, body_as, json_response, principal
from marathon.orchestrator.identity import JoinTokenRequest


def blueprint(ctx: ApiContext) -> Blueprint:
    bp = Blueprint("nodes", __name__)

    @bp.get("/v1/nodes")
    async def nodes():
        """Administrators see everything; other users capacity, and of the tasks only their own
        (never another user's task ids, nor the nodes' addresses)."""
        p = await principal(ctx)
        out = []
        for s in list(ctx.nodes.sessions.values()):
            view = s.public()
            if not p.admin:
                view.pop("peer", None)
                mine = []
                for task_id in view["tasks"]:
                    rec = await ctx.tasks.store.get_task(task_id)
                    if rec is not None and rec.owner == p.user:
                        mine.append(task_id)
                view["tasks"] = mine
            out.append(view)
        return json_response({"nodes": out})

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

    @bp.post("/v1/nodes/join-tokens")
    async def join_token():
        """A one-time token a new node enrols with (MARATHON_JOIN_TOKEN); shown once, kept hashed."""
        p = await administrator(ctx, "make a join token")
        req = await body_as(JoinTokenRequest)
        assert ctx.identities is not None
        token, rec = await ctx.identities.create_join_token(ttl=req.ttl, max_slots=req.max_slots, created_by=p.user)
        return json_response(
            {"token": token, "id": rec.id, "expires_at": rec.expires_at, "max_slots": rec.max_slots}, 201
        )

    @bp.post("/v1/nodes/<node>/revoke")
    async def revoke(node: str):
        """The node's credential stops working at once; its connection is cut and its tasks
        are given back as a lost node's."""
        await administrator(ctx, "revoke a node")
        session = ctx.nodes.find(node)
        node_id = session.node_id if session is not None else node
        assert ctx.revoke_node is not None
        had_credential = await ctx.revoke_node(node_id)
        if session is None and not had_credential:
            raise NotFound(f"no node {node!r}")
        return json_response({"id": node_id, "revoked": had_credential, "disconnected": session is not None})

    return bp
