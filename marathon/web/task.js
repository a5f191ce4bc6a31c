// One task: what it is, what it costs, its live event stream, its diff; cancel and reply.

import { api, ApiError, followEvents } from "./api.js";
import { renderDiff } from "./diff.js";
import { TERMINAL, h, money, num, seconds, stateBadge, taskDuration, totalTokens, when } from "./dom.js";

// ------------------------------------------------------------------ the event log

/** Renders events: tool calls collapsed with their results, iterations separated, state
 * changes marked.  Events are queued and drawn once per frame, in chunks of CHUNK lines that
 * the browser lays out only when on screen (content-visibility), so a task of ten thousand
 * lines costs a few frames, not ten thousand layouts. */
const CHUNK = 200;

export class EventLog {
  constructor() {
    this.el = h("div", { class: "events", role: "log", "aria-label": "Events", dataset: { lastSeq: "0", count: "0" } });
    this.chunk = null;
    this.tools = new Map(); // tool_id -> the call's element
    this.queue = [];
    this.scheduled = false;
    this.count = 0;
    this.onFlush = () => {};
  }

  push(events) {
    this.queue.push(...events);
    if (!this.scheduled) {
      this.scheduled = true;
      requestAnimationFrame(() => this.flush());
    }
  }

  flush() {
    this.scheduled = false;
    const events = this.queue;
    this.queue = [];
    if (!events.length) return;
    const follow = window.innerHeight + window.scrollY >= document.documentElement.scrollHeight - 80;
    let frag = document.createDocumentFragment();
    const place = () => {
      if (frag.childNodes.length) this.chunk.append(frag);
      frag = document.createDocumentFragment();
    };
    for (const ev of events) {
      const item = this.render(ev);
      if (!item) continue;
      if (!this.chunk || this.chunk.childElementCount + frag.childNodes.length >= CHUNK) {
        if (this.chunk) place();
        this.chunk = h("div", { class: "chunk" });
        this.el.append(this.chunk);
      }
      frag.append(item);
    }
    place();
    this.count += events.length;
    const last = events[events.length - 1].id;
    this.el.dataset.lastSeq = String(last);
    this.el.dataset.count = String(this.count);
    // scroll along in the next frame (reading layout here would force it for every batch)
    if (follow) requestAnimationFrame(() => window.scrollTo(0, document.documentElement.scrollHeight));
    this.onFlush(last, this.count);
  }

  render(ev) {
    const d = ev.data || {};
    const seq = { seq: String(ev.id) };
    switch (ev.kind) {
      case "iteration":
        return h("div", { class: "ev-iteration", dataset: seq }, h("h3", {}, `Iteration ${d.iteration}`), d.why ? h("div", { class: "muted" }, d.why) : null);
      case "text":
        return h("div", { class: "ev-text", dataset: seq }, d.text || "");
      case "tool_call": {
        const result = h("div", { class: "result pending" }, "running…");
        const li = h(
          "div",
          { class: "ev-tool", dataset: { ...seq, tool: d.tool_id || "" } },
          h("details", {}, h("summary", {}, `→ ${d.summary || d.name}`), result),
        );
        li.result = result;
        if (d.tool_id) this.tools.set(d.tool_id, li);
        return li;
      }
      case "tool_result": {
        const call = this.tools.get(d.tool_id);
        const text = h("div", { class: d.is_error ? "result bad" : "result", dataset: seq }, d.summary || "(no output)");
        if (call) {
          call.result.replaceWith(text);
          call.result = text;
          if (d.is_error) call.classList.add("failed");
          this.tools.delete(d.tool_id);
          return null;
        }
        return h("div", { class: "ev-tool" }, text); // a result whose call came before a resume point
      }
      case "state": {
        const extra = (d.reason ? ` (${d.reason})` : "") + (d.message ? `: ${d.message}` : "");
        return h("div", { class: `ev-state s-${d.state}`, dataset: seq }, `● ${d.state}${extra}`);
      }
      case "log":
        return h("div", { class: "ev-log", dataset: seq }, `· ${d.message || ""}`);
      case "api_request": {
        const bad = d.status >= 400 || d.error;
        const u = d.usage || {};
        const line = bad
          ? `· API ${d.status}: ${d.error || "error"}`
          : `· API ${d.model || ""} · in ${num(u.input_tokens)} · out ${num(u.output_tokens)}` +
            (u.cache_read_input_tokens || u.cache_creation_input_tokens ? ` · cache ${num(u.cache_creation_input_tokens)}/${num(u.cache_read_input_tokens)}` : "") +
            (d.cost_usd != null ? ` · ${money(d.cost_usd)}` : "") +
            (d.duration_s ? ` · ${seconds(d.duration_s)}` : "");
        return h("div", { class: bad ? "ev-api bad" : "ev-api", dataset: seq }, line);
      }
      default:
        return h("div", { class: "ev-log", dataset: seq }, `· ${ev.kind}`);
    }
  }
}

