"""The REST API under ``/api/v1`` (docs/operations.md "REST API"; the
OpenAPI document, `nicsplit.console.openapi`, is served at
``/api/v1/openapi.json``).

Each handler checks its body, calls the same `nicsplit.control.ops`
function as the CLI command, in a worker thread (they do blocking IO), and
returns its JSON document. Errors are ``{"error": MESSAGE}``:

- 400: a malformed body (not JSON, not an object, an unknown key, a value of
  the wrong type) or a domain error (`nicsplit.control.ops.DOMAIN_ERRORS`);
- 404: a domain error that is a `nicsplit.core.errors.NotFound` (unknown CG,
  vdisk, bookmark, image);
- 409: one that is a `nicsplit.core.errors.Conflict` (a name taken, a CG
  already failed over, the datastore in use);
- 500: anything else, logged with its traceback; the reply says only that.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Any, Callable

from aiohttp import web

from nicsplit.console.openapi import document
from nicsplit.control import ops
from nicsplit.control.status import system_status
from nicsplit.core.config import Config
from nicsplit.core.errors import Conflict, NotFound
from nicsplit.recovery.select import Selector, parse_time

__all__ = ["setup", "CFG", "selector"]

log = logging.getLogger(__name__)

CFG = web.AppKey("cfg", Config)

SELECTOR_KEYS = ("at", "seq", "bookmark", "latest")


def _error(status: type[web.HTTPException], message: str) -> web.HTTPException:
    return status(text=json.dumps({"error": message}), content_type="application/json")


async def _call(fn: Callable[..., dict], *args: Any, status: int = 200, **kw: Any) -> web.Response:
    try:
        return web.json_response(await asyncio.to_thread(fn, *args, **kw), status=status)
    except ops.DOMAIN_ERRORS as e:
        kind = web.HTTPNotFound if isinstance(e, NotFound) else web.HTTPConflict if isinstance(e, Conflict) \
            else web.HTTPBadRequest
        raise _error(kind, str(e)) from None
    except OSError as e:
        if e.filename is None:
            log.exception("%s failed", fn.__name__)
            raise _error(web.HTTPInternalServerError, f"{fn.__name__}: {e.strerror or e}") from None
        # most likely a path the request named (restore's "to"): said as the CLI says it, and logged
        log.warning("%s: %s", fn.__name__, e)
        raise _error(web.HTTPBadRequest, f"{e.strerror or e}: {e.filename}") from None
    except Exception:
        log.exception("%s failed", fn.__name__)
        raise _error(web.HTTPInternalServerError, "internal error (the console's log has the details)") from None


async def _body(request: web.Request, allowed: tuple[str, ...]) -> dict:
    """The request's JSON object; only ``allowed`` keys (a typo is an error, not a default)."""
    try:
        body = await request.json() if request.can_read_body else {}
    except ValueError:
        raise _error(web.HTTPBadRequest, "the body is not JSON") from None
    if not isinstance(body, dict):
        raise _error(web.HTTPBadRequest, "the body must be a JSON object")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise _error(web.HTTPBadRequest, f"unknown key(s) {', '.join(unknown)} (this route takes: "
                                         f"{', '.join(allowed) or 'no body'})")
    return body


def _typed(body: dict, key: str, kinds: tuple[type, ...], what: str, *, required: bool = False,
           default: Any = None) -> Any:
    value = body.get(key)
    if value is None:
        if required:
            raise _error(web.HTTPBadRequest, f"{key!r} is required ({what})")
        return default
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise _error(web.HTTPBadRequest, f"{key!r} must be {what}, not {json.dumps(value)}")
    return value


def _str(body: dict, key: str, *, required: bool = False) -> str | None:
    return _typed(body, key, (str,), "a string", required=required)


def _flag(body: dict, key: str) -> bool:
    return bool(_typed(body, key, (bool,), "true or false", default=False))


def _number(body: dict, key: str, default: float) -> float:
    return float(_typed(body, key, (int, float), "a number", default=default))


def _given(body: dict) -> list[str]:
    """The selector keys a body sets (``latest: false`` sets nothing; ``seq: 0`` does)."""
    return [k for k in SELECTOR_KEYS if body.get(k) is not None and body.get(k) is not False]


