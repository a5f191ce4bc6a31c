"""The web dashboard in a real headless browser (Debian's chromium through chromedriver),
against a running Marathon (--role all) with the real Claude Code CLI and the fake upstream.

The browser reaches the orchestrator through a proxy that can break its connections, to
prove the event stream resumes after a dropped connection without missing or repeating
anything.  Screenshots go to test-output/web/ (or $MARATHON_TEST_OUTPUT/web/)."""

from __future__ import annotations

import json
import os
import re
import subprocess

import httpx
import pytest
import trio

from tests import browser
from tests import fake_anthropic as fa
from tests.fake_github import open_fake_github
from tests.harness import make_git_repo, marathon_config, run_marathon, scratch_dir
from tests.polling import until

pytestmark = pytest.mark.slow

PASSWORD = "correct horse battery"
GH_TOKEN = "ghp_" + "w" * 36
HELLO = 'def hello(name):\n    # greet someone\n    return "hello " + name\n'


def script(body, i):
    first = json.dumps(body.get("messages", [])[:1])
    if "wait forever" in first:
        return fa.hang()
    if "Their answer" in first and "blue" in first:
        return fa.text("Painted it blue.")
    if "pick a colour" in first:
        return fa.text("<clarification>Which colour?</clarification>")
    if "iteration 2 of 2" in first:
        return fa.text(
            "Checked again: all done.\n<promise>DONE</promise>", usage={"input_tokens": 90, "output_tokens": 9}
        )
    steps = [
        fa.tool_use(
            "Write", {"file_path": "hello.py", "content": HELLO}, usage={"input_tokens": 120, "output_tokens": 30}
        ),
        fa.tool_use(
            "Bash",
            {"command": "git status --short", "description": "status"},
            usage={"input_tokens": 150, "output_tokens": 20},
        ),
        fa.text("I added hello.py.", usage={"input_tokens": 170, "output_tokens": 12}),
    ]
    return steps[min(i, len(steps) - 1)]


def bare_remote(tmp: str, owner: str, name: str) -> None:
    src = make_git_repo(os.path.join(tmp, f"src-{name}"), {"README.md": "# app\n"})
    bare = os.path.join(tmp, "remotes", owner, f"{name}.git")
    os.makedirs(os.path.dirname(bare), exist_ok=True)
    subprocess.run(["git", "clone", "--bare", "--quiet", src, bare], check=True)


class Page:
    """The browser side, synchronous (Selenium): every method runs in a worker thread."""

    def __init__(self, driver, base: str, shots):
        from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        self.d, self.base, self.shots, self.By = driver, base, shots, By
        self.wait = lambda timeout=30: WebDriverWait(
            driver,
            timeout,
            poll_frequency=0.1,
            ignored_exceptions=(NoSuchElementException, StaleElementReferenceException),
        )
        self.errors: list[dict] = []

    def css(self, selector: str):
        return self.d.find_element(self.By.CSS_SELECTOR, selector)

    def all(self, selector: str):
        return self.d.find_elements(self.By.CSS_SELECTOR, selector)

    def row_ids(self) -> list[str]:
        """The task ids the table shows, read in one step (a re-render cannot interleave)."""
        return self.d.execute_script(
            "return [...document.querySelectorAll('tbody tr[data-id]')].map(r => r.dataset.id)"
        )

    def by_label(self, label: str):
        """The form control a <label> with this text names (what a screen reader announces)."""
        lab = self.d.find_element(self.By.XPATH, f"//label[normalize-space()={json.dumps(label, ensure_ascii=False)}]")
        return self.d.find_element(self.By.ID, lab.get_attribute("for"))

    def button(self, text: str):
        return self.d.find_element(self.By.XPATH, f"//button[normalize-space()={json.dumps(text, ensure_ascii=False)}]")

    def click(self, el) -> None:
        """Click as a person would: scroll it to the middle first (the header is sticky)."""
        self.d.execute_script("arguments[0].scrollIntoView({block: 'center'})", el)
        el.click()

    def until(self, fn, timeout: float = 30, what: str = ""):
        return self.wait(timeout).until(lambda d: fn(), message=what)

    def shot(self, name: str) -> None:
        self.d.save_screenshot(str(self.shots / f"{name}.png"))

    def check_console(self, allow_network: bool = False) -> None:
        """No console error; with allow_network, only the browser's own reports of the
        connections the proxy broke (net::ERR_…) are tolerated."""
        for e in browser.console_errors(self.d):
            if allow_network and e.get("source") == "network" and "net::ERR_" in e.get("message", ""):
                continue
            self.errors.append(e)
        assert not self.errors, f"console errors: {self.errors}"

    def accessible_names(self) -> set[tuple[str, str]]:
        tree = self.d.execute_cdp_cmd("Accessibility.getFullAXTree", {})
        return {
            ((n.get("role") or {}).get("value", ""), (n.get("name") or {}).get("value", ""))
            for n in tree["nodes"]
            if not n.get("ignored")
        }

    def rendered_seqs(self) -> list[int]:
        """The sequence numbers of the events on the page (a tool result sits inside its call)."""
        return [
            int(x)
            for x in self.d.execute_script(
                "return [...document.querySelectorAll('div.events [data-seq]')].map(e => e.dataset.seq)"
            )
        ]

    def state(self) -> str:
        return self.d.execute_script("return document.querySelector('h1 + span .badge')?.textContent || ''").replace(
            " ", "_"
        )


