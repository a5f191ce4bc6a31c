"""cluster: the orchestrator replicas (which one leads) and the replica holding each node."""

from __future__ import annotations

import time

from marathon.cli.app import Url, api_client, app


@app.command(name="cluster")
def cluster(*, url: Url = None) -> int:
    """Show the orchestrator replicas, the leader, and which replica each node is connected to
    (administrators)."""
    data = api_client(url).get("/v1/cluster")
    now = time.time()
    print(f"{len(data['replicas'])} replica(s), leader epoch {data.get('epoch') or '-'}")
    for r in data["replicas"]:
        flags = ", ".join(f for f, on in (("leader", r["leader"]), ("this one", r["self"])) if on)
        up = now - r["started_at"]
        print(f"  {r['id']:<28} {r['url']:<28} gateway {r['gateway']:<24} v{r['version']}  up {up:,.0f}s"
              f"{'  (' + flags + ')' if flags else ''}")  # fmt: skip
    print(f"{len(data['nodes'])} node(s)")
    for n in data["nodes"]:
        print(f"  {n['id']:<16} {n['name']:<20} via {n['replica']}")
    return 0
