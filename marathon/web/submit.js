// Submit a task: repository, branch, prompt, the loop (iterations, promise, verify), budgets.

import { api } from "./api.js";
import { h } from "./dom.js";

function field(id, label, input, hint) {
  input.id = id;
  if (hint) input.setAttribute("aria-describedby", `${id}-hint`);
  return h("div", { class: "field" }, h("label", { for: id }, label), input, hint ? h("div", { class: "hint", id: `${id}-hint` }, hint) : null);
}

const text = (name, attrs = {}) => h("input", { name, type: "text", autocomplete: "off", ...attrs });
const number = (name, attrs = {}) => h("input", { name, type: "number", inputmode: "decimal", ...attrs });

export function submitView(main, { navigate, me }) {
  const error = h("div", { class: "error", role: "alert", hidden: true });
  const f = {
    repo: text("repo", { placeholder: "owner/name, https://… or git@…" }),
    branch: text("branch", { placeholder: "the default branch" }),
    prompt: h("textarea", { name: "prompt", required: true, rows: 6, placeholder: "What should Claude Code do?" }),
    model: text("model", { placeholder: "the orchestrator's default" }),
    max_iterations: number("max_iterations", { min: 1, max: 100, step: 1, value: "1" }),
    promise: text("promise", { placeholder: "e.g. DONE" }),
    verify: text("verify", { placeholder: "e.g. pytest -q" }),
    max_tokens: number("max_tokens", { min: 1, step: 1 }),
    max_cost: number("max_cost", { min: 0.01, step: 0.01 }),
    timeout: number("timeout", { min: 1, step: 1 }),
    max_turns: number("max_turns", { min: 1, max: 1000, step: 1 }),
    pr: h("input", { name: "pr", type: "checkbox" }),
    pr_title: text("pr_title"),
    branch_name: text("branch_name", { placeholder: "marathon/<task id>" }),
    base: text("base", { placeholder: "the branch the work started from" }),
  };
  const submit = h("button", { type: "submit", class: "primary" }, "Submit task");

  function body() {
    const out = { prompt: f.prompt.value };
    for (const k of ["repo", "branch", "model", "promise", "verify", "pr_title", "branch_name", "base"]) {
      const v = f[k].value.trim();
      if (v) out[k] = v;
    }
    for (const k of ["max_iterations", "max_tokens", "timeout", "max_turns"]) {
      if (f[k].value !== "") out[k] = Math.round(Number(f[k].value));
    }
    if (f.max_cost.value !== "") out.max_cost = Number(f.max_cost.value);
    if (f.pr.checked) out.pr = true;
    return out;
  }

  const form = h(
    "form",
    {
      class: "panel",
      "aria-label": "New task",
      on: {
        submit: async (ev) => {
          ev.preventDefault();
          error.hidden = true;
          if (!f.prompt.value.trim()) {
            error.textContent = "The prompt must not be empty.";
            error.hidden = false;
            f.prompt.focus();
            return;
          }
          submit.disabled = true;
          try {
            const task = await api("/v1/tasks", { method: "POST", body: body() });
            navigate(`tasks/${task.id}`);
          } catch (exc) {
            error.textContent = exc.message; // the form keeps what was typed
            error.hidden = false;
          } finally {
            submit.disabled = false;
          }
        },
      },
    },
    error,
    h(
      "div",
      { class: "grid2" },
      field("f-repo", "Repository", f.repo, me?.admin ? "owner/name on GitHub, a URL, or a path on the node" : "owner/name on GitHub or a URL"),
      field("f-branch", "Branch", f.branch),
    ),
    field("f-prompt", "Prompt", f.prompt),
    field("f-model", "Model", f.model),
    h(
      "fieldset",
      {},
      h("legend", {}, "Loop"),
      h(
        "div",
        { class: "grid2" },
        field("f-iterations", "Max iterations", f.max_iterations, "run Claude Code up to this many times"),
        field("f-promise", "Completion promise", f.promise, "done when the answer says <promise>TEXT</promise>"),
        field("f-verify", "Verify command", f.verify, "a claimed completion counts only if this exits 0"),
      ),
    ),
    h(
      "fieldset",
      {},
      h("legend", {}, "Budgets and limits"),
      h(
        "div",
        { class: "grid2" },
        field("f-max-tokens", "Max tokens", f.max_tokens),
        field("f-max-cost", "Max cost (USD)", f.max_cost),
        field("f-timeout", "Timeout (seconds)", f.timeout),
        field("f-max-turns", "Max turns", f.max_turns),
      ),
    ),
    h(
      "fieldset",
      {},
      h("legend", {}, "Result"),
      h("div", { class: "field check" }, f.pr, h("label", { for: "f-pr" }, "Open a pull request")),
      h("div", { class: "grid2" }, field("f-pr-title", "Pull request title", f.pr_title), field("f-branch-name", "Work branch", f.branch_name), field("f-base", "Pull request base", f.base)),
    ),
    submit,
  );
  f.pr.id = "f-pr";
  main.replaceChildren(h("section", {}, h("h1", {}, "New task"), form));
  f.prompt.focus();
}
