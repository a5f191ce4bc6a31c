"""Repositories on the node: a mirror cache per node, bundles in and out, pushes.

The sandbox never sees a remote, a credential or the cache: the node turns the repository
into a git bundle, the agent clones from it, and the agent's commits come back as a bundle.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from urllib.parse import urlparse

import trio

from marathon.errors import RepoError

GIT_ENV = {
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_AUTHOR_NAME": "Marathon",
    "GIT_AUTHOR_EMAIL": "marathon@localhost",
    "GIT_COMMITTER_NAME": "Marathon",
    "GIT_COMMITTER_EMAIL": "marathon@localhost",
    "LANG": "C.UTF-8",
}
_URLISH = re.compile(r"^(https?|ssh|git|file)://|^[\w.-]+@[\w.-]+:")
_OWNER_NAME = re.compile(r"^([\w.-]+)/([\w.-]+?)(?:\.git)?$")


@dataclass(frozen=True)
class RepoRef:
    url: str  # what git fetches from (and pushes to)
    github: tuple[str, str] | None = None  # (owner, name) when the repository lives on the GitHub host


def resolve_repo(repo: str, github_url: str = "https://github.com", *, private: tuple[str, ...] = ()) -> RepoRef:
    """A URL, ``owner/name`` on the GitHub host, or a local path — never one inside ``private``
    (the node's own state: other tasks' mirrors and workspaces)."""
    gh = github_url.rstrip("/")
    local = repo[len("file://") :] if repo.startswith("file://") else None if _URLISH.match(repo) else repo
    if local is not None and not (_OWNER_NAME.match(repo) and not os.path.exists(repo) and not repo.startswith(".")):
        real = os.path.realpath(os.path.expanduser(local))
        for p in private:
            root = os.path.realpath(p)
            if real == root or real.startswith(root.rstrip("/") + "/"):
                raise RepoError(f"repository {repo!r} is inside the node's own state; refused")
    if _URLISH.match(repo):
        if repo.startswith(gh + "/"):
            m = _OWNER_NAME.match(repo[len(gh) + 1 :])
            return RepoRef(repo, (m.group(1), m.group(2)) if m else None)
        return RepoRef(repo)
    m = _OWNER_NAME.match(repo)
    if m and not os.path.exists(repo) and not repo.startswith("."):
        return RepoRef(f"{gh}/{m.group(1)}/{m.group(2)}.git", (m.group(1), m.group(2)))
    path = os.path.abspath(os.path.expanduser(repo))
    if not os.path.isdir(path):
        raise RepoError(f"repository {repo!r} does not exist on this node")
    return RepoRef(path)


def auth_env(url: str, token: str | None) -> dict[str, str]:
    """Credentials for an https remote, as git config in the environment (never in a URL,
    a file or a command line)."""
    if not token or not url.startswith("https://"):
        return {}
    p = urlparse(url)
    basic = base64.b64encode(f"x-access-token:{token}".encode()).decode()
    return {
        "GIT_CONFIG_COUNT": "1",
        "GIT_CONFIG_KEY_0": f"http.{p.scheme}://{p.netloc}/.extraheader",
        "GIT_CONFIG_VALUE_0": f"Authorization: Basic {basic}",
    }


async def git(*args: str, cwd: str | None = None, env: dict | None = None, timeout: float = 600) -> str:
    full_env = {**os.environ, **GIT_ENV, **(env or {})}
    with trio.move_on_after(timeout) as scope:
        res = await trio.run_process(
            ["git", *args], cwd=cwd, capture_stdout=True, capture_stderr=True, check=False, env=full_env
        )
    if scope.cancelled_caught:
        raise RepoError(f"git {args[0]} timed out after {timeout:.0f}s")
    if res.returncode != 0:
        err = res.stderr.decode(errors="replace").strip()[-500:]
        for secret in (env or {}).values():
            if "Authorization" in secret:
                err = err.replace(secret, "***")
        raise RepoError(f"git {args[0]} failed: {err}")
    return res.stdout.decode(errors="replace")


class MirrorCache:
    """``git clone --mirror`` once per repository, ``git fetch`` on every later use."""

    def __init__(self, root: str):
        self.root = root
        self._locks: dict[str, trio.Lock] = {}
        self.clones = 0
        self.fetches = 0

    def path_for(self, url: str) -> str:
        return os.path.join(self.root, hashlib.sha256(url.encode()).hexdigest()[:20] + ".git")

    async def ensure(self, url: str, *, token: str | None = None) -> tuple[str, bool]:
        """The mirror's path, and whether it was already cached."""
        path = self.path_for(url)
        lock = self._locks.setdefault(path, trio.Lock())
        env = auth_env(url, token)
        async with lock:
            if os.path.isdir(path):
                await git("-C", path, "fetch", "--prune", "--quiet", "origin", env=env)
                await git("-C", path, "repack", "-d", "--quiet")  # only what the fetch left loose
                self.fetches += 1
                return path, True
            os.makedirs(self.root, mode=0o700, exist_ok=True)
            tmp = path + ".partial"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                await git("clone", "--mirror", "--quiet", "--", url, tmp, env=env)
            except RepoError:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            # one pack, so bundles reuse compressed objects instead of compressing them again
            await git("-C", tmp, "repack", "-a", "-d", "--quiet")
            os.rename(tmp, path)
            self.clones += 1
            return path, False


