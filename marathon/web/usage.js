// Usage: cost and tokens per day and per model, from the metering ledger (/v1/usage).

import { api } from "./api.js";
import { barChart, hbarChart } from "./charts.js";
import { compact, h, money, num, seconds } from "./dom.js";

const SPANS = { "24h": 1, "7d": 7, "30d": 30, "90d": 90 };
const TOKEN_SERIES = [
  ["input", "input_tokens"],
  ["output", "output_tokens"],
  ["cache write", "cache_creation_input_tokens"],
  ["cache read", "cache_read_input_tokens"],
];

function days(n) {
  const out = [];
  const now = Date.now();
  for (let i = n - 1; i >= 0; i--) out.push(new Date(now - i * 86400e3).toISOString().slice(0, 10));
  return out;
}

export function usageView(main, { params, signal, navigate, me }) {
  const since = SPANS[params.get("since")] ? params.get("since") : "30d";
  const everyone = me?.admin && params.get("user") === "*";
  const span = h(
    "select",
    { id: "usage-since", on: { change: () => navigate("usage", { since: span.value, ...(everyone ? { user: "*" } : {}) }) } },
    Object.keys(SPANS).map((k) => h("option", { value: k }, `last ${k}`)),
  );
  span.value = since;
  const all = h("input", { type: "checkbox", id: "usage-all", checked: everyone });
  all.addEventListener("change", () => navigate("usage", { since, ...(all.checked ? { user: "*" } : {}) }));
  const body = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  main.replaceChildren(
    h(
      "section",
      {},
      h(
        "div",
        { class: "spread" },
        h("h1", {}, "Usage"),
        h(
          "div",
          { class: "row" },
          h("label", { for: "usage-since" }, "Period"),
          h("div", {}, span),
          me?.admin ? h("span", { class: "check" }, all, h("label", { for: "usage-all" }, "All users")) : null,
        ),
      ),
      body,
    ),
  );

  (async () => {
    const q = (by) => `/v1/usage?by=${by}&since=${since}${everyone ? "&user=*" : ""}`;
    try {
      const [perDay, perModel] = await Promise.all([api(q("day"), { signal }), api(q("model"), { signal })]);
      const t = perDay.total;
      const labels = days(SPANS[since] === 1 ? 2 : SPANS[since]);
      const byDay = new Map(perDay.rows.map((r) => [r.key, r]));
      for (const r of perDay.rows) if (!labels.includes(r.key)) labels.push(r.key);
      labels.sort();
      const at = (key, field) => byDay.get(key)?.[field] || 0;
      const models = [...perModel.rows].sort((a, b) => b.cost_usd - a.cost_usd);
      const cards = [
        ["Cost", money(t.cost_usd)],
        ["Tokens", num(t.input_tokens + t.output_tokens + t.cache_creation_input_tokens + t.cache_read_input_tokens)],
        ["API requests", num(t.requests)],
        ["Tasks", num(t.tasks)],
        ["Tool calls", num(t.tool_calls)],
        ["Sandbox time", seconds(t.compute_s)],
      ];
      body.replaceChildren(
        h("div", { class: "cards" }, cards.map(([k, v]) => h("div", { class: "card" }, h("div", { class: "v" }, v), h("div", { class: "k" }, k)))),
        h("h2", {}, "Per day (UTC)"),
        h(
          "div",
          { class: "charts" },
          barChart({ title: "Cost per day", labels, series: [{ name: "cost", values: labels.map((d) => at(d, "cost_usd")) }], format: (v) => money(v, 4), axisFormat: (v, max) => money(v, max < 0.1 ? 3 : max < 10 ? 2 : 0), tick: (d) => d.slice(5) }),
          barChart({
            title: "Tokens per day",
            labels,
            series: TOKEN_SERIES.map(([name, field]) => ({ name, values: labels.map((d) => at(d, field)) })),
            format: num,
            axisFormat: compact,
            tick: (d) => d.slice(5),
          }),
        ),
        h("h2", {}, "Per model"),
        h(
          "div",
          { class: "charts" },
          hbarChart({ title: "Cost per model", labels: models.map((r) => r.key || "(no model)"), series: [{ name: "cost", values: models.map((r) => r.cost_usd) }], format: (v) => money(v, 4) }),
          hbarChart({
            title: "Tokens per model",
            labels: models.map((r) => r.key || "(no model)"),
            series: TOKEN_SERIES.map(([name, field]) => ({ name, values: models.map((r) => r[field]) })),
            format: compact,
          }),
        ),
      );
    } catch (exc) {
      if (!signal.aborted) body.replaceChildren(h("p", { class: "error", role: "alert" }, exc.message));
    }
  })();
}
