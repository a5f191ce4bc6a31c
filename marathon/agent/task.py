"""One task inside the sandbox: workspace from the bundle, the loop of Claude Code runs,
a commit per iteration, the work back as a bundle."""

from __future__ import annotations

import logging
import os
import stat
import time
from dataclasses import dataclass, field
from collections.abc import Awaitable, Callable

import msgspec
import trio

from marathon.agent import loop
from marathon.agent.runner import RunUser, find_claude, make_run_user, run_claude, run_git, run_git_to_file
from marathon.errors import MarathonError
from marathon.protocol import messages as m

log = logging.getLogger("marathon.agent")
DIFF_CAP = 4 * 1024 * 1024


@dataclass
class Cancellation:
    event: trio.Event = field(default_factory=trio.Event)
    reason: str = ""

    def cancel(self, reason: str) -> None:
        if not self.event.is_set():
            self.reason = reason
            self.event.set()


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
        base = (await run_git(user, ws, "merge-base", base_ref, work)).strip()
    else:
        base = (await run_git(user, ws, "rev-parse", base_ref)).strip()
        await run_git(user, ws, "checkout", "--quiet", "-B", work, base)
    if start.base_branch != work:
        await run_git(user, ws, "branch", "--quiet", "-f", start.base_branch, base_ref)
    await run_git(user, ws, "remote", "remove", "origin")  # the bundle is not a remote Claude Code should see
    with open(os.path.join(ws, ".git", "info", "exclude"), "a") as f:
        f.write(f"\n/{loop.MEMORY_FILE}\n")
    if spec.memory:
        await write_as(user, os.path.join(ws, loop.MEMORY_FILE), spec.memory)
    return base