async def default_branch(repo: str) -> str:
    try:
        return (await git("-C", repo, "symbolic-ref", "--short", "HEAD")).strip()
    except RepoError:
        return "main"


async def rev(repo: str, ref: str) -> str:
    try:
        return (await git("-C", repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")).strip()
    except RepoError:
        raise RepoError(f"branch {ref.removeprefix('refs/heads/')!r} does not exist in the repository") from None


async def make_bundle(
    mirror: str, branch: str, out: str, *, resume: str | None = None, work_branch: str | None = None
) -> str:
    """Bundle ``branch`` (and, when resuming, the work branch from the previous result bundle)
    into ``out``; returns the base commit."""
    base = await rev(mirror, f"refs/heads/{branch}")
    if resume is None:
        # the bundle of a branch head is the same for every task: made once, then linked
        cached = os.path.join(
            mirror, "marathon-bundles", f"{hashlib.sha256(branch.encode()).hexdigest()[:12]}-{base}.bundle"
        )
        if not os.path.exists(cached):
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            tmp = f"{cached}.{os.getpid()}-{id(out)}.tmp"
            await git("-C", mirror, "bundle", "create", "--quiet", tmp, f"refs/heads/{branch}")
            os.replace(tmp, cached)
            prefix = os.path.basename(cached).split("-")[0] + "-"
            for old in os.listdir(os.path.dirname(cached)):
                if old.startswith(prefix) and old.endswith(".bundle") and old != os.path.basename(cached):
                    os.unlink(os.path.join(os.path.dirname(cached), old))
        try:
            os.link(cached, out)
        except OSError:
            shutil.copyfile(cached, out)
        return base
    scratch = out + ".git"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        await git("clone", "--bare", "--shared", "--quiet", "--single-branch", "--branch", branch, mirror, scratch)
        await git("-C", scratch, "fetch", "--quiet", resume, f"refs/heads/{work_branch}:refs/heads/{work_branch}")
        await git("-C", scratch, "bundle", "create", out, f"refs/heads/{branch}", f"refs/heads/{work_branch}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return base


async def empty_repo_bundle(scratch: str, out: str) -> tuple[str, str]:
    """A repository with one empty commit on ``main``, for tasks without --repo."""
    await git("init", "--quiet", "-b", "main", scratch)
    await git("-C", scratch, "commit", "--quiet", "--allow-empty", "-m", "empty workspace")
    await git("-C", scratch, "bundle", "create", out, "refs/heads/main")
    return (await git("-C", scratch, "rev-parse", "HEAD")).strip(), "main"


async def push_result(mirror: str, url: str, result_bundle: str, work_branch: str, token: str | None) -> None:
    """Push the work branch from the agent's result bundle to the repository's remote."""
    scratch = result_bundle + ".push.git"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        await git("init", "--bare", "--quiet", scratch)
        with open(os.path.join(scratch, "objects", "info", "alternates"), "w") as f:
            f.write(os.path.join(os.path.abspath(mirror), "objects") + "\n")
        await git(
            "-C", scratch, "fetch", "--quiet", result_bundle, f"refs/heads/{work_branch}:refs/heads/{work_branch}"
        )
        await git(
            "-C",
            scratch,
            "push",
            "--quiet",
            url,
            f"refs/heads/{work_branch}:refs/heads/{work_branch}",
            env=auth_env(url, token),
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
