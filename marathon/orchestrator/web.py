"""The web dashboard: the static files in marathon/web, served at / by the orchestrator.

The page is plain JavaScript modules and CSS (no build step); it talks to the same /v1 API as
the CLI, with the user's token in an Authorization header.  Its Content-Security-Policy lets
it load and connect to this origin only: no CDN, no external request, no inline script.
"""

from __future__ import annotations

import hashlib
import logging
import os

from quart import Blueprint, Response, request

import marathon

log = logging.getLogger("marathon.web")
WEB_DIR = os.path.join(os.path.dirname(os.path.abspath(marathon.__file__)), "web")
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".json": "application/json",
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",  # revalidate every time (ETag): a new version is seen at once
}


class Asset:
    __slots__ = ("data", "content_type", "etag")

    def __init__(self, data: bytes, content_type: str):
        self.data, self.content_type = data, content_type
        self.etag = '"' + hashlib.sha256(data).hexdigest()[:20] + '"'


def load_assets(root: str = WEB_DIR) -> dict[str, Asset]:
    """Every file of the dashboard, read once at start (they are small)."""
    assets: dict[str, Asset] = {}
    if not os.path.isdir(root):
        return assets
    for name in sorted(os.listdir(root)):
        ext = os.path.splitext(name)[1]
        path = os.path.join(root, name)
        if ext in TYPES and os.path.isfile(path):
            with open(path, "rb") as f:
                assets[name] = Asset(f.read(), TYPES[ext])
    return assets


def web_blueprint(root: str = WEB_DIR) -> Blueprint:
    assets = load_assets(root)
    if "index.html" not in assets:
        log.warning("the web dashboard's files are not in %s: / answers 404", root)
    bp = Blueprint("web", __name__)

    def serve(name: str) -> Response:
        asset = assets.get(name)
        if asset is None:
            return Response("not found\n", status=404, content_type="text/plain; charset=utf-8", headers=HEADERS)
        headers = {**HEADERS, "ETag": asset.etag}
        if asset.etag in request.headers.get("If-None-Match", ""):
            return Response(b"", status=304, headers=headers)
        return Response(asset.data, content_type=asset.content_type, headers=headers)

    @bp.get("/")
    async def index():
        return serve("index.html")

    @bp.get("/ui/<name>")
    async def asset(name: str):
        return serve(name)

    @bp.get("/favicon.ico")
    async def favicon():
        return serve("favicon.svg")

    return bp
