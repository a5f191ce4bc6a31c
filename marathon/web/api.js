// The /v1 API, as the CLI uses it: a bearer token in every request, and the task event
// stream read with fetch() (EventSource cannot send an Authorization header), resumed with
// Last-Event-ID after a dropped connection so that nothing is missed or shown twice.

const TOKEN_KEY = "marathon.token";

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export const auth = {
  get token() {
    return localStorage.getItem(TOKEN_KEY) || "";
  },
  set token(value) {
    if (value) localStorage.setItem(TOKEN_KEY, value);
    else localStorage.removeItem(TOKEN_KEY);
  },
  onExpired: () => {},
};

function headers(extra = {}) {
  const hd = { ...extra };
  if (auth.token) hd.Authorization = `Bearer ${auth.token}`;
  return hd;
}

async function failure(resp) {
  let code = "http_error";
  let message = resp.statusText || `HTTP ${resp.status}`;
  try {
    const body = await resp.json();
    code = body.error?.code || code;
    message = body.error?.message || message;
  } catch {
    /* not JSON */
  }
  if (resp.status === 401) auth.onExpired();
  return new ApiError(resp.status, code, message);
}

export async function api(path, { method = "GET", body, signal, text = false } = {}) {
  let resp;
  try {
    resp = await fetch(path, {
      method,
      signal,
      cache: "no-store",
      headers: headers(body !== undefined ? { "Content-Type": "application/json" } : {}),
      body: body !== undefined ? JSON.stringify(body) : undefined,
    });
  } catch (exc) {
    if (exc.name === "AbortError") throw exc;
    throw new ApiError(0, "unreachable", "cannot reach the orchestrator");
  }
  if (!resp.ok) throw await failure(resp);
  return text ? resp.text() : resp.json();
}

// ------------------------------------------------------------------ Server-Sent Events

/** An incremental SSE parser: feed it text as it arrives, get whole events back. */
export class SseParser {
  constructor() {
    this.buf = "";
    this.reset();
  }
  reset() {
    this.id = null;
    this.event = "message";
    this.data = [];
  }
  feed(chunk) {
    this.buf += chunk;
    const out = [];
    let start = 0;
    for (;;) {
      const nl = this.buf.indexOf("\n", start);
      if (nl < 0) break;
      let line = this.buf.slice(start, nl);
      start = nl + 1;
      if (line.endsWith("\r")) line = line.slice(0, -1);
      if (line === "") {
        if (this.data.length && this.id !== null) {
          out.push({ id: Number(this.id), kind: this.event, raw: this.data.join("\n") });
        }
        this.reset();
      } else if (!line.startsWith(":")) {
        const i = line.indexOf(":");
        const field = i < 0 ? line : line.slice(0, i);
        let value = i < 0 ? "" : line.slice(i + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "id") this.id = value;
        else if (field === "event") this.event = value;
        else if (field === "data") this.data.push(value);
      }
    }
    this.buf = this.buf.slice(start);
    return out;
  }
}

const sleep = (ms, signal) =>
  new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(t);
      resolve();
    });
  });

/**
 * Follow a task's events from after ``after`` until the stream ends (the task is terminal).
 * ``onBatch(events)`` gets each group of events as it arrives, in order, each exactly once;
 * ``onStatus("live" | "reconnecting" | "ended", detail)`` tells the connection's state.
 * A dropped connection is resumed after the last event seen (Last-Event-ID), with backoff.
 * ``isDone()`` (async) is asked when a stream ends cleanly: if the task is not terminal
 * after all (a proxy closed the connection), it resumes.
 */
export async function followEvents(taskId, { after = 0, onBatch, onStatus = () => {}, isDone, signal }) {
  let failures = 0;
  while (!signal?.aborted) {
    const parser = new SseParser();
    try {
      const hd = headers(after ? { "Last-Event-ID": String(after) } : {});
      const resp = await fetch(`/v1/tasks/${encodeURIComponent(taskId)}/events`, { headers: hd, signal, cache: "no-store" });
      if (!resp.ok) {
        const err = await failure(resp);
        if (resp.status < 500) throw err;
        throw Object.assign(new Error(err.message), { retry: true });
      }
      onStatus("live");
      const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        const fresh = [];
        for (const ev of parser.feed(value)) {
          if (ev.id <= after) continue; // already shown (a resend after a resume)
          after = ev.id;
          try {
            ev.data = JSON.parse(ev.raw);
          } catch {
            ev.data = { text: ev.raw };
          }
          fresh.push(ev);
        }
        if (fresh.length) {
          failures = 0;
          onBatch(fresh);
        }
      }
      if (!isDone || (await isDone())) {
        onStatus("ended");
        return after;
      }
    } catch (exc) {
      if (signal?.aborted || exc.name === "AbortError") return after;
      if (exc instanceof ApiError) {
        onStatus("error", exc.message);
        throw exc;
      }
    }
    failures += 1;
    onStatus("reconnecting", failures);
    await sleep(Math.min(200 * 2 ** Math.min(failures, 5), 5000), signal);
  }
  return after;
}
