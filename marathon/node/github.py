"""Opening pull requests through the GitHub REST API (or GitHub Enterprise's)."""

from __future__ import annotations

import httpx

from marathon.errors import MarathonError


class GitHubError(MarathonError):
    code = "github_error"


async def open_pull_request(
    *,
    api_url: str,
    token: str | None,
    owner: str,
    repo: str,
    head: str,
    base: str,
    title: str,
    body: str,
    timeout: float = 30.0,
) -> str:
    """POST /repos/{owner}/{repo}/pulls; returns the PR's html_url."""
    if not token:
        raise GitHubError("no GitHub token: set yours with `marathon github-token`")
    headers = {
        "Authorization": f"Bearer {token}",
        "Accept": "application/vnd.github+json",
        "X-GitHub-Api-Version": "2022-11-28",
        "User-Agent": "marathon",
    }
    url = f"{api_url.rstrip('/')}/repos/{owner}/{repo}/pulls"
    try:
        async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
            r = await client.post(url, headers=headers, json={"title": title, "head": head, "base": base, "body": body})
    except httpx.HTTPError as exc:
        raise GitHubError(f"GitHub API unreachable: {type(exc).__name__}: {exc}") from None
    if r.status_code == 201:
        return r.json()["html_url"]
    try:
        data = r.json()
        msg = data.get("message", "")
        details = "; ".join(
            e.get("message") or e.get("code", "") for e in data.get("errors", []) if isinstance(e, dict)
        )
    except ValueError:
        msg, details = r.text[:200], ""
    raise GitHubError(f"GitHub answered {r.status_code}: {msg}{f' ({details})' if details else ''}")
