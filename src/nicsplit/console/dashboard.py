"""The web dashboard at ``GET /`` (docs/operations.md "Dashboard").

Static files only (``static/``: index.html, app.js, style.css; no CDN, no
build step): the page holds no data and needs no token to load; its script
reads the token from the URL fragment (``#token=...``, never sent to the
server) or a login box, keeps it in sessionStorage and calls the REST API
with it. The Content-Security-Policy allows this origin's scripts, styles
and API only, so nothing the API returns can run as code.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

__all__ = ["setup", "STATIC"]

STATIC = Path(__file__).resolve().parent / "static"

HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


async def index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC / "index.html", headers=HEADERS)


def setup(app: web.Application) -> None:
    app.router.add_get("/", index)
    app.router.add_static("/static/", STATIC, show_index=False, follow_symlinks=False)