async def in_thread(fn, *args):
    return await trio.to_thread.run_sync(fn, *args)


async def test_dashboard_in_a_real_browser():
    why = browser.missing()
    if why:
        pytest.fail(f"the browser test cannot run: {why}")  # part of the suite: never skipped quietly
    tmp = scratch_dir()
    bare_remote(tmp, "acme", "app")
    shots = browser.output_dir("web")
    async with (
        fa.open_fake_anthropic(script) as fake,
        open_fake_github(GH_TOKEN, os.path.join(tmp, "remotes")) as gh,
    ):
        config = marathon_config(
            os.path.join(tmp, "data"),
            anthropic_base_url=fake.url,
            github_url=f"file://{tmp}/remotes",
            github_api_url=gh.url,
            log_level="info",
        )
        async with run_marathon(config) as mt, trio.open_nursery() as nursery:
            proxy = browser.DropProxy(mt.url)
            await nursery.start(proxy.serve)
            # a user with a password (not an administrator), with a GitHub token for the PR
            r = await mt.client.post("/v1/auth/register", json={"email": "alice@example.com", "password": PASSWORD})
            assert r.status_code == 201, r.text
            async with httpx.AsyncClient(base_url=mt.url, trust_env=False) as anon:
                login = (
                    await anon.post("/v1/auth/login", json={"email": "alice@example.com", "password": PASSWORD})
                ).json()
                alice = {"Authorization": f"Bearer {login['token']}"}
                r = await anon.put("/v1/auth/github-token", json={"token": GH_TOKEN}, headers=alice)
                assert r.status_code == 200
            admin_key = mt.client.headers["Authorization"].split()[1]

            with browser.open_chromium() as driver:
                page = Page(driver, proxy.url, shots)
                await scenario(page, mt, proxy, admin_key, alice)
            nursery.cancel_scope.cancel()