// ------------------------------------------------------------------ the page

export const afterPaint = (fn) => requestAnimationFrame(() => setTimeout(fn, 0));

function facts(t) {
  const req = t.request || {};
  const u = t.usage || {};
  const rows = [
    ["Repository", req.repo || "—"],
    ["Branch", req.branch || (req.repo ? "default" : "—")],
    ["Work branch", t.branch],
    ["Node", t.node_id],
    ["Attempt", t.attempt || null],
    ["Created", when(t.created_at)],
    ["Started", t.started_at ? when(t.started_at) : null],
    ["Finished", t.finished_at ? when(t.finished_at) : null],
    ["Duration", seconds(taskDuration(t))],
    ["Turns", t.num_turns || null],
    ["Iterations", t.iterations ? `${t.iterations} of at most ${req.max_iterations}` : null],
    ["Commits", t.commits || null],
    ["Changes", t.diff_stat ? h("pre", { class: "mono" }, t.diff_stat) : null],
    ["Pull request", t.pr_url ? h("a", { href: t.pr_url, rel: "noopener noreferrer", target: "_blank", id: "pr-link" }, t.pr_url) : t.pr_error],
    ["Message", t.message],
  ];
  const usage = [
    ["Cost", money(t.cost_usd)],
    ["Tokens", num(totalTokens(u))],
    ["Input", num(u.input_tokens)],
    ["Output", num(u.output_tokens)],
    ["Cache write", num(u.cache_creation_input_tokens)],
    ["Cache read", num(u.cache_read_input_tokens)],
  ];
  const budget = [req.max_tokens ? `${num(req.max_tokens)} tokens` : null, req.max_cost ? money(req.max_cost) : null].filter(Boolean).join(", ");
  return [
    h("dl", { class: "facts" }, rows.filter(([, v]) => v !== null && v !== undefined && v !== "").map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])),
    h(
      "div",
      { class: "cards", "aria-label": "Usage" },
      usage.map(([k, v]) => h("div", { class: "card" }, h("div", { class: "v", dataset: { usage: k.toLowerCase().replace(" ", "-") } }, v), h("div", { class: "k" }, k))),
      budget ? h("div", { class: "card" }, h("div", { class: "v" }, budget), h("div", { class: "k" }, "Budget")) : null,
    ),
  ];
}

