// Nodes (administrators): capacity, the warm pool, draining, what runs where.  Refreshed live.
// Drain takes a node out of scheduling (what runs there runs to its end); Undrain puts it back.

import { api } from "./api.js";
import { ago, h } from "./dom.js";

const REFRESH_MS = 3000;

function status(n) {
  if (!n.connected) return h("span", { class: "badge s-failed" }, "disconnected");
  if (n.draining) return h("span", { class: "badge s-needs_input" }, "draining");
  return h("span", { class: "badge s-succeeded" }, "connected");
}

function action(n, act) {
  if (!n.connected) return h("span", { class: "muted" }, "—");
  if (n.drain === "node") return h("span", { class: "muted" }, "shutting down");
  const drained = n.drain === "administrator";
  const label = drained ? "Undrain" : "Drain";
  return h(
    "button",
    {
      type: "button",
      class: drained ? "" : "danger",
      title: drained ? "take new tasks again" : "take no new tasks; what runs there runs to its end",
      "aria-label": `${label} ${n.name}`,
      on: { click: (ev) => act(n, drained ? "undrain" : "drain", ev.currentTarget) },
    },
    label,
  );
}

function row(n, act) {
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
    h("td", {}, action(n, act)),
  );
}

export function nodesView(main, { signal }) {
  const tbody = h("tbody", {});
  const note = h("p", { class: "muted", role: "status", "aria-live": "polite" });
  const cols = ["Node", "Status", "Backend", "Active / slots", "Warm", "Pool hits / misses", "Claim p50", "Address", "Last seen", "Tasks", "Scheduling"];
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
  const error = h("div", { class: "error", role: "alert", hidden: true });
  main.querySelector(".panel").append(error);
  let wake = () => {};
  async function act(n, verb, button) {
    button.disabled = true;
    error.hidden = true;
    try {
      await api(`/v1/nodes/${encodeURIComponent(n.id)}/${verb}`, { method: "POST", signal });
    } catch (exc) {
      if (signal.aborted) return;
      error.textContent = `Could not ${verb} ${n.name}: ${exc.message}`;
      error.hidden = false;
      button.disabled = false;
    }
    wake(); // show the node as it is now, without waiting for the next refresh
  }
  (async () => {
    while (!signal.aborted) {
      try {
        const { nodes } = await api("/v1/nodes", { signal });
        tbody.replaceChildren(...nodes.map((n) => row(n, act)));
        const up = nodes.filter((n) => n.connected);
        note.textContent = nodes.length
          ? `${up.length} of ${nodes.length} connected · ${up.reduce((a, n) => a + n.slots, 0)} slots, ${up.reduce((a, n) => a + n.active, 0)} busy`
          : "No node has connected yet.";
      } catch (exc) {
        if (signal.aborted) return;
        note.textContent = `Could not load the nodes: ${exc.message}`;
      }
      await new Promise((r) => {
        const timer = setTimeout(r, REFRESH_MS);
        wake = () => {
          clearTimeout(timer);
          r();
        };
      });
    }
  })();
}