async def scenario(page: Page, mt, proxy: browser.DropProxy, admin_key: str, alice: dict) -> None:
    p = page

    # ---- log in with the form: its fields and button carry accessible names
    def login():
        p.d.get(p.base + "/")
        p.until(lambda: p.all("#login-email"), what="the login form")
        names = p.accessible_names()
        for role, name in (("textbox", "Email"), ("textbox", "Password"), ("button", "Log in")):
            assert (role, name) in names, f"no {role} named {name!r} in the accessibility tree"
        p.shot("01-login")
        p.by_label("Email").send_keys("alice@example.com")
        p.by_label("Password").send_keys(PASSWORD)
        p.click(p.button("Log in"))
        p.until(lambda: p.css("#who-email").text.startswith("alice@example.com"), what="logged in")
        p.until(lambda: p.css("main h1").text == "Tasks")
        assert not p.css("#nav-nodes").is_displayed(), "the nodes page is for administrators"
        p.check_console()

    await in_thread(login)

    # ---- submit a task from the form; watch it stream to success
    def submit(prompt: str, pr: bool, promise: str = "") -> str:
        p.click(p.d.find_element(p.By.LINK_TEXT, "New task"))
        p.until(lambda: p.all("#f-prompt"))
        p.by_label("Repository").send_keys("acme/app")
        p.by_label("Prompt").send_keys(prompt)
        p.by_label("Max iterations").clear()
        p.by_label("Max iterations").send_keys("2")
        p.by_label("Max cost (USD)").send_keys("5")
        if promise:
            p.by_label("Completion promise").send_keys(promise)
        if pr:
            p.click(p.by_label("Open a pull request"))
        p.shot("02-submit")
        p.click(p.button("Submit task"))
        p.until(lambda: re.search(r"#/tasks/[0-9a-f]{12}$", p.d.current_url), what="the task page")
        return p.d.current_url.rsplit("/", 1)[1]

    task1 = await in_thread(submit, "add hello.py", True, "DONE")

    def watch_success():
        p.until(lambda: p.all("div.events .ev-tool"), timeout=60, what="a tool call streamed")
        p.shot("03-task-running")
        p.until(lambda: p.state() == "succeeded", timeout=120, what="the task succeeded")
        p.until(lambda: "ended" in p.css(".stream-status").text)
        # tool calls are collapsed with their results inside
        tools = p.all("div.events .ev-tool details")
        assert len(tools) >= 2 and not tools[0].get_attribute("open")
        summaries = [t.find_element(p.By.TAG_NAME, "summary").text for t in tools]
        assert any(s.startswith("→ Write") and "hello.py" in s for s in summaries), summaries
        assert any("git status --short" in s for s in summaries), summaries
        p.click(tools[0].find_element(p.By.TAG_NAME, "summary"))
        result = tools[0].find_element(p.By.CSS_SELECTOR, ".result")
        assert result.is_displayed() and "pending" not in result.get_attribute("class")
        iterations = [e.text for e in p.all("div.events .ev-iteration h3")]
        assert iterations == ["Iteration 1", "Iteration 2"], iterations
        states = [e.text for e in p.all("div.events .ev-state")]
        assert states[0].startswith("● queued") and states[-1].startswith("● succeeded"), states
        assert "I added hello.py." in p.css("div.events").text
        # usage and cost of the task, and the pull request
        assert p.css('[data-usage="tokens"]').text not in ("", "0")
        assert p.css('[data-usage="cost"]').text.startswith("$")
        link = p.css("#pr-link")
        assert link.get_attribute("href") == "https://github.example/acme/app/pull/1"
        p.shot("04-task-succeeded")
        return p.rendered_seqs()

    seqs = await in_thread(watch_success)
    events = await mt.events(task1, follow=False)
    assert sorted(seqs) == [e["id"] for e in events], "every event shown, once"

    # ---- its diff, highlighted
    def diff():
        p.click(p.button("Diff"))
        p.until(lambda: p.all(".diff-file"), what="the diff")
        f = p.css(".diff-file")
        assert "hello.py" in f.find_element(p.By.TAG_NAME, "header").text
        kws = [e.text for e in f.find_elements(p.By.CSS_SELECTOR, ".tok-kw")]
        strs = [e.text for e in f.find_elements(p.By.CSS_SELECTOR, ".tok-str")]
        coms = [e.text for e in f.find_elements(p.By.CSS_SELECTOR, ".tok-com")]
        assert "def" in kws and "return" in kws, kws
        assert '"hello "' in strs and "# greet someone" in coms, (strs, coms)
        assert len(f.find_elements(p.By.CSS_SELECTOR, "tr.add")) == 3
        p.shot("05-diff")
        p.check_console()

    await in_thread(diff)

    # ---- the list: the task with its numbers; the state filter
    def task_list():
        p.click(p.d.find_element(p.By.LINK_TEXT, "Tasks"))
        p.until(lambda: p.all(f'tr[data-id="{task1}"]'))
        row = p.css(f'tr[data-id="{task1}"]')
        cells = [c.text for c in row.find_elements(p.By.TAG_NAME, "td")]
        assert cells[1] == "succeeded" and cells[2] == "acme/app" and cells[3] == "add hello.py", cells
        assert cells[5].endswith("s") and cells[6] not in ("—", "0") and cells[7].startswith("$"), cells
        from selenium.webdriver.support.ui import Select

        Select(p.by_label("State")).select_by_visible_text("running")
        p.until(lambda: "No tasks match" in p.css("main [role=status]").text)
        Select(p.by_label("State")).select_by_visible_text("succeeded")
        p.until(lambda: p.all(f'tr[data-id="{task1}"]'))
        p.shot("06-tasks")
        p.check_console()

    await in_thread(task_list)

    # ---- a second task: cancel it from its page
    task2 = await in_thread(submit, "wait forever", False)

    def cancel():
        p.until(lambda: p.state() == "running", timeout=60, what="the second task running")
        p.click(p.button("Cancel task"))
        p.until(lambda: p.state() == "cancelled", timeout=60, what="cancelled")
        p.until(lambda: "ended" in p.css(".stream-status").text)
        assert p.all("div.events .ev-state")[-1].text.startswith("● cancelled")
        assert not p.button("Cancel task").is_displayed()
        p.shot("07-cancelled")
        p.check_console()

    await in_thread(cancel)
    assert (await mt.task(task2))["state"] == "cancelled"

    # ---- a dropped connection: the stream resumes where it was, nothing lost or doubled
    r = await mt.client.post("/v1/tasks", json={"prompt": "add hello.py again", "repo": "acme/app"}, headers=alice)
    assert r.status_code == 201, r.text
    task3 = r.json()["id"]
    await in_thread(lambda: p.d.get(f"{p.base}/#/tasks/{task3}"))
    await in_thread(lambda: p.until(lambda: p.rendered_seqs(), what="the first event"))
    proxy.hold()
    proxy.drop()
    final = await mt.finish(task3)  # the whole run happens while the browser is cut off
    assert final["state"] == "succeeded"
    before = await in_thread(p.rendered_seqs)
    proxy.release()

    def resumed():
        p.until(lambda: p.state() == "succeeded", timeout=60, what="caught up after the drop")
        p.until(lambda: "ended" in p.css(".stream-status").text)
        p.check_console(allow_network=True)
        return p.rendered_seqs()

    after = await in_thread(resumed)
    events = await mt.events(task3, follow=False)
    assert len(before) < len(events), "the drop really cut the stream short"
    assert sorted(after) == [e["id"] for e in events], "after the drop: every event shown, once"

    # ---- a task that asks a question: the page shows it; the reply button continues it
    r = await mt.client.post("/v1/tasks", json={"prompt": "pick a colour"}, headers=alice)
    assert r.status_code == 201, r.text
    task4 = r.json()["id"]

    def reply():
        p.d.get(f"{p.base}/#/tasks/{task4}")
        p.until(lambda: p.state() == "needs_input", timeout=60, what="the task asks")
        p.until(lambda: "Which colour?" in p.css("main").text)
        p.by_label("Your answer").send_keys("blue")
        p.shot("08-question")
        p.click(p.button("Reply"))
        p.until(lambda: p.state() == "succeeded", timeout=90, what="answered and done")
        p.until(lambda: "Painted it blue." in p.css("div.events").text, what="the answer's run streamed")
        p.check_console()

    await in_thread(reply)
    assert (await mt.task(task4))["state"] == "succeeded"

    # ---- an administrator, with an API key: nodes (drain and undrain one) and usage
    def row_status() -> str:
        return p.d.execute_script("return document.querySelector('tr[data-node] td:nth-child(2)')?.textContent || ''")

    def click_button(text: str) -> bool:
        p.click(p.button(text))  # the table is redrawn every few seconds: a stale button is looked up again
        return True

    def admin_nodes():
        p.click(p.button("Log out"))
        p.until(lambda: p.all("#login-key"))
        p.by_label("API key").send_keys(admin_key)
        p.click(p.button("Use API key"))
        p.until(lambda: p.css("#nav-nodes").is_displayed(), what="the nodes link for an administrator")
        p.click(p.css("#nav-nodes"))
        p.until(lambda: p.all("tr[data-node]"))
        row = p.css("tr[data-node]").text
        assert "connected" in row and "process" in row, row
        assert row_status() == "connected"
        p.shot("09-nodes")
        p.until(lambda: click_button("Drain"), what="the Drain button")
        p.until(lambda: row_status() == "draining", what="the node shown draining")
        p.until(lambda: p.all("tr[data-node] button") and p.css("tr[data-node] button").text == "Undrain")
        p.shot("09-node-drained")
        p.check_console()

    await in_thread(admin_nodes)
    nodes = (await mt.client.get("/v1/nodes")).json()["nodes"]
    assert [(n["draining"], n["drain"]) for n in nodes] == [(True, "administrator")], nodes
    await until(lambda: mt.node.draining, timeout=10)  # the node itself was told: it takes no new tasks

    def admin_undrain():
        p.until(lambda: click_button("Undrain"), what="the Undrain button")
        p.until(lambda: row_status() == "connected", what="the node shown taking tasks again")
        p.check_console()

    await in_thread(admin_undrain)
    assert [n["draining"] for n in (await mt.client.get("/v1/nodes")).json()["nodes"]] == [False]
    await until(lambda: not mt.node.draining, timeout=10)

    def admin_usage():
        p.click(p.d.find_element(p.By.LINK_TEXT, "Usage"))
        p.until(lambda: p.all("svg.chart"))
        p.click(p.by_label("All users"))
        p.until(lambda: p.all("svg.chart rect.bar"), what="bars for the tasks' usage")
        assert len(p.all("svg.chart")) == 4
        p.shot("10-usage")
        # the page loads nothing from anywhere else
        origins = p.d.execute_script(
            "return [...new Set(performance.getEntriesByType('resource').map(e => new URL(e.name).origin))]"
        )
        assert origins in ([], [p.base]), origins
        p.check_console()

    await in_thread(admin_usage)


