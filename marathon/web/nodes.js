// Nodes (administrators): capacity, the warm pool, draining, what runs where.  Refreshed live.

import { api } from "./api.js";
import { ago, h } from "./dom.js";

const REFRESH_MS = 3000;

function status(n) {
  if (!n.connected) return h("span", { class: "badge s-failed" }, "disconnected");
  if (n.draining) return h("span", { class: "badge s-needs_input" }, "draining");
  return h("span", { class: "badge s-succeeded" }, "connected");
}

function row(n) {
  const p = n.pool || {};
  return h(
    "tr",
    { dataset: { node: n.id } },
    h("td", {}, h("strong", {}, n.name), h("div", { class: "muted mono" }, n.id)),
    h("td", {}, status(n)),
    h("td", {}, n.backend),
    h("td", { class: "num" }, `${n.active} / ${n.slots}`),
    h("td", { class: "num" }, String(n.warm)),
    h("td", { class: "num" }, `${p.hits ?? 0} / ${p.misses ?? 0}`),
    h("td", { class: "num" }, p.claim_ms_p50 != null ? `${p.claim_ms_p50.toFixed(0)} ms` : "—"),
    h("td", {}, n.peer || "—", p.note ? h("div", { class: "muted" }, p.note) : null),
    h("td", {}, n.connected ? ago(n.last_seen) : `left ${ago(n.disconnected_at)}`),
    h(
      "td",
      {},
      n.tasks.length ? n.tasks.map((id, i) => [i ? ", " : "", h("a", { href: `#/tasks/${id}`, class: "mono" }, id)]) : h("span", { class: "muted" }, "—"),
    ),
  );
}

export function nodesView(main, { signal }) {
  const tbody = h("tbody", {});
  const note = h("p", { class: "muted", role: "status", "aria-live": "polite" });
  const cols = ["Node", "Status", "Backend", "Active / slots", "Warm", "Pool hits / misses", "Claim p50", "Address", "Last seen", "Tasks"];
  const numeric = new Set(["Active / slots", "Warm", "Pool hits / misses", "Claim p50"]);
  main.replaceChildren(
    h(
      "section",
      {},
      h("h1", {}, "Nodes"),
      h(
        "div",
        { class: "panel" },
        h("table", { "aria-label": "Nodes" }, h("thead", {}, h("tr", {}, cols.map((c) => h("th", { scope: "col", class: numeric.has(c) ? "num" : "" }, c)))), tbody),
        note,
      ),
    ),
  );
  (async () => {
    while (!signal.aborted) {
      try {
        const { nodes } = await api("/v1/nodes", { signal });
        tbody.replaceChildren(...nodes.map(row));
        const up = nodes.filter((n) => n.connected);
        note.textContent = nodes.length
          ? `${up.length} of ${nodes.length} connected · ${up.reduce((a, n) => a + n.slots, 0)} slots, ${up.reduce((a, n) => a + n.active, 0)} busy`
          : "No node has connected yet.";
      } catch (exc) {
        if (signal.aborted) return;
        note.textContent = `Could not load the nodes: ${exc.message}`;
      }
      await new Promise((r) => setTimeout(r, REFRESH_MS));
    }
  })();
}
