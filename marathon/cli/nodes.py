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