UNIT_CHECKS = r"""
const done = arguments[arguments.length - 1];
(async () => {
  const { SseParser } = await import("/ui/api.js");
  const { parseDiff, renderDiff, highlight } = await import("/ui/diff.js");
  const { EventLog } = await import("/ui/task.js");
  const out = {};

  // the SSE parser gives the same events whatever the chunk boundaries (CRLF too)
  const stream = "id: 1\nevent: text\ndata: {\"text\":\"a\"}\n\n: keepalive\n\nid: 2\r\nevent: state\r\ndata: {\"state\":\"running\"}\r\n\r\nid: 3\nevent: text\ndata: line one\ndata: line two\n\n";
  const whole = new SseParser().feed(stream);
  out.sse = whole.map((e) => [e.id, e.kind, e.raw]);
  out.sseSame = true;
  for (let n = 1; n <= stream.length; n++) {
    const p = new SseParser();
    const got = [];
    for (let i = 0; i < stream.length; i += n) got.push(...p.feed(stream.slice(i, i + n)));
    if (JSON.stringify(got) !== JSON.stringify(whole)) out.sseSame = false;
  }

  // a diff of several kinds of change
  const diff = [
    "diff --git a/src/app.py b/src/app.py", "index 1111111..2222222 100644", "--- a/src/app.py", "+++ b/src/app.py",
    "@@ -1,3 +1,3 @@ def main():", " import os", "-x = 1", "+x = 2  # two", " print(x)",
    "diff --git a/new.md b/new.md", "new file mode 100644", "--- /dev/null", "+++ b/new.md", "@@ -0,0 +1 @@", "+# <img src=x onerror=alert(1)>",
    "\\ No newline at end of file",
    "diff --git a/gone.txt b/gone.txt", "deleted file mode 100644", "--- a/gone.txt", "+++ /dev/null", "@@ -1 +0,0 @@", "-bye",
    "diff --git a/logo.png b/logo.png", "Binary files a/logo.png and b/logo.png differ", "",
  ].join("\n");
  const files = parseDiff(diff);
  out.files = files.map((f) => [f.oldPath, f.newPath, f.adds, f.dels, f.binary]);
  out.lineNos = files[0].lines.filter((l) => l.kind !== "hunk").map((l) => [l.kind, l.oldNo ?? null, l.newNo ?? null]);
  const view = renderDiff(diff);
  document.body.append(view);
  out.injected = view.querySelectorAll("img, script").length;
  out.shownAsText = view.textContent.includes("<img src=x onerror=alert(1)>");
  out.tokens = highlight('x = "s" # c 42', "py").map((n) => (typeof n === "string" ? n : `${n.className}:${n.textContent}`));
  view.remove();

  // events: a tool result lands inside its call; HTML in text stays text
  const log = new EventLog();
  log.push([
    { id: 1, kind: "iteration", data: { iteration: 1 } },
    { id: 2, kind: "tool_call", data: { tool_id: "t1", name: "Bash", summary: "Bash ls" } },
    { id: 3, kind: "text", data: { text: "<b>not bold</b>" } },
    { id: 4, kind: "tool_result", data: { tool_id: "t1", summary: "a.txt", is_error: true } },
  ]);
  await new Promise((r) => requestAnimationFrame(() => setTimeout(r, 0)));
  out.events = [...log.el.querySelectorAll("[data-seq]")].map((e) => e.dataset.seq);
  out.resultInCall = log.el.querySelector('[data-tool="t1"] .result').textContent;
  out.failedCall = log.el.querySelector('[data-tool="t1"]').classList.contains("failed");
  out.bold = log.el.querySelectorAll("b").length;
  done(out);
})().catch((e) => done({ error: String(e && e.stack || e) }));
"""


