// Log in with an account (email and password), or with an API key.

import { api, ApiError, auth } from "./api.js";
import { h } from "./dom.js";

export function loginView(main, { onLoggedIn, reason }) {
  const error = h("div", { class: "error", role: "alert", hidden: true });
  const showError = (msg) => {
    error.textContent = msg;
    error.hidden = false;
  };

  async function useToken(token) {
    auth.token = token;
    try {
      const me = await api("/v1/auth/whoami");
      onLoggedIn(me);
    } catch (exc) {
      auth.token = "";
      showError(exc instanceof ApiError && exc.status === 401 ? "That key is not valid (or was revoked)." : exc.message);
    }
  }

  const email = h("input", { id: "login-email", name: "email", type: "email", autocomplete: "username", required: true });
  const password = h("input", { id: "login-password", name: "password", type: "password", autocomplete: "current-password", required: true });
  const submit = h("button", { type: "submit", class: "primary" }, "Log in");
  const form = h(
    "form",
    {
      "aria-label": "Log in",
      on: {
        submit: async (ev) => {
          ev.preventDefault();
          error.hidden = true;
          submit.disabled = true;
          try {
            // no token yet: a failed login is a 401 we show, not an expiry
            const res = await fetch("/v1/auth/login", {
              method: "POST",
              headers: { "Content-Type": "application/json" },
              body: JSON.stringify({ email: email.value, password: password.value }),
            });
            const body = await res.json().catch(() => ({}));
            if (!res.ok) {
              showError(body.error?.message || `login failed (${res.status})`);
              return;
            }
            await useToken(body.token);
          } catch {
            showError("cannot reach the orchestrator");
          } finally {
            submit.disabled = false;
          }
        },
      },
    },
    h("div", { class: "field" }, h("label", { for: "login-email" }, "Email"), email),
    h("div", { class: "field" }, h("label", { for: "login-password" }, "Password"), password),
    submit,
  );

  const key = h("input", { id: "login-key", name: "api-key", type: "password", autocomplete: "off", placeholder: "mk_…", required: true });
  const keyButton = h("button", { type: "submit" }, "Use API key");
  const keyForm = h(
    "form",
    {
      "aria-label": "Use an API key",
      on: {
        submit: async (ev) => {
          ev.preventDefault();
          error.hidden = true;
          keyButton.disabled = true;
          await useToken(key.value.trim());
          keyButton.disabled = false;
        },
      },
    },
    h("div", { class: "field" }, h("label", { for: "login-key" }, "API key"), key),
    keyButton,
  );

  main.replaceChildren(
    h(
      "section",
      { class: "login panel" },
      h("h1", {}, "Log in to Marathon"),
      reason ? h("p", { class: "notice" }, reason) : null,
      error,
      form,
      h("p", { class: "or" }, "or"),
      keyForm,
      h("p", { class: "muted" }, "A key comes from ", h("code", {}, "marathon keys create"), "."),
    ),
  );
  email.focus();
}