def selector(body: dict) -> Selector:
    """The PIT a body names: exactly one of ``at`` (TIME: a string, or
    seconds since the epoch), ``seq``, ``bookmark``, ``latest: true``."""
    if len(_given(body)) != 1:
        raise _error(web.HTTPBadRequest, "name the point in time with exactly one of at, seq, bookmark, latest")
    seq = body.get("seq")
    if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool) or seq < 1):
        raise _error(web.HTTPBadRequest, f"bad sequence number {json.dumps(seq)}: a journal seq is an integer >= 1")
    at = _typed(body, "at", (str, int, float), "TIME: seconds since the epoch, ISO 8601, 'now' or -N[smhd]")
    if at is not None:
        try:
            parse_time(str(at))  # a bad TIME is bad input, whatever else the CG lacks
        except ops.DOMAIN_ERRORS as e:
            raise _error(web.HTTPBadRequest, str(e)) from None
    if body.get("latest") not in (None, True):
        raise _error(web.HTTPBadRequest, "'latest' must be true")
    return Selector(at=None if at is None else str(at), seq=seq, bookmark=_str(body, "bookmark"),
                    latest=bool(body.get("latest")))


def _cfg(request: web.Request) -> Config:
    return request.app[CFG]


# -- status, documentation ---------------------------------------------------------------


async def get_status(request: web.Request) -> web.Response:
    return await _call(system_status, _cfg(request))


async def get_openapi(request: web.Request) -> web.Response:
    return web.json_response(document())


# -- consistency groups and vdisks --------------------------------------------------------


async def get_cgs(request: web.Request) -> web.Response:
    return await _call(ops.cgs_doc, _cfg(request))


async def post_cg(request: web.Request) -> web.Response:
    body = await _body(request, ("name",))
    return await _call(ops.cg_create_doc, _cfg(request), _str(body, "name", required=True), status=201)


async def post_cg_vdisk(request: web.Request) -> web.Response:
    body = await _body(request, ("vdisk",))
    return await _call(ops.cg_add_doc, _cfg(request), request.match_info["cg"], _str(body, "vdisk", required=True))


async def get_vdisks(request: web.Request) -> web.Response:
    return await _call(ops.vdisks_doc, _cfg(request))


async def post_vdisk(request: web.Request) -> web.Response:
    body = await _body(request, ("name", "size", "owner", "readonly", "cg"))
    size = _typed(body, "size", (int, str), "bytes or a size such as \"64M\"", required=True)
    return await _call(ops.vdisk_create_doc, _cfg(request), _str(body, "name", required=True), size,
                       owner=_str(body, "owner"), readonly=_flag(body, "readonly"), cg=_str(body, "cg"), status=201)


async def delete_vdisk(request: web.Request) -> web.Response:
    await _body(request, ())
    return await _call(ops.vdisk_delete_doc, _cfg(request), request.match_info["vdisk"])


# -- points in time and bookmarks --------------------------------------------------------


async def get_pits(request: web.Request) -> web.Response:
    every = request.query.get("all", "0")
    if every not in ("1", "true", "0", "false"):
        raise _error(web.HTTPBadRequest, f"all={every!r}: use all=1 or all=true (or 0, false)")
    return await _call(ops.pits_doc, _cfg(request), request.match_info["cg"], every=every in ("1", "true"))


async def get_bookmarks(request: web.Request) -> web.Response:
    return await _call(ops.bookmarks_doc, _cfg(request), request.match_info["cg"])


async def post_bookmark(request: web.Request) -> web.Response:
    body = await _body(request, ("name", "lock", "seq", "quiesce", "thaw", "hook_timeout"))
    name = _str(body, "name", required=True)
    seq = body.get("seq")
    if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool) or seq < 1):
        raise _error(web.HTTPBadRequest, f"bad sequence number {json.dumps(seq)}: a journal seq is an integer >= 1")
    quiesce = body.get("quiesce")  # true: the CG's configured [hooks.CG]; a string: that pre command
    if quiesce is not None and not isinstance(quiesce, (bool, str)):
        raise _error(web.HTTPBadRequest, "quiesce is true (the configured [hooks.CG]) or a shell command")
    hook_timeout = body.get("hook_timeout")
    if hook_timeout is not None and (isinstance(hook_timeout, bool) or not isinstance(hook_timeout, (int, float))):
        raise _error(web.HTTPBadRequest, "hook_timeout is a number of seconds")
    return await _call(ops.bookmark_doc, _cfg(request), request.match_info["cg"], name,
                       lock=_flag(body, "lock"), seq=seq, quiesce=quiesce or None, thaw=_str(body, "thaw"),
                       hook_timeout=hook_timeout, status=201)


