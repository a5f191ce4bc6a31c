"""The repository side of a task on the node: the bundle the workspace starts from, and
after the task, the push and the pull request.  Credentials never leave this module's git
processes (environment only)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from marathon import repos
from marathon.config import Config
from marathon.errors import MarathonError, RepoError
from marathon.node.git import (
    MirrorCache,
    default_branch,
    empty_repo_bundle,
    make_bundle,
    push_result,
    RepoRef,
    resolve_repo,
    untrusted_config,
)
from marathon.node.github import open_pull_request
from marathon.protocol import messages as m


@dataclass
class Prepared:
    bundle: str
    branch: str  # the branch the work starts from
    base: str  # its commit
    ref: RepoRef | None
    mirror: str | None
    cached: bool
    git_config: list[tuple[str, str]] = field(default_factory=list)  # restrictions for a non-administrator's remote


async def prepare(
    spec: m.TaskSpec, config: Config, cache: MirrorCache, root: str, *, token: str | None, resume_bundle: str | None
) -> Prepared:
    bundle = os.path.join(root, "repo.bundle")
    if not spec.request.repo:
        base, branch = await empty_repo_bundle(os.path.join(root, "empty.git"), bundle)
        return Prepared(bundle, branch, base, None, None, False)
    ref = resolve_repo(spec.request.repo, config.github_url, private=(config.data_dir,), trusted=spec.trusted_repo)
    git_config = await remote_config(ref, spec, config)
    mirror, cached = await cache.ensure(ref.url, token=token, config=git_config)
    branch = spec.request.branch or await default_branch(mirror)
    base = await make_bundle(mirror, branch, bundle, resume=resume_bundle, work_branch=spec.work_branch)
    return Prepared(bundle, branch, base, ref, mirror, cached, git_config)


async def remote_config(ref: RepoRef, spec: m.TaskSpec, config: Config) -> list[tuple[str, str]]:
    """A non-administrator's remote is checked on the node too (its network is not the
    orchestrator's): public addresses only, unless allow-listed, pinned for the clone."""
    if ref.local:
        return []
    if spec.trusted_repo or repos.classify(spec.request.repo or "") == "github":
        return []
    try:
        addresses = await repos.check_remote(ref.url, config.repo_hosts)
    except repos.RemoteRefused as exc:
        raise RepoError(str(exc)) from None
    return untrusted_config(ref.url, addresses)


def pr_body(spec: m.TaskSpec, out: m.TaskOutcome, usage: m.Usage, cost_usd: float) -> str:
    prompt = spec.request.prompt if len(spec.request.prompt) <= 4000 else spec.request.prompt[:4000] + "…"
    return (
        f"Opened by Marathon for task `{spec.task_id}`.\n\n"
        f"- iterations: {out.iterations}\n"
        f"- usage: {usage.total:,} tokens (input {usage.input_tokens:,}, output {usage.output_tokens:,}, "
        f"cache write {usage.cache_creation_input_tokens:,}, cache read {usage.cache_read_input_tokens:,})\n"
        f"- cost: ${cost_usd:.4f}\n\n"
        f"### Prompt\n\n{prompt}\n"
    )


async def publish(
    prep: Prepared,
    spec: m.TaskSpec,
    out: m.TaskOutcome,
    result_bundle: str,
    config: Config,
    *,
    token: str | None,
    usage: m.Usage,
    cost_usd: float,
) -> tuple[str | None, str | None]:
    """Push the work branch and open the pull request: (pr_url, error).  Never raises."""
    if prep.ref is None or prep.mirror is None:
        return None, "--pr needs --repo"
    if not out.commits or not out.has_bundle:
        return None, "no commits to open a pull request with"
    try:
        await push_result(prep.mirror, prep.ref.url, result_bundle, spec.work_branch, token, prep.git_config)
    except RepoError as exc:
        return None, f"push failed: {exc}"
    if prep.ref.github is None:
        return None, f"pushed {spec.work_branch}; no pull request: {prep.ref.url} is not on {config.github_url}"
    owner, name = prep.ref.github
    title = spec.request.pr_title or out.head_subject or f"Marathon: {spec.request.prompt.splitlines()[0][:70]}"
    try:
        url = await open_pull_request(
            api_url=config.github_api_url,
            token=token,
            owner=owner,
            repo=name,
            head=spec.work_branch,
            base=spec.request.base or prep.branch,
            title=title,
            body=pr_body(spec, out, usage, cost_usd),
        )
    except MarathonError as exc:
        return None, str(exc)
    return url, None
