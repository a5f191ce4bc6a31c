"""nodes, nodes drain, nodes undrain."""

from __future__ import annotations

from cyclopts import App

from marathon.cli.app import Url, api_client, app

nodes = App(name="nodes", help="List nodes and their capacity; drain or undrain one (administrators).")
app.command(nodes)


def node_line(n: dict) -> str:
    state = "up" if n["connected"] else "down"
    if n.get("draining"):
        state += ", draining"
    pool = n.get("pool") or {}
    extra = ""
    if pool.get("hits") or pool.get("misses") or pool.get("note"):
        claim = f", claim p50 {pool['claim_ms_p50']:.1f} ms" if pool.get("claim_ms_p50") is not None else ""
        extra = f"  pool {pool['hits']} hits / {pool['misses']} misses{claim}" + (
            f" ({pool['note']})" if pool.get("note") else ""
        )
    return (
        f"{n['id']}  {n['name']:<20} {state:<15} {n['active']}/{n['slots']} busy  warm {n['warm']}  "
        f"{n['backend']}{extra}"
    )


@nodes.default
def nodes_list(*, url: Url = None) -> int:
    """List nodes and their capacity."""
    data = api_client(url).get("/v1/nodes")
    for n in data["nodes"]:
        print(node_line(n))
    if not data["nodes"]:
        print("no nodes")
    return 0


@nodes.command(name="drain")
def nodes_drain(node: str, *, url: Url = None) -> int:
    """Take no new tasks on NODE (id or name); what runs there runs to its end.

    Parameters
    ----------
    node
        The node's id, or its name when no other node has it.
    """
    n = api_client(url).post(f"/v1/nodes/{node}/drain")
    print(f"node {n['name']} ({n['id']}) drains: {n['active']} task(s) still running there")
    return 0


@nodes.command(name="undrain")
def nodes_undrain(node: str, *, url: Url = None) -> int:
    """Let NODE (id or name) take tasks again.

    Parameters
    ----------
    node
        The node's id, or its name when no other node has it.
    """
    n = api_client(url).post(f"/v1/nodes/{node}/undrain")
    print(f"node {n['name']} ({n['id']}) takes tasks again")
    return 0


@nodes.command(name="join-token")
def nodes_join_token(*, ttl: str = "1h", max_slots: int | None = None, url: Url = None) -> int:
    """Make a one-time token a new node enrols with (administrators).

    Start the node with it (MARATHON_JOIN_TOKEN or join_token in its marathon.toml): at its
    first connection it gets its own credential, kept in its data dir; the token is spent.

    Parameters
    ----------
    ttl
        How long the token can be used: 90s, 15m, 1h, 7d.
    max_slots
        The most slots (and warm sandboxes) the orchestrator believes this node has, whatever
        it claims (default: the orchestrator's node_max_slots).
    """
    from marathon.cli.app import fail
    from marathon.units import parse_duration

    try:
        seconds = parse_duration(ttl)
    except ValueError as exc:
        return fail(str(exc), 2)
    body: dict = {"ttl": seconds}
    if max_slots is not None:
        body["max_slots"] = max_slots
    res = api_client(url).post("/v1/nodes/join-tokens", body)
    import time

    until = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(res["expires_at"]))
    print(res["token"])
    import sys

    print(f"one use, until {until}; the node gets at most {res['max_slots']} slot(s)", file=sys.stderr)
    return 0


@nodes.command(name="revoke")
def nodes_revoke(node: str, *, url: Url = None) -> int:
    """Revoke NODE's credential (administrators): it is disconnected at once and refused from
    then on; its tasks are queued again (or fail) as a lost node's.

    Parameters
    ----------
    node
        The node's id, or its name when no other node has it.
    """
    res = api_client(url).post(f"/v1/nodes/{node}/revoke")
    what = "credential revoked" if res["revoked"] else "no credential of its own (node secret): disconnected"
    print(f"node {res['id']}: {what}")
    return 0