async def patch_bookmark(request: web.Request) -> web.Response:
    body = await _body(request, ("locked",))
    locked = _typed(body, "locked", (bool,), "true or false", required=True)
    return await _call(ops.bookmark_lock_doc, _cfg(request), request.match_info["cg"], request.match_info["name"],
                       locked)


# -- image access ------------------------------------------------------------------------


async def get_images(request: web.Request) -> web.Response:
    return await _call(ops.images_doc, _cfg(request))


async def post_image(request: web.Request) -> web.Response:
    body = await _body(request, ("cg", "writable", "listen", *SELECTOR_KEYS))
    cg = _str(body, "cg", required=True)
    return await _call(ops.export_doc, _cfg(request), cg, selector(body), writable=_flag(body, "writable"),
                       listen=_str(body, "listen"), status=201)


async def delete_image(request: web.Request) -> web.Response:
    await _body(request, ())
    return await _call(ops.close_doc, _cfg(request), request.match_info["id"])


# -- restore, failover, failback, verify -------------------------------------------------


async def post_restore(request: web.Request) -> web.Response:
    body = await _body(request, ("to", "format", "force", "to_device", "in_place", *SELECTOR_KEYS))
    to = _str(body, "to")
    if to is not None and not os.path.isabs(to):
        raise _error(web.HTTPBadRequest, f"'to' must be an absolute path (the console's working directory is "
                                         f"nobody's business), not {to!r}")
    return await _call(ops.restore_doc, _cfg(request), request.match_info["vdisk"], selector(body), to=to,
                       fmt=_str(body, "format") or "raw", force=_flag(body, "force"),
                       to_device=_flag(body, "to_device"), in_place=_flag(body, "in_place"))


async def post_failover(request: web.Request) -> web.Response:
    body = await _body(request, ("resume", "listen", *SELECTOR_KEYS))
    resume = _flag(body, "resume")
    sel = selector(body) if not resume or _given(body) else None
    return await _call(ops.failover_doc, _cfg(request), request.match_info["cg"], sel, resume=resume,
                       listen=_str(body, "listen"))


async def post_failback(request: web.Request) -> web.Response:
    body = await _body(request, ("production_uri",))
    return await _call(ops.failback_doc, _cfg(request), request.match_info["cg"],
                       production_uri=_str(body, "production_uri"))


async def post_verify(request: web.Request) -> web.Response:
    body = await _body(request, ("repair", "rounds", "timeout"))
    rounds = _typed(body, "rounds", (int,), "an integer", default=3)
    return await _call(ops.verify_doc, _cfg(request), request.match_info["cg"], repair=_flag(body, "repair"),
                       rounds=rounds, timeout=_number(body, "timeout", 120.0))


ROUTES: tuple[tuple[str, str, Callable], ...] = (
    ("GET", "/api/v1/openapi.json", get_openapi),
    ("GET", "/api/v1/status", get_status),
    ("GET", "/api/v1/cgs", get_cgs),
    ("POST", "/api/v1/cgs", post_cg),
    ("POST", "/api/v1/cgs/{cg}/vdisks", post_cg_vdisk),
    ("GET", "/api/v1/cgs/{cg}/pits", get_pits),
    ("GET", "/api/v1/cgs/{cg}/bookmarks", get_bookmarks),
    ("POST", "/api/v1/cgs/{cg}/bookmarks", post_bookmark),
    ("PATCH", "/api/v1/cgs/{cg}/bookmarks/{name}", patch_bookmark),
    ("POST", "/api/v1/cgs/{cg}/failover", post_failover),
    ("POST", "/api/v1/cgs/{cg}/failback", post_failback),
    ("POST", "/api/v1/cgs/{cg}/verify", post_verify),
    ("GET", "/api/v1/vdisks", get_vdisks),
    ("POST", "/api/v1/vdisks", post_vdisk),
    ("DELETE", "/api/v1/vdisks/{vdisk}", delete_vdisk),
    ("POST", "/api/v1/vdisks/{vdisk}/restore", post_restore),
    ("GET", "/api/v1/images", get_images),
    ("POST", "/api/v1/images", post_image),
    ("DELETE", "/api/v1/images/{id}", delete_image),
)


def setup(app: web.Application) -> None:
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