async def write_as(user: RunUser, path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
    if os.geteuid() == 0:
        os.chown(path, user.uid, user.gid)


def read_memory(ws: str) -> str | None:
    """MEMORY.md, read by the (root) agent from a directory the sandbox user controls: never
    through a symlink, only a regular file, only its first part."""
    try:
        fd = os.open(os.path.join(ws, loop.MEMORY_FILE), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        return loop.cap_memory(f.read(loop.MEMORY_CAP + 1).decode(errors="replace"))


async def commit_all(user: RunUser, ws: str, message: str) -> bool:
    """Commit whatever Claude Code left uncommitted.  True when a commit was made."""
    await run_git(user, ws, "add", "-A")
    if not (await run_git(user, ws, "status", "--porcelain")).strip():
        return False
    await run_git(user, ws, "commit", "--quiet", "--no-verify", "-m", message)
    return True


async def run_verify(user: RunUser, ws: str, cmd: str, timeout: float) -> tuple[int, str]:
    with trio.move_on_after(timeout) as scope:
        res = await trio.run_process(
            ["/bin/sh", "-c", cmd],
            cwd=ws,
            env=user.base_env(),
            capture_stdout=True,
            stderr=__import__("subprocess").STDOUT,
            check=False,
            start_new_session=True,
            **user.popen_kwargs,
        )
    if scope.cancelled_caught:
        return 124, f"(timed out after {timeout:.0f}s)"
    return res.returncode, res.stdout.decode(errors="replace")


Emit = Callable[[list[m.Event]], Awaitable[None]]


async def execute(
    config, start: m.Start, api_url: str, emit: Emit, cancel: Cancellation, bundle: str, result_bundle: str
) -> m.TaskOutcome:
    """Run the task; never raises for task-level failures."""
    spec, ws = start.task, start.workspace
    t0 = time.monotonic()
    try:
        claude = find_claude(config.claude_bin)
        user = make_run_user(config.sandbox_uid, "/tmp")
        base = await setup_workspace(user, start, bundle)
    except MarathonError as exc:
        return m.TaskOutcome(
            state="failed", reason="sandbox_failed", message=str(exc), duration_s=time.monotonic() - t0
        )

    await emit([m.StateEvent(state="running")])
    looping = spec.max_iterations > 1 or spec.verify is not None
    last = spec.iterations_done + spec.max_iterations
    previous = loop.Previous()
    usage, turns, iteration = m.Usage(), 0, spec.iterations_done
    state, reason, message, final = "failed", "max_iterations", "", ""
    claude_usage: m.Usage | None = None
    exit_code: int | None = None
    for iteration in range(spec.iterations_done + 1, last + 1):
        if iteration == 1:
            prompt = loop.first_prompt(spec.prompt, promise=spec.promise, looping=looping)
        else:
            prompt = loop.next_prompt(
                prompt=spec.prompt,
                iteration=iteration,
                max_iteration=last,
                promise=spec.promise,
                previous=previous,
                memory=read_memory(ws),
                reply=spec.reply if iteration == spec.iterations_done + 1 else None,
            )

        async def tagged(events: list[m.Event], n=iteration) -> None:
            await emit([msgspec.structs.replace(e, iteration=n) for e in events])

        await tagged([m.IterationEvent(why="start" if iteration == 1 else "continue")])
        run = await run_claude(
            claude=claude,
            prompt=prompt,
            workspace=ws,
            user=user,
            api_url=api_url,
            api_key=start.api_key,
            model=spec.model,
            max_turns=spec.max_turns,
            emit=tagged,
            cancel=cancel.event,
        )
        res = run.parser.result
        exit_code = run.exit_code
        if res is not None:
            usage, turns = usage + res.usage, turns + res.num_turns
            claude_usage = usage
        final = (res.result if res else "") or run.parser.last_text
        await commit_all(
            user, ws, f"marathon: task {spec.task_id} iteration {iteration}\n\n{loop.tail(spec.prompt, 500)}"
        )
        if cancel.event.is_set():
            state, reason, message = (
                m.stopped_state(cancel.reason or "cancelled"),
                cancel.reason or "cancelled",
                f"stopped: {cancel.reason}",
            )
            break
        if res is None:
            state, reason = "failed", "agent_error"
            message = f"Claude Code exited with {run.exit_code} without a result: {run.stderr_tail[-500:]}"
            break
        if res.subtype == "error_max_turns":
            state, reason, message = (
                "failed",
                "max_turns",
                f"reached --max-turns {spec.max_turns} in iteration {iteration}",
            )
            break
        if res.is_error or run.exit_code != 0:
            state, reason, message = "failed", "claude_error", (res.result or run.stderr_tail)[-500:]
            break
        question = loop.clarification(final)
        if question:
            state, reason, message = "needs_input", "clarification", question
            break
        previous = loop.Previous(final_message=final)
        if not loop.promise_kept(final, spec.promise):
            continue
        if spec.verify is None:
            state, reason, message = "succeeded", None, None
            break
        code, out = await run_verify(user, ws, spec.verify, spec.verify_timeout)
        await tagged(
            [
                m.LogEvent(
                    message=f"check `{spec.verify}` exited {code}: {loop.tail(out, 300)}",
                    source="agent",
                    level="info" if code == 0 else "warning",
                )
            ]
        )
        if code == 0:
            state, reason, message = "succeeded", None, None
            break
        previous = loop.Previous(final_message=final, verify_cmd=spec.verify, verify_code=code, verify_output=out)
    else:
        what = (
            f"the check `{spec.verify}` never passed"
            if spec.verify and previous.verify_code
            else (f"no <promise>{spec.promise}</promise>" if spec.promise is not None else "not done")
        )
        message = f"{spec.max_iterations} iteration(s) ended with {what}"

    try:
        out = await finish_work(user, ws, base, spec, result_bundle)
    except MarathonError as exc:
        out = {"diff_stat": f"(work unavailable: {exc})"}
    return m.TaskOutcome(
        state=state,
        reason=reason,
        message=message,
        exit_code=exit_code,
        is_error=state == "failed",
        num_turns=turns,
        usage=usage,
        claude_usage=claude_usage,
        duration_s=time.monotonic() - t0,
        final_text=final[-4000:],
        iterations=iteration,
        memory=read_memory(ws),
        **out,
    )


async def finish_work(user: RunUser, ws: str, base: str, spec: m.TaskSpec, result_bundle: str) -> dict:
    head = (await run_git(user, ws, "rev-parse", "HEAD")).strip()
    subject = (await run_git(user, ws, "log", "-1", "--format=%s", "HEAD")).strip()
    commits = int((await run_git(user, ws, "rev-list", "--count", f"{base}..HEAD")).strip() or 0)
    diff = await run_git(user, ws, "diff", "--binary", base, "HEAD")
    if len(diff) > DIFF_CAP:  # the commits carry the whole work; the diff is for reading
        diff = diff[:DIFF_CAP] + f"\n… diff truncated at {DIFF_CAP} bytes: `marathon fetch` has every commit\n"
    stat = (await run_git(user, ws, "diff", "--stat", base, "HEAD")).strip()
    has_bundle = False
    if commits:
        # straight from git's stdout into our own file: no path the sandbox user could swap
        await run_git_to_file(
            user, ws, result_bundle, "bundle", "create", "--quiet", "-", f"{base}..refs/heads/{spec.work_branch}"
        )
        has_bundle = True
    return {
        "diff": diff,
        "diff_stat": stat,
        "commits": commits,
        "head": head,
        "head_subject": subject,
        "branch": spec.work_branch,
        "has_bundle": has_bundle,
    }
