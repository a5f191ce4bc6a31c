"""Repositories on the node: a mirror cache per node, bundles in and out, pushes.

The sandbox never sees a remote, a credential or the cache: the node turns the repository
into a git bundle, the agent clones from it, and the agent's commits come back as a bundle.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from urllib.parse import urlparse

import trio

from marathon import repos
from marathon.errors import RepoError

GIT_ENV = {
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_CONFIG_NOSYSTEM": "1",  # no host-wide config (credential helpers, url rewrites)
    "GIT_SSH_COMMAND": "ssh -o BatchMode=yes -o StrictHostKeyChecking=accept-new",
    "GIT_AUTHOR_NAME": "Marathon",
    "GIT_AUTHOR_EMAIL": "marathon@localhost",
    "GIT_COMMITTER_NAME": "Marathon",
    "GIT_COMMITTER_EMAIL": "marathon@localhost",
    "LANG": "C.UTF-8",
}
_home = {"path": ""}  # the node's git HOME (set_home): empty unless the operator gives one (git_home)


def set_home(path: str, *, managed: bool = True) -> None:
    """HOME for every git the node runs: ``git_home`` (the operator's ssh keys and config), else an
    empty directory — never the node user's own HOME, keys, agent or credential helpers."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    _home["path"] = path
    config = os.path.join(path, ".gitconfig")
    if managed and not os.path.exists(config):  # our own empty HOME (not an operator's git_home): local repositories an
        with open(config, "w") as f:  # administrator names may belong to another user than the node
            f.write("[safe]\n\tdirectory = *\n")


def base_env() -> dict[str, str]:
    home = _home["path"] or "/nonexistent"
    return {"PATH": os.environ.get("PATH") or "/usr/local/bin:/usr/bin:/bin", "HOME": home, **GIT_ENV}


@dataclass(frozen=True)
class RepoRef:
    url: str  # what git fetches from (and pushes to)
    github: tuple[str, str] | None = None  # (owner, name) when the repository lives on the GitHub host
    local: bool = False


def resolve_repo(repo: str, github_url: str = "https://github.com", *, private: tuple[str, ...] = (),
                 trusted: bool = True) -> RepoRef:  # fmt: skip
    """A URL, ``owner/name`` on the GitHub host (always), or — for administrators only — an
    absolute path or file:// URL on this node, never one inside ``private`` (the node's own
    state: other tasks' mirrors and workspaces).  The rule is ``marathon.repos.classify``."""
    gh = github_url.rstrip("/")
    kind = repos.classify(repo)
    if kind == "github":
        m = repos.OWNER_NAME.match(repo)
        assert m is not None
        return RepoRef(f"{gh}/{m.group(1)}/{m.group(2)}.git", (m.group(1), m.group(2)))
    if kind == "url":
        if repo.startswith(gh + "/"):
            m = repos.OWNER_NAME.match(repo[len(gh) + 1 :])
            return RepoRef(repo, (m.group(1), m.group(2)) if m else None)
        return RepoRef(repo)
    if not trusted:
        raise RepoError(f"repository {repo!r}: local paths are for administrators; use a URL or owner/name")
    if kind == "relative":
        raise RepoError(f"repository {repo!r} is a relative path; give an absolute one")
    path = os.path.realpath(repos.local_path(repo))
    for p in private:
        root = os.path.realpath(p)
        if path == root or path.startswith(root.rstrip("/") + "/"):
            raise RepoError(f"repository {repo!r} is inside the node's own state; refused")
    if not os.path.isdir(path):
        raise RepoError(f"repository {repo!r} does not exist on this node")
    return RepoRef(repo if repo.startswith("file://") else path, local=True)


def config_env(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """git configuration as environment variables (never in a URL, a file or a command line)."""
    if not pairs:
        return {}
    env = {"GIT_CONFIG_COUNT": str(len(pairs))}
    for i, (k, v) in enumerate(pairs):
        env[f"GIT_CONFIG_KEY_{i}"], env[f"GIT_CONFIG_VALUE_{i}"] = k, v
    return env


def auth_config(url: str, token: str | None) -> list[tuple[str, str]]:
    """Credentials for an https remote, as an extra header."""
    if not token or not url.startswith("https://"):
        return []
    p = urlparse(url)
    basic = base64.b64encode(f"x-access-token:{token}".encode()).decode()
    return [(f"http.{p.scheme}://{p.netloc}/.extraheader", f"Authorization: Basic {basic}")]


def auth_env(url: str, token: str | None) -> dict[str, str]:
    return config_env(auth_config(url, token))


def untrusted_config(url: str, addresses: list[str]) -> list[tuple[str, str]]:
    """For a repository a non-administrator named: only network transports, no redirects (a
    redirect could lead to the node's own services), and the host pinned to the public
    addresses that were checked (so a second DNS answer cannot point elsewhere)."""
    pairs = [("protocol.allow", "never"), ("protocol.https.allow", "always"), ("protocol.http.allow", "always"),
             ("protocol.ssh.allow", "always"), ("protocol.git.allow", "always"), ("http.followRedirects", "false")]  # fmt: skip
    host, port, scheme = repos.url_host(url)
    if addresses and scheme in ("http", "https"):
        port = port or (443 if scheme == "https" else 80)
        pinned = ",".join(f"[{a}]" if ":" in a else a for a in addresses)
        pairs.append(("http.curloptResolve", f"{host}:{port}:{pinned}"))
    return pairs


async def git(*args: str, cwd: str | None = None, env: dict | None = None, timeout: float = 600) -> str:
    full_env = {**base_env(), **(env or {})}
    with trio.move_on_after(timeout) as scope:
        res = await trio.run_process(
            ["git", *args], cwd=cwd, capture_stdout=True, capture_stderr=True, check=False, env=full_env,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
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

    async def ensure(self, url: str, *, token: str | None = None,
                     config: list[tuple[str, str]] | tuple[()] = ()) -> tuple[str, bool]:  # fmt: skip
        """The mirror's path, and whether it was already cached."""
        path = self.path_for(url)
        lock = self._locks.setdefault(path, trio.Lock())
        env = config_env([*config, *auth_config(url, token)])
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


async def push_result(mirror: str, url: str, result_bundle: str, work_branch: str, token: str | None,
                      config: list[tuple[str, str]] | tuple[()] = ()) -> None:  # fmt: skip
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
            env=config_env([*config, *auth_config(url, token)]),
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
