"""The REST API under ``/api/v1`` (docs/operations.md "REST API").

Each handler calls the same `nicsplit.control.ops` function as the CLI
command, in a worker thread (they do blocking IO), and returns its JSON
document. A domain error (`nicsplit.control.ops.DOMAIN_ERRORS`) is a 400 with
``{"error": MESSAGE}``; a malformed body is a 400 too.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from aiohttp import web

from nicsplit.control import ops
from nicsplit.control.status import system_status
from nicsplit.core.config import Config
from nicsplit.recovery.select import Selector

__all__ = ["setup", "CFG"]

CFG = web.AppKey("cfg", Config)


def _error(status: type[web.HTTPException], message: str) -> web.HTTPException:
    return status(text=web.json_response({"error": message}).text, content_type="application/json")


async def _call(fn: Callable[..., dict], *args: Any, **kw: Any) -> web.Response:
    try:
        return web.json_response(await asyncio.to_thread(fn, *args, **kw))
    except ops.DOMAIN_ERRORS as e:
        raise _error(web.HTTPBadRequest, str(e)) from None


async def _body(request: web.Request) -> dict:
    try:
        body = await request.json() if request.can_read_body else {}
    except ValueError:
        raise _error(web.HTTPBadRequest, "the body is not JSON") from None
    if not isinstance(body, dict):
        raise _error(web.HTTPBadRequest, "the body must be a JSON object")
    return body


def selector(body: dict) -> Selector:
    """The PIT a body names: exactly one of ``at`` (TIME), ``seq``, ``bookmark``, ``latest: true``."""
    given = [k for k in ("at", "seq", "bookmark", "latest") if body.get(k) not in (None, False)]
    if len(given) != 1:
        raise _error(web.HTTPBadRequest, "name the point in time with exactly one of at, seq, bookmark, latest")
    seq = body.get("seq")
    if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool) or seq < 1):
        raise _error(web.HTTPBadRequest, f"bad sequence number {seq!r}")
    return Selector(at=body.get("at"), seq=seq, bookmark=body.get("bookmark"), latest=bool(body.get("latest")))


async def get_status(request: web.Request) -> web.Response:
    return await _call(system_status, request.app[CFG])


async def get_pits(request: web.Request) -> web.Response:
    return await _call(ops.pits_doc, request.app[CFG], request.match_info["cg"],
                       every=request.query.get("all", "") in ("1", "true"))


async def post_bookmark(request: web.Request) -> web.Response:
    body = await _body(request)
    name = body.get("name")
    if not isinstance(name, str):
        raise _error(web.HTTPBadRequest, "a bookmark needs a name")
    return await _call(ops.bookmark_doc, request.app[CFG], request.match_info["cg"], name,
                       lock=bool(body.get("lock")), seq=body.get("seq"))


async def get_images(request: web.Request) -> web.Response:
    return await _call(ops.images_doc, request.app[CFG])


async def post_image(request: web.Request) -> web.Response:
    body = await _body(request)
    cg = body.get("cg")
    if not isinstance(cg, str):
        raise _error(web.HTTPBadRequest, "an image needs a cg")
    return await _call(ops.export_doc, request.app[CFG], cg, selector(body), writable=bool(body.get("writable")))


async def delete_image(request: web.Request) -> web.Response:
    return await _call(ops.close_doc, request.app[CFG], request.match_info["id"])


def setup(app: web.Application) -> None:
    r = app.router
    r.add_get("/api/v1/status", get_status)
    r.add_get("/api/v1/cgs/{cg}/pits", get_pits)
    r.add_post("/api/v1/cgs/{cg}/bookmarks", post_bookmark)
    r.add_get("/api/v1/images", get_images)
    r.add_post("/api/v1/images", post_image)
    r.add_delete("/api/v1/images/{id}", delete_image)