export function taskView(main, { id, signal }) {
  const title = h("h1", {}, "Task ", h("span", { class: "mono" }, id));
  const badge = h("span", {});
  const error = h("div", { class: "error", role: "alert", hidden: true });
  const cancelBtn = h("button", { type: "button", class: "danger", hidden: true }, "Cancel task");
  const info = h("div", { class: "panel task-info" });
  const prompt = h("pre", { class: "prompt" });
  const replyBox = h("section", { class: "panel", hidden: true });
  const streamStatus = h("span", { class: "stream-status muted", role: "status", "aria-live": "polite" }, "connecting…");
  const log = new EventLog();
  const diffPanel = h("div", { class: "tabpanel", id: "panel-diff", role: "tabpanel", hidden: true, "aria-labelledby": "tab-diff" });
  const eventsPanel = h("div", { class: "tabpanel", id: "panel-events", role: "tabpanel", "aria-labelledby": "tab-events" }, log.el);
  const tabEvents = h("button", { type: "button", role: "tab", id: "tab-events", "aria-selected": "true", "aria-controls": "panel-events" }, "Events");
  const tabDiff = h("button", { type: "button", role: "tab", id: "tab-diff", "aria-selected": "false", "aria-controls": "panel-diff" }, "Diff");
  const showError = (msg) => {
    error.textContent = msg;
    error.hidden = !msg;
  };

  let task = null;
  let diffLoaded = false;
  async function loadDiff() {
    diffPanel.replaceChildren(h("p", { class: "muted" }, "Loading the diff…"));
    try {
      const text = await api(`/v1/tasks/${id}/diff`, { text: true, signal });
      diffPanel.replaceChildren(renderDiff(text));
      diffLoaded = task && TERMINAL.has(task.state);
    } catch (exc) {
      if (!signal.aborted) diffPanel.replaceChildren(h("p", { class: "error" }, exc.message));
    }
  }
  function select(which) {
    const diff = which === "diff";
    tabEvents.setAttribute("aria-selected", String(!diff));
    tabDiff.setAttribute("aria-selected", String(diff));
    eventsPanel.hidden = diff;
    diffPanel.hidden = !diff;
    if (diff && !diffLoaded) loadDiff();
  }
  tabEvents.addEventListener("click", () => select("events"));
  tabDiff.addEventListener("click", () => select("diff"));

  function show(t) {
    task = t;
    badge.replaceChildren(stateBadge(t.state, t.reason));
    cancelBtn.hidden = TERMINAL.has(t.state);
    info.replaceChildren(...facts(t));
    prompt.textContent = t.request?.prompt || "";
    if (t.state === "needs_input") {
      const answer = h("textarea", { id: "reply-text", required: true });
      const send = h("button", { type: "submit", class: "primary" }, "Reply");
      replyBox.replaceChildren(
        h("h2", {}, "The task asks"),
        h("p", { class: "ev-text" }, t.question || t.message || ""),
        h(
          "form",
          {
            on: {
              submit: async (ev) => {
                ev.preventDefault();
                send.disabled = true;
                try {
                  show(await api(`/v1/tasks/${id}/reply`, { method: "POST", body: { answer: answer.value }, signal }));
                  start(); // queued again: follow the new run
                } catch (exc) {
                  showError(exc.message);
                } finally {
                  send.disabled = false;
                }
              },
            },
          },
          h("div", { class: "field" }, h("label", { for: "reply-text" }, "Your answer"), answer),
          send,
        ),
      );
      replyBox.hidden = false;
    } else {
      replyBox.hidden = true;
    }
  }

  cancelBtn.addEventListener("click", async () => {
    cancelBtn.disabled = true;
    try {
      show(await api(`/v1/tasks/${id}/cancel`, { method: "POST", signal }));
      showError("");
    } catch (exc) {
      showError(exc.message);
    } finally {
      cancelBtn.disabled = false;
    }
  });

  // the record is fetched again after state changes and (at most once a second) after usage
  let refetching = null;
  let pending = false;
  function refetch() {
    if (refetching) {
      pending = true;
      return refetching;
    }
    refetching = (async () => {
      try {
        show(await api(`/v1/tasks/${id}`, { signal }));
      } catch (exc) {
        if (!signal.aborted) showError(exc.message);
      }
      await new Promise((r) => setTimeout(r, 1000));
      refetching = null;
      if (pending && !signal.aborted) {
        pending = false;
        refetch();
      }
    })();
    return refetching;
  }

  let lastSeq = 0;
  let following = false;
  async function start() {
    if (following) return;
    following = true;
    try {
      lastSeq = await followEvents(id, {
        after: lastSeq,
        signal,
        onBatch(events) {
          log.push(events);
          if (events.some((e) => e.kind === "state" || e.kind === "api_request")) refetch();
        },
        onStatus(st, detail) {
          streamStatus.className = `stream-status muted ${st}`;
          streamStatus.textContent =
            st === "live" ? "live" : st === "reconnecting" ? `reconnecting (attempt ${detail})…` : st === "ended" ? "the task has ended" : `stream error: ${detail}`;
        },
        async isDone() {
          const t = await api(`/v1/tasks/${id}`, { signal });
          show(t);
          return TERMINAL.has(t.state) || t.state === "needs_input";
        },
      });
      if (!signal.aborted && !diffPanel.hidden) loadDiff();
    } catch (exc) {
      if (!signal.aborted) showError(exc.message);
    } finally {
      following = false;
    }
  }

  main.replaceChildren(
    h(
      "section",
      {},
      h("p", {}, h("a", { href: "#/tasks" }, "← Tasks")),
      h("div", { class: "spread" }, h("div", { class: "row" }, title, badge), cancelBtn),
      error,
      replyBox,
      h("h2", {}, "Prompt"),
      prompt,
      h("h2", {}, "Details and usage"),
      info,
      h("div", { class: "spread tabs", role: "tablist", "aria-label": "Task output" }, h("div", { class: "row" }, tabEvents, tabDiff), streamStatus),
      eventsPanel,
      diffPanel,
    ),
  );

  (async () => {
    try {
      show(await api(`/v1/tasks/${id}`, { signal }));
    } catch (exc) {
      if (signal.aborted) return;
      showError(exc instanceof ApiError && exc.status === 404 ? `There is no task ${id} (or it is not yours).` : exc.message);
      streamStatus.textContent = "";
      return;
    }
    log.onFlush = (last) => {
      // the mark once the last line is painted: the frame after this one has begun
      if (task && TERMINAL.has(task.state) && last >= task.last_seq) afterPaint(() => performance.mark("marathon:events-complete"));
    };
    start();
  })();
}
