// DOM building and formatting.  Text always goes in as text (never as HTML).

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

const SVG_NS = "http://www.w3.org/2000/svg";

export function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v !== undefined && v !== null && v !== false) el.setAttribute(k, String(v));
  }
  append(el, children);
  return el;
}

function setAttrs(el, attrs) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "on") {
      for (const [ev, fn] of Object.entries(v)) el.addEventListener(ev, fn);
    } else if (k === "class") {
      el.className = Array.isArray(v) ? v.filter(Boolean).join(" ") : v;
    } else if (k === "dataset") {
      Object.assign(el.dataset, v);
    } else if (k === "text") {
      el.textContent = v;
    } else if (k in el && typeof v !== "string") {
      el[k] = v;
    } else {
      el.setAttribute(k, v === true ? "" : String(v));
    }
  }
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

export function clear(el) {
  el.replaceChildren();
  return el;
}

// ---------------------------------------------------------------- formatting

export const TERMINAL = new Set(["succeeded", "failed", "cancelled", "timed_out"]);
export const STATES = ["queued", "scheduled", "starting", "running", "needs_input", "succeeded", "failed", "cancelled", "timed_out"];
export const ACTIVE = ["queued", "scheduled", "starting", "running", "needs_input"];

export function stateBadge(state, reason) {
  return h("span", { class: `badge s-${state}`, title: reason ? `${state} (${reason})` : state }, state.replace("_", " "));
}

export function totalTokens(u) {
  if (!u) return 0;
  return (u.input_tokens || 0) + (u.output_tokens || 0) + (u.cache_creation_input_tokens || 0) + (u.cache_read_input_tokens || 0);
}

const nf = new Intl.NumberFormat("en-US");
export const num = (n) => nf.format(Math.round(n || 0));

export function compact(n) {
  n = n || 0;
  if (n >= 1e9) return (n / 1e9).toFixed(1) + "G";
  if (n >= 1e6) return (n / 1e6).toFixed(1) + "M";
  if (n >= 1e4) return (n / 1e3).toFixed(0) + "k";
  if (n >= 1e3) return (n / 1e3).toFixed(1) + "k";
  return String(Math.round(n));
}

export function money(usd, digits) {
  if (usd === null || usd === undefined) return "—";
  const d = digits ?? (usd !== 0 && Math.abs(usd) < 0.01 ? 4 : 2);
  return "$" + usd.toFixed(d);
}

export function seconds(s) {
  if (s === null || s === undefined || Number.isNaN(s)) return "—";
  if (s < 60) return `${s.toFixed(1)}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${Math.floor(s % 60)}s`;
  return `${Math.floor(m / 60)}h ${m % 60}m`;
}

export function taskDuration(t) {
  if (!t.started_at) return null;
  return (t.finished_at || Date.now() / 1000) - t.started_at;
}

export function ago(ts) {
  if (!ts) return "—";
  const d = Math.max(0, Date.now() / 1000 - ts);
  if (d < 60) return `${Math.floor(d)}s ago`;
  if (d < 3600) return `${Math.floor(d / 60)}m ago`;
  if (d < 86400) return `${Math.floor(d / 3600)}h ago`;
  return `${Math.floor(d / 86400)}d ago`;
}

export function when(ts) {
  if (!ts) return "—";
  return new Date(ts * 1000).toLocaleString();
}

export function truncate(text, n) {
  text = text || "";
  return text.length > n ? text.slice(0, n - 1) + "…" : text;
}