async def test_dashboard_modules_and_pages_in_the_browser():
    """The page's pure parts, run in the browser: the SSE parser at every chunk size, the
    diff parser and highlighter (markup in a diff is shown, never run), the event log; and
    the task list a page at a time through 120 tasks."""
    why = browser.missing()
    if why:
        pytest.fail(f"the browser test cannot run: {why}")
    config = marathon_config(os.path.join(scratch_dir(), "data"))
    async with run_marathon(config, role="orchestrator") as mt:
        admin = await mt.info.accounts.ensure_local_admin()
        ids = await browser.fill_tasks(mt.info.tasks.store, admin.id, 120)
        token = mt.client.headers["Authorization"].split()[1]

        def run():
            with browser.open_chromium() as d:
                d.get(mt.url + "/")
                out = d.execute_async_script(UNIT_CHECKS)
                # pagination: 120 tasks are three pages, newest first, each task once
                d.execute_script("localStorage.setItem('marathon.token', arguments[0])", token)
                d.get("about:blank")
                d.get(mt.url + "/#/tasks")  # a fresh load: logged in with the key
                p = Page(d, mt.url, browser.output_dir("web"))
                pages: list[list[str]] = []
                for _ in range(3):
                    p.until(lambda: (ids := p.row_ids()) != [] and ids[0] not in {i for pg in pages for i in pg})
                    pages.append(p.row_ids())
                    older = p.button("Older →")
                    if len(pages) < 3:
                        p.click(older)
                assert not older.is_enabled(), "the last page has no older one"
                p.click(p.button("← Newer"))
                p.until(lambda: p.row_ids()[:1] == pages[1][:1])
                out["pages"] = pages
                return out, browser.console_errors(d)

        out, errors = await in_thread(run)
    assert [len(pg) for pg in out["pages"]] == [50, 50, 20]
    assert [i for pg in out["pages"] for i in pg] == ids[::-1]
    assert "error" not in out, out.get("error")
    assert out["sse"] == [
        [1, "text", '{"text":"a"}'],
        [2, "state", '{"state":"running"}'],
        [3, "text", "line one\nline two"],
    ]
    assert out["sseSame"], "the SSE parser depends on where the chunks end"
    assert out["files"] == [
        ["src/app.py", "src/app.py", 1, 1, False],
        [None, "new.md", 1, 0, False],
        ["gone.txt", None, 0, 1, False],
        ["logo.png", "logo.png", 0, 0, True],
    ]
    assert out["lineNos"] == [["ctx", 1, 1], ["del", 2, None], ["add", None, 2], ["ctx", 3, 3]]
    assert out["injected"] == 0 and out["shownAsText"]
    assert out["tokens"] == ["x = ", 'tok-str:"s"', " ", "tok-com:# c 42"]
    assert out["events"] == ["1", "2", "4", "3"]  # the result inside its call, the text after
    assert out["resultInCall"] == "a.txt" and out["failedCall"] and out["bold"] == 0
    assert not errors, errors
