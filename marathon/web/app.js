// The Marathon dashboard: a hash router over a few views, all on the /v1 API.

import { api, auth } from "./api.js";
import { loginView } from "./login.js";
import { nodesView } from "./nodes.js";
import { submitView } from "./submit.js";
import { taskView } from "./task.js";
import { tasksView } from "./tasks.js";
import { usageView } from "./usage.js";

const main = document.getElementById("main");
const nav = document.getElementById("nav");
let me = null;
let current = null; // the AbortController of the view on screen

function parse() {
  const raw = location.hash.replace(/^#\/?/, "");
  const [path, query] = raw.split("?");
  return { parts: (path || "tasks").split("/").filter(Boolean), params: new URLSearchParams(query || "") };
}

export function navigate(path, params = {}) {
  const q = new URLSearchParams(params).toString();
  const hash = `#/${path}${q ? `?${q}` : ""}`;
  if (location.hash === hash) render();
  else location.hash = hash;
}

function showUser() {
  const logged = Boolean(me);
  nav.hidden = !logged;
  document.getElementById("who").hidden = !logged;
  document.getElementById("who-email").textContent = me ? me.email + (me.admin ? " (administrator)" : "") : "";
  document.getElementById("nav-nodes").hidden = !me?.admin;
}

function render() {
  current?.abort();
  current = new AbortController();
  const signal = current.signal;
  if (!me) {
    showUser();
    loginView(main, { onLoggedIn: loggedIn, reason: loginReason });
    document.title = "Log in · Marathon";
    return;
  }
  const { parts, params } = parse();
  const [view, id] = parts;
  for (const a of nav.querySelectorAll("a")) {
    if (a.dataset.nav === view) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  const ctx = { params, signal, navigate, me };
  if (view === "tasks" && id) {
    document.title = `Task ${id} · Marathon`;
    taskView(main, { ...ctx, id });
  } else if (view === "submit") {
    document.title = "New task · Marathon";
    submitView(main, ctx);
  } else if (view === "usage") {
    document.title = "Usage · Marathon";
    usageView(main, ctx);
  } else if (view === "nodes" && me.admin) {
    document.title = "Nodes · Marathon";
    nodesView(main, ctx);
  } else {
    document.title = "Tasks · Marathon";
    tasksView(main, ctx);
  }
}

let loginReason = "";

function loggedIn(who) {
  me = who;
  loginReason = "";
  showUser();
  render();
  main.focus();
}

auth.onExpired = () => {
  if (!me) return;
  me = null;
  auth.token = "";
  loginReason = "Your session has ended: log in again.";
  render();
};

document.getElementById("logout").addEventListener("click", async () => {
  try {
    await api("/v1/auth/logout", { method: "POST" });
  } catch {
    /* the token may already be gone */
  }
  auth.token = "";
  me = null;
  render();
});

window.addEventListener("hashchange", () => render());

(async () => {
  if (auth.token) {
    try {
      me = await api("/v1/auth/whoami");
    } catch {
      auth.token = "";
      me = null;
    }
  }
  showUser();
  render();
})();
