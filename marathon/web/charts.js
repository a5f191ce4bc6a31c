// Charts drawn by hand in SVG: stacked vertical bars (per day) and stacked horizontal bars
// (per model).  Each comes with a legend and its numbers as a table, for screen readers.

import { h, s } from "./dom.js";

function niceMax(v) {
  if (v <= 0) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function legend(series) {
  if (series.length < 2) return null;
  return h("div", { class: "legend" }, series.map((se, i) => h("span", {}, h("i", { class: `c${i % 4}` }), se.name)));
}

function table(caption, labels, series, format) {
  return h(
    "details",
    { class: "table-view" },
    h("summary", {}, "Numbers"),
    h(
      "table",
      {},
      h("caption", { class: "muted" }, caption),
      h("thead", {}, h("tr", {}, h("th", {}, ""), series.map((se) => h("th", { class: "num" }, se.name)))),
      h(
        "tbody",
        {},
        labels.map((label, j) => h("tr", {}, h("th", { scope: "row" }, label), series.map((se) => h("td", { class: "num" }, format(se.values[j]))))),
      ),
    ),
  );
}

/** Stacked vertical bars: ``labels[j]`` on the x axis, ``series[i].values[j]`` stacked. */
export function barChart({ title, labels, series, format = String, axisFormat, tick = (l) => l }) {
  const W = 640;
  const H = 240;
  const m = { l: 56, r: 8, t: 10, b: 34 };
  const iw = W - m.l - m.r;
  const ih = H - m.t - m.b;
  const totals = labels.map((_, j) => series.reduce((a, se) => a + (se.values[j] || 0), 0));
  const max = niceMax(Math.max(0, ...totals));
  axisFormat = axisFormat || ((v) => format(v, max));
  const y = (v) => m.t + ih - (v / max) * ih;
  const step = iw / Math.max(labels.length, 1);
  const bw = Math.max(1, Math.min(36, step * 0.7));
  const svg = s("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title });
  svg.append(s("title", {}, title));
  for (let k = 0; k <= 4; k++) {
    const v = (max * k) / 4;
    svg.append(s("line", { class: "axis", x1: m.l, x2: W - m.r, y1: y(v), y2: y(v) }));
    svg.append(s("text", { x: m.l - 6, y: y(v) + 4, "text-anchor": "end" }, axisFormat(v, max)));
  }
  const every = Math.max(1, Math.ceil(labels.length / 8));
  labels.forEach((label, j) => {
    const x = m.l + j * step + (step - bw) / 2;
    let base = 0;
    series.forEach((se, i) => {
      const v = se.values[j] || 0;
      if (v > 0) {
        const rect = s("rect", { class: `bar c${i % 4}`, x, width: bw, y: y(base + v), height: Math.max(0.5, y(base) - y(base + v)) });
        rect.append(s("title", {}, `${label} · ${se.name}: ${format(v)}`));
        svg.append(rect);
      }
      base += v;
    });
    if (j % every === 0) svg.append(s("text", { x: x + bw / 2, y: H - m.b + 16, "text-anchor": "middle" }, tick(label)));
  });
  return h("figure", { class: "panel" }, h("h3", {}, title), legend(series), svg, table(title, labels, series, format));
}

/** Stacked horizontal bars, one row per label (a model). */
export function hbarChart({ title, labels, series, format = String }) {
  const W = 640;
  const row = 28;
  const m = { l: 200, r: 90, t: 6, b: 6 };
  const H = m.t + m.b + row * Math.max(labels.length, 1);
  const iw = W - m.l - m.r;
  const totals = labels.map((_, j) => series.reduce((a, se) => a + (se.values[j] || 0), 0));
  const max = Math.max(...totals, 0) || 1;
  const svg = s("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title });
  svg.append(s("title", {}, title));
  labels.forEach((label, j) => {
    const y0 = m.t + j * row;
    svg.append(s("text", { x: m.l - 8, y: y0 + row / 2 + 4, "text-anchor": "end" }, label.length > 30 ? label.slice(0, 29) + "…" : label));
    let base = 0;
    series.forEach((se, i) => {
      const v = se.values[j] || 0;
      if (v > 0) {
        const rect = s("rect", { class: `bar c${i % 4}`, x: m.l + (base / max) * iw, y: y0 + 5, height: row - 10, width: Math.max(0.5, (v / max) * iw) });
        rect.append(s("title", {}, `${label} · ${se.name}: ${format(v)}`));
        svg.append(rect);
      }
      base += v;
    });
    svg.append(s("text", { x: m.l + (base / max) * iw + 6, y: y0 + row / 2 + 4 }, format(totals[j])));
  });
  if (!labels.length) svg.append(s("text", { x: W / 2, y: H / 2 + 4, "text-anchor": "middle" }, "no data"));
  return h("figure", { class: "panel" }, h("h3", {}, title), legend(series), svg, table(title, labels, series, format));
}
