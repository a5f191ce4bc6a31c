"""One task inside the sandbox: workspace from the bundle, the loop of Claude Code runs,
a commit per iteration, the work back as a bundle.

Work is never lost to an agent-side error: after every iteration whose commit succeeded the
work so far is bundled (a new file renamed over the last good one), so when a later commit
or the final bundle fails (a full disk, a workspace the task broke on purpose) the task ends
``failed`` with that reason and the last good bundle still goes back to the node.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import msgspec
import trio

from marathon.agent import files, loop
from marathon.agent.runner import (
    GitError,
    RunUser,
    find_claude,
    make_run_user,
    run_claude,
    run_git,
    run_git_text,
    run_git_to_file,
)
from marathon.errors import MarathonError, leaves
from marathon.protocol import messages as m

log = logging.getLogger("marathon.agent")
DIFF_CAP = 4 * 1024 * 1024  # bytes: the diff is for reading; the commits carry the whole work
STAT_CAP = 64 * 1024
SUBJECT_CAP = 1000


@dataclass
class Cancellation:
    event: trio.Event = field(default_factory=trio.Event)
    reason: str = ""

    def cancel(self, reason: str) -> None:
        if not self.event.is_set():
            self.reason = reason
            self.event.set()


def cap_bytes(data: bytes, cap: int, note: str) -> str:
    """``data`` as text of at most ``cap`` UTF-8 bytes (cut at a character boundary) plus a note."""
    if len(data) <= cap:
        return data.decode(errors="replace")
    cut = data[:cap].decode("utf-8", errors="ignore")
    while len(cut.encode()) > cap:  # replacement characters can be wider than what they replace
        cut = cut[:-1]
    return cut + note


async def setup_workspace(user: RunUser, start: m.Start, bundle: str) -> str:
    """Clone the bundle into the (empty) workspace and check out the work branch; returns the base commit."""
    spec, ws = start.task, start.workspace
    if not os.path.isdir(ws):  # in a VM the workspace is the guest's own directory
        os.makedirs(ws, mode=0o755)
        if os.geteuid() == 0:
            os.chown(ws, user.uid, user.gid)
    await run_git(user, ws, "clone", "--quiet", "--no-checkout", bundle, ".")
    base_ref = f"refs/remotes/origin/{start.base_branch}"
    work = spec.work_branch
    if spec.resume:
        await run_git(user, ws, "checkout", "--quiet", "-B", work, f"refs/remotes/origin/{work}")
        base = (await run_git_text(user, ws, "merge-base", base_ref, work)).strip()
    else:
        base = (await run_git_text(user, ws, "rev-parse", base_ref)).strip()
        await run_git(user, ws, "checkout", "--quiet", "-B", work, base)
    if start.base_branch != work:
        await run_git(user, ws, "branch", "--quiet", "-f", start.base_branch, base_ref)
    await run_git(user, ws, "remote", "remove", "origin")  # the bundle is not a remote Claude Code should see
    # written by us, maybe as root, into a directory the sandbox user owns: never through its links
    files.replace_file(ws, ".git/info/exclude", f"\n/{loop.MEMORY_FILE}\n".encode(), uid=user.uid, gid=user.gid,
                       append=True)  # fmt: skip
    if spec.memory:
        files.replace_file(ws, loop.MEMORY_FILE, spec.memory.encode(), uid=user.uid, gid=user.gid)
    return base


def read_memory(ws: str) -> str | None:
    """MEMORY.md, read from a directory the sandbox user controls: never through a symlink,
    only a regular file, only its first part."""
    data = files.read_regular(ws, loop.MEMORY_FILE, loop.MEMORY_CAP * 4 + 4)
    return None if data is None else loop.cap_memory(data.decode(errors="replace"))


async def commit_all(user: RunUser, ws: str, message: str) -> bool:
    """Commit whatever Claude Code left uncommitted.  True when a commit was made."""
    await run_git(user, ws, "add", "-A")
    if not (await run_git(user, ws, "status", "--porcelain", limit=1)).strip():
        return False
    await run_git(user, ws, "commit", "--quiet", "--no-verify", "-m", message)
    return True


async def bundle_work(user: RunUser, ws: str, base: str, spec: m.TaskSpec, result_bundle: str) -> bool:
    """The commits beyond ``base`` as a bundle (replacing the last good one only on success);
    False when there are none."""
    count = int(
        (await run_git_text(user, ws, "rev-list", "--count", f"{base}..refs/heads/{spec.work_branch}")).strip() or 0
    )
    if not count:
        return False
    # straight from git's stdout into our own file: no path the sandbox user could swap
    await run_git_to_file(user, ws, result_bundle, "bundle", "create", "--quiet", "-",
                          f"{base}..refs/heads/{spec.work_branch}")  # fmt: skip
    return True


async def run_verify(user: RunUser, ws: str, cmd: str, timeout: float) -> tuple[int, str]:
    import subprocess

    with trio.move_on_after(timeout) as scope:
        res = await trio.run_process(
            ["/bin/sh", "-c", cmd], cwd=ws, env=user.base_env(), capture_stdout=True, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, check=False, start_new_session=True, **user.popen_kwargs,
        )  # fmt: skip
    if scope.cancelled_caught:
        return 124, f"(timed out after {timeout:.0f}s)"
    return res.returncode, res.stdout[-65536:].decode(errors="replace")


Emit = Callable[[list[m.Event]], Awaitable[None]]


@dataclass
class Progress:
    """What the loop has so far (for the outcome, also when something breaks half-way)."""

    iteration: int = 0
    turns: int = 0
    usage: m.Usage = field(default_factory=m.Usage)
    claude_usage: m.Usage | None = None
    exit_code: int | None = None
    final: str = ""
    bundled: bool = False  # result_bundle holds the work up to the last good commit
    base: str = ""


async def execute(config, start: m.Start, api_url: str, emit: Emit, cancel: Cancellation,
                  bundle: str, result_bundle: str) -> m.TaskOutcome:  # fmt: skip
    """Run the task; never raises for task-level failures (a bug is reported as ``agent_error``
    with what the agent had, and the last good bundle)."""
    t0 = time.monotonic()
    p = Progress()
    user = None
    try:
        claude = find_claude(start.claude_bin or config.claude_bin)
        user = make_run_user(start.run_uid or config.sandbox_uid, start.run_gid or None, home=start.home,
                             tmp=start.tmp_dir)  # fmt: skip
        p.base = await setup_workspace(user, start, bundle)
    except MarathonError as exc:
        reason = exc.code if isinstance(exc, GitError) else "sandbox_failed"
        return m.TaskOutcome(state=m.State.FAILED, reason=reason, message=str(exc), duration_s=time.monotonic() - t0)
    try:
        verdict = await _loop(start, user, claude, api_url, emit, cancel, result_bundle, p)
    except Exception as exc:  # a bug here must not lose the work or the reason
        log.exception("agent: task failed")
        tb = traceback.format_exc(limit=4)
        what = "; ".join(f"{type(e).__name__}: {e}" for e in leaves(exc))
        verdict = loop.Verdict("end", m.State.FAILED, "agent_error", f"agent error: {what}\n{tb[-1500:]}")
    return await _outcome(start, user, verdict, p, result_bundle, t0)


async def _loop(start: m.Start, user: RunUser, claude: str, api_url: str, emit: Emit, cancel: Cancellation,
                result_bundle: str, p: Progress) -> loop.Verdict:  # fmt: skip
    spec, ws = start.task, start.workspace
    await emit([m.StateEvent(state=m.State.RUNNING)])
    looping = spec.request.max_iterations > 1 or spec.request.verify is not None
    last = spec.iterations_done + spec.request.max_iterations
    previous = loop.Previous()
    verify_failed = False
    for iteration in range(spec.iterations_done + 1, last + 1):
        p.iteration = iteration
        if iteration == 1:
            prompt = loop.first_prompt(spec.request.prompt, promise=spec.request.promise, looping=looping)
        else:
            reply = spec.reply if iteration == spec.iterations_done + 1 else None
            prompt = loop.next_prompt(prompt=spec.request.prompt, iteration=iteration, max_iteration=last, promise=spec.request.promise,
                                      previous=previous, memory=read_memory(ws), reply=reply)  # fmt: skip

        async def tagged(events: list[m.Event], n=iteration) -> None:
            await emit([msgspec.structs.replace(e, iteration=n) for e in events])

        await tagged([m.IterationEvent(why="start" if iteration == 1 else "continue")])
        run = await run_claude(claude=claude, prompt=prompt, workspace=ws, user=user, api_url=api_url,
                               api_key=start.api_key, model=spec.model, max_turns=spec.max_turns, emit=tagged,
                               cancel=cancel.event)  # fmt: skip
        res = run.parser.result
        p.exit_code = run.exit_code
        if res is not None:
            p.usage, p.turns = p.usage + res.usage, p.turns + res.num_turns
            p.claude_usage = p.usage
        final = run.parser.final_text if run.parser.message_id is not None else (res.result if res else "")
        p.final = final or (res.result if res else "") or run.parser.last_text
        commit_error, disk_full = None, False
        try:
            await commit_all(
                user,
                ws,
                f"marathon: task {spec.task_id} iteration {iteration}\n\n{loop.tail(spec.request.prompt, 500)}",
            )
            p.bundled = await bundle_work(user, ws, p.base, spec, result_bundle) or p.bundled
        except GitError as exc:
            commit_error, disk_full = str(exc), exc.disk_full
            await tagged([m.LogEvent(message=str(exc)[:500], level="warning", source="agent")])
        facts = loop.RunFacts(
            cancelled=(cancel.reason or "cancelled") if cancel.event.is_set() else None,
            has_result=res is not None, subtype=res.subtype if res else "", is_error=res.is_error if res else False,
            exit_code=run.exit_code, killed_by_signal=-run.exit_code if run.exit_code is not None and run.exit_code < 0 else None,
            final_text=final, result_text=res.result if res else "", stderr_tail=run.stderr_tail,
            commit_error=commit_error, disk_full=disk_full,
        )  # fmt: skip
        verdict = loop.after_run(facts, promise=spec.request.promise, verify=spec.request.verify, max_turns=spec.max_turns,
                                 iteration=iteration)  # fmt: skip
        previous = loop.Previous(final_message=p.final)
        if verdict.action == "verify":
            assert spec.request.verify is not None
            code, out = await run_verify(user, ws, spec.request.verify, spec.verify_timeout)
            await tagged([m.LogEvent(message=f"check `{spec.request.verify}` exited {code}: {loop.tail(out, 300)}", source="agent",
                                     level="info" if code == 0 else "warning")])  # fmt: skip
            verdict = loop.after_verify(code)
            verify_failed = code != 0
            if verify_failed:
                previous = loop.Previous(
                    final_message=p.final, verify_cmd=spec.request.verify, verify_code=code, verify_output=out
                )
        if verdict.action == "end":
            return verdict
    return loop.out_of_iterations(max_iterations=spec.request.max_iterations, promise=spec.request.promise, verify=spec.request.verify,
                                  verify_failed=verify_failed)  # fmt: skip


async def _outcome(start: m.Start, user: RunUser, verdict: loop.Verdict, p: Progress, result_bundle: str,
                   t0: float) -> m.TaskOutcome:  # fmt: skip
    spec, ws = start.task, start.workspace
    state, reason, message = verdict.state, verdict.reason, verdict.message
    try:
        out = await finish_work(user, ws, p.base, spec)
    except (MarathonError, OSError, ValueError) as exc:
        out = {"diff_stat": f"(work unavailable: {str(exc)[:300]})"}
        if state == m.State.SUCCEEDED:  # the work cannot be read back: do not claim it is done
            state, reason = m.State.FAILED, exc.code if isinstance(exc, GitError) else "git_error"
            message = f"the work could not be read back: {str(exc)[:300]}"
    try:
        if out.get("commits"):
            p.bundled = await bundle_work(user, ws, p.base, spec, result_bundle) or p.bundled
    except (MarathonError, OSError) as exc:
        log.warning("agent: final bundle failed (%s); sending the last good one", exc)
        note = f"(the final bundle failed: {str(exc)[:200]}; the last good bundle is kept)"
        message = f"{message} {note}" if message else note
    return m.TaskOutcome(
        state=state, reason=reason, message=message, exit_code=p.exit_code, is_error=state == m.State.FAILED,
        num_turns=p.turns, usage=p.usage, claude_usage=p.claude_usage, duration_s=time.monotonic() - t0,
        final_text=p.final[-4000:], iterations=p.iteration, memory=read_memory(ws), has_bundle=p.bundled
        and os.path.exists(result_bundle), **out,
    )  # fmt: skip


async def finish_work(user: RunUser, ws: str, base: str, spec: m.TaskSpec) -> dict:
    head = (await run_git_text(user, ws, "rev-parse", "HEAD")).strip()
    subject = (await run_git_text(user, ws, "log", "-1", "--format=%s", "HEAD", limit=SUBJECT_CAP)).strip()
    commits = int((await run_git_text(user, ws, "rev-list", "--count", f"{base}..HEAD")).strip() or 0)
    diff = await run_git(user, ws, "diff", "--binary", base, "HEAD", limit=DIFF_CAP)
    note = f"\n… diff truncated at {DIFF_CAP} bytes: `marathon fetch` has every commit\n"
    stat = await run_git(user, ws, "diff", "--stat", base, "HEAD", limit=STAT_CAP)
    return {"diff": cap_bytes(diff, DIFF_CAP - len(note.encode()), note),
            "diff_stat": cap_bytes(stat, STAT_CAP, "\n…").strip(), "commits": commits, "head": head,
            "head_subject": subject[:SUBJECT_CAP], "branch": spec.work_branch}  # fmt: skip
