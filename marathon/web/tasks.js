// The task list: newest first, filtered by state, a page at a time (cursor pagination, so
// thousands of tasks cost one page), refreshed live while it is on screen.

import { api } from "./api.js";
import { ACTIVE, STATES, ago, h, money, num, seconds, stateBadge, taskDuration, totalTokens, truncate } from "./dom.js";

const PAGE = 50;
const REFRESH_MS = 2000;

function row(t) {
  const req = t.request || {};
  const tokens = totalTokens(t.usage);
  return h(
    "tr",
    { dataset: { id: t.id, state: t.state } },
    h("td", {}, h("a", { href: `#/tasks/${t.id}`, class: "mono" }, t.id)),
    h("td", {}, stateBadge(t.state, t.reason)),
    h("td", { class: "repo", title: req.repo || "" }, req.repo || h("span", { class: "muted" }, "—")),
    h("td", { class: "prompt", title: req.prompt }, truncate(req.prompt, 120)),
    h("td", { title: new Date(t.created_at * 1000).toLocaleString() }, ago(t.created_at)),
    h("td", { class: "num" }, seconds(taskDuration(t))),
    h("td", { class: "num" }, tokens ? num(tokens) : "—"),
    h("td", { class: "num" }, money(t.cost_usd)),
  );
}

export function tasksView(main, { params, signal, navigate }) {
  const state = params.get("state") || "";
  // the stack of page cursors (opaque strings), each URI-encoded so that "," separates them
  const cursors = (params.get("after") || "").split(",").filter(Boolean).map(decodeURIComponent);
  const stack = (list) => list.map(encodeURIComponent).join(",");
  const cursor = cursors[cursors.length - 1] || "";

  const filter = h(
    "select",
    {
      id: "state-filter",
      on: {
        change: () => navigate("tasks", filter.value ? { state: filter.value } : {}),
      },
    },
    h("option", { value: "" }, "All states"),
    h("option", { value: ACTIVE.join(",") }, "Active"),
    STATES.map((s) => h("option", { value: s }, s.replace("_", " "))),
  );
  filter.value = state;
  const tbody = h("tbody", {});
  const status = h("p", { class: "muted", role: "status", "aria-live": "polite" });
  const older = h("button", { type: "button", disabled: true }, "Older →");
  const newer = h("button", { type: "button", disabled: !cursors.length }, "← Newer");
  const pageNo = h("span", { class: "muted" }, `page ${cursors.length + 1}`);
  let nextCursor = null;
  older.addEventListener("click", () => navigate("tasks", { ...(state ? { state } : {}), after: stack([...cursors, nextCursor]) }));
  newer.addEventListener("click", () => {
    const prev = cursors.slice(0, -1);
    navigate("tasks", { ...(state ? { state } : {}), ...(prev.length ? { after: stack(prev) } : {}) });
  });

  main.replaceChildren(
    h(
      "section",
      {},
      h(
        "div",
        { class: "spread" },
        h("h1", {}, "Tasks"),
        h("div", { class: "row" }, h("label", { for: "state-filter" }, "State"), h("div", {}, filter), h("a", { class: "button primary", href: "#/submit" }, "New task")),
      ),
      h(
        "div",
        { class: "panel" },
        h(
          "table",
          { class: "tasks", "aria-label": "Tasks" },
          h(
            "thead",
            {},
            h(
              "tr",
              {},
              ["Task", "State", "Repository", "Prompt", "Created"].map((c) => h("th", { scope: "col" }, c)),
              ["Duration", "Tokens", "Cost"].map((c) => h("th", { scope: "col", class: "num" }, c)),
            ),
          ),
          tbody,
        ),
        status,
        h("div", { class: "row pager" }, newer, pageNo, older),
      ),
    ),
  );

  let first = true;
  const shown = new Map(); // id -> [json, row]: rows are replaced only when the task changed
  async function refresh() {
    const q = new URLSearchParams({ limit: String(PAGE) });
    if (state) q.set("state", state);
    if (cursor) q.set("cursor", cursor);
    const page = await api(`/v1/tasks?${q}`, { signal });
    nextCursor = page.next_cursor;
    older.disabled = !nextCursor;
    const rows = [];
    const seen = new Map();
    for (const t of page.tasks) {
      const key = JSON.stringify(t) + (t.terminal ? "" : Math.floor(Date.now() / 1000)); // running: the duration ticks
      const old = shown.get(t.id);
      const tr = old && old[0] === key ? old[1] : row(t);
      seen.set(t.id, [key, tr]);
      rows.push(tr);
    }
    shown.clear();
    for (const [k, v] of seen) shown.set(k, v);
    // keep the DOM as it is where nothing changed
    if (rows.length !== tbody.children.length || rows.some((r, i) => tbody.children[i] !== r)) tbody.replaceChildren(...rows);
    status.textContent = page.tasks.length
      ? `${page.tasks.length} task${page.tasks.length === 1 ? "" : "s"} on this page${nextCursor ? "; older ones on the next" : ""}`
      : state || cursor
        ? "No tasks match."
        : "No tasks yet: submit one.";
    if (first) {
      first = false;
      requestAnimationFrame(() => setTimeout(() => performance.mark("marathon:tasks-rendered"), 0)); // once painted
    }
  }

  (async () => {
    while (!signal.aborted) {
      try {
        if (!document.hidden || first) await refresh();
      } catch (exc) {
        if (signal.aborted) return;
        status.textContent = `Could not load the tasks: ${exc.message}`;
      }
      await new Promise((r) => setTimeout(r, REFRESH_MS));
    }
  })();
}
