"""The operations the CLI and the REST API share (`nicsplit.console.api`).

Each function does one operation and returns the JSON document that both
the CLI's ``--json`` output and the API's response body are; the CLI
formats the same document for humans. Errors are the domain's own
(`DOMAIN_ERRORS`): the CLI prints them as one line, the
API maps them to a 4xx reply with ``{"error": MESSAGE}``.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Callable

from nicsplit.core.cgs import CGCatalog, CGConflict, CGError
from nicsplit.core.config import Config, ConfigError, parse_size
from nicsplit.core.ctl import request as ctl_request
from nicsplit.core.errors import Conflict
from nicsplit.core.layout import Layout
from nicsplit.core.pki import PkiError
from nicsplit.host import marking
from nicsplit.host.chain import ChainError
from nicsplit.host.datastore import Datastore, DatastoreError
from nicsplit.journal.writer import JournalError
from nicsplit.recovery import failover as fo
from nicsplit.recovery import images
from nicsplit.recovery import restore as rst
from nicsplit.recovery.errors import RecoveryError
from nicsplit.recovery.pits import PitError
from nicsplit.recovery.retention import RetentionError
from nicsplit.recovery.hooks import DEFAULT_TIMEOUT as DEFAULT_HOOK_TIMEOUT, resolve_hooks
from nicsplit.recovery.select import Selector, bookmark, list_pits, set_bookmark_lock
from nicsplit.recovery.bookmarks import get_bookmark, list_bookmarks
from nicsplit.recovery.verify import verify_and_repair, verify_cg
from nicsplit.storage.atrest import AtRestError

__all__ = [
    "DOMAIN_ERRORS", "OpError", "OpConflict", "pits_doc", "bookmark_doc", "bookmarks_doc", "bookmark_lock_doc",
    "export_doc", "images_doc", "close_doc", "cgs_doc", "cg_create_doc", "cg_add_doc", "vdisks_doc",
    "vdisk_create_doc", "vdisk_delete_doc", "restore_doc", "failover_doc", "failback_doc", "verify_doc",
]


class OpError(Exception):
    """A request an operation refuses as given (a bad value or combination
    of options): one line, like every domain error."""


class OpConflict(OpError, Conflict):
    """The request collides with the current state (the host refused it)."""


# The errors whose message is one complete line for the user: the CLI prints
# it (exit 1), the API returns it as a 4xx ``{"error": MESSAGE}`` (404 for a
# `nicsplit.core.errors.NotFound`, 409 for a `Conflict`, else 400).
DOMAIN_ERRORS: tuple[type[Exception], ...] = (
    RecoveryError, ConfigError, CGError, ChainError, DatastoreError, PkiError, JournalError, PitError,
    AtRestError, RetentionError, OpError,
)

_OWNER = re.compile(r"^(vm|container):[A-Za-z0-9._-]{1,64}$")
FORMATS = ("raw", "qcow2")


def pits_doc(cfg: Config, cg: str, every: bool = False) -> dict[str, Any]:
    """``{"pits": [{seq, time, consistent, usable, gap, bookmarks[, reason]}], "damage": [{..., message}]}``"""
    listing = list_pits(cfg, cg, every=every)
    damage = listing.damage
    rows = [{"seq": p.seq, "time": p.time_ns / 1e9, "consistent": p.consistent, "usable": p.usable, "gap": p.gap,
             "bookmarks": listing.bookmarks.get(p.seq, [])} for p in listing.pits]
    for row in rows:
        if not row["usable"]:
            row["reason"] = f"needs seqs {damage[0].first_seq}..{damage[0].last_seq}, lost to damage: {damage[0].describe()}"
    return {"pits": rows, "damage": [{**d.to_json(), "message": d.describe()} for d in damage]}


def bookmark_doc(cfg: Config, cg: str, name: str, *, lock: bool = False, seq: int | None = None,
                 quiesce: str | bool | None = None, thaw: str | None = None, hook_timeout: float | None = None,
                 timeout: float = 30.0) -> dict[str, Any]:
    """``{"name", "seq", "time", "locked", "host_down", "consistency"[, "note", "hooks"]}``.
    ``quiesce``: a pre hook command, or True for the ``[hooks.CG]`` pair of
    nicsplit.toml (`nicsplit.recovery.hooks`); ``thaw`` the post command."""
    configured = quiesce is True
    hooks = resolve_hooks(cfg.raw, cg, pre=None if configured else (quiesce or None), post=thaw,
                          timeout=hook_timeout, configured=configured)
    done = bookmark(cfg.data, cg, name, lock=lock, seq=seq, quiesce=hooks.pre if hooks else None,
                    thaw=hooks.post if hooks else None,
                    hook_timeout=hooks.timeout if hooks else DEFAULT_HOOK_TIMEOUT, timeout=timeout)
    return {**_bookmark_row(get_bookmark(cfg.data, cg, name)), "host_down": done.host_down}


def export_doc(cfg: Config, cg: str, sel: Selector, *, writable: bool = False, listen: str | None = None,
               progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """``{"id", "cg", "seq", "time", "writable", "pid", "exports": {VDISK: URI}, "ready_seconds",
    "server_ready_seconds", "in_appliance"}``"""
    t0 = time.monotonic()
    # Said here, typed (unknown: NotFound), before the appliance or a server
    # process answers with a message only.
    CGCatalog(cfg.data).get(cg)
    if sel.bookmark is not None:
        get_bookmark(cfg.data, cg, sel.bookmark)
    ready = images.export(cfg.data, cg, sel, writable=writable, listen=listen, progress=progress)
    out = {k: ready[k] for k in ("id", "cg", "seq", "time", "writable", "pid", "exports")}
    out["ready_seconds"] = round(time.monotonic() - t0, 4)
    out["server_ready_seconds"] = ready.get("ready_seconds")
    out["in_appliance"] = bool(ready.get("in_appliance"))
    return out


def images_doc(cfg: Config) -> dict[str, Any]:
    """``{"images": [{id, cg, seq, time, writable, pid, alive, exports, started}]}``"""
    return {"images": [{k: i.get(k) for k in ("id", "cg", "seq", "time", "writable", "pid", "alive", "exports", "started")}
                       for i in images.list_images(cfg.data)]}


def close_doc(cfg: Config, image_id: str) -> dict[str, Any]:
    """``{"id", "closed": true, "killed"}``"""
    return {"id": image_id, "closed": True, "killed": images.close(cfg.data, image_id)}


def bookmarks_doc(cfg: Config, cg: str) -> dict[str, Any]:
    """``{"bookmarks": [{name, seq, time, locked}]}`` in the order they were added."""
    CGCatalog(cfg.data).get(cg)
    return {"bookmarks": [_bookmark_row(b) for b in list_bookmarks(cfg.data, cg)]}


def bookmark_lock_doc(cfg: Config, cg: str, name: str, locked: bool) -> dict[str, Any]:
    """Lock or unlock an existing bookmark: ``{"name", "seq", "time", "locked"}``."""
    return _bookmark_row(set_bookmark_lock(cfg.data, cg, name, locked))


def _bookmark_row(b: Any) -> dict[str, Any]:
    """``{name, seq, time, locked, consistency[, note, hooks]}``"""
    return {"name": b.name, "seq": b.seq, "time": b.time_ns / 1e9, "locked": b.locked, **b.to_json_extra()}


# -- consistency groups and vdisks ---------------------------------------------------------


def cgs_doc(cfg: Config) -> dict[str, Any]:
    """``{"cgs": [{name, id, uuid, vdisks: [NAME]}]}``"""
    members: dict[str, list[str]] = {}
    for v in Datastore.open(cfg.datastore_dir).list_vdisks():
        if v.extra.get("cg"):
            members.setdefault(v.extra["cg"], []).append(v.name)
    return {"cgs": [{"name": c.name, "id": c.id, "uuid": c.uuid, "vdisks": members.get(c.name, [])}
                    for c in CGCatalog(cfg.data).list()]}


def cg_create_doc(cfg: Config, name: str) -> dict[str, Any]:
    """``{"name", "id", "uuid"}``"""
    cg = CGCatalog(cfg.data).create(name)
    return {"name": cg.name, "id": cg.id, "uuid": cg.uuid}


def cg_add_doc(cfg: Config, cg: str, vdisk: str) -> dict[str, Any]:
    """Put ``vdisk`` into ``cg``: in the catalog, and live in the running
    host (which starts copying what the vdisk holds). ``{"cg", "vdisk",
    "live", "state", "dirty_bytes"}``; ``live`` false (state and dirty_bytes
    null) when no host runs: it applies the membership when it starts."""
    ds = Datastore.open(cfg.datastore_dir)
    CGCatalog(cfg.data).get(cg)
    v = ds.get_vdisk(vdisk)
    if v.extra.get("cg") not in (None, cg):
        raise CGConflict(f"vdisk {v.name} is already in consistency group {v.extra['cg']}")
    ds.update_vdisk(v.name, extra={**v.extra, "cg": cg})
    sock = Layout(cfg.data).host_sock
    reply = ctl_request(sock, {"cmd": "join", "vdisk": v.name, "cg": cg}) if sock.exists() else None
    if reply is None:
        return {"cg": cg, "vdisk": v.name, "live": False, "state": None, "dirty_bytes": None}
    if not reply.get("ok"):
        raise OpConflict(f"vdisk {v.name} is in consistency group {cg} in the catalog, but the running host "
                         f"refused it: {reply.get('error')} (it applies it at its next start)")
    return {"cg": cg, "vdisk": v.name, "live": True, "state": reply["state"], "dirty_bytes": reply["dirty_bytes"]}


def vdisk_row(v: Any) -> dict[str, Any]:
    """One vdisk as every JSON document shows it."""
    return {"name": v.name, "size": v.size, "owner": v.owner, "uuid": v.uuid, "id": v.id,
            "block_size": v.block_size, "readonly": v.readonly, "created": v.created, "cg": v.extra.get("cg")}


def vdisks_doc(cfg: Config) -> dict[str, Any]:
    """``{"vdisks": [VDISK]}`` (`vdisk_row`)."""
    return {"vdisks": [vdisk_row(v) for v in Datastore.open(cfg.datastore_dir).list_vdisks()]}


def vdisk_create_doc(cfg: Config, name: str, size: int | str, *, owner: str | None = None,
                     readonly: bool = False, cg: str | None = None) -> dict[str, Any]:
    """Create a vdisk (``size``: bytes or ``"64M"``), optionally in CG ``cg``; its `vdisk_row`."""
    if owner is not None and not _OWNER.match(owner):
        raise OpError(f"bad owner {owner!r}: use vm:NAME or container:NAME")
    n = parse_size(size, "size")
    ds = Datastore.open(cfg.datastore_dir)
    extra = None
    if cg:
        CGCatalog(cfg.data).get(cg)  # must exist
        extra = {"cg": cg}
    return vdisk_row(ds.create_vdisk(name, n, owner=owner, readonly=readonly, extra=extra))


def vdisk_delete_doc(cfg: Config, name: str) -> dict[str, Any]:
    """Delete a vdisk and free its space: ``{"name", "deleted": true}``."""
    ds = Datastore.open(cfg.datastore_dir)
    ds.open_io()
    try:
        uuid = ds.get_vdisk(name).uuid
        ds.delete_vdisk(name)
    finally:
        ds.close()
    marking.forget(Layout(cfg.data).marking, uuid)  # its dirty bitmap and state: after the catalog
    return {"name": name, "deleted": True}


# -- restore, failover, failback, verify ---------------------------------------------------


def restore_doc(cfg: Config, vdisk: str, sel: Selector, *, to: str | Path | None = None, fmt: str = "raw",
                force: bool = False, to_device: bool = False, in_place: bool = False, **kw: Any) -> dict[str, Any]:
    """Restore ``vdisk`` at the PIT ``sel`` names to the file ``to``, or
    ``in_place`` onto production through the host (then no ``to``,
    ``fmt``, ``force`` or ``to_device``); the document of
    `nicsplit.recovery.restore`. ``kw`` goes to the restore function."""
    if fmt not in FORMATS:
        raise OpError(f"bad format {fmt!r}: one of {', '.join(FORMATS)}")
    if in_place and (to is not None or fmt != "raw" or force or to_device):
        raise OpError("--in-place writes onto the production vdisk: it takes no --to, --format, --force "
                      "or --to-device")
    if not in_place and to is None:
        raise OpError("say where to: --to FILE, or --in-place onto the production vdisk")
    src = rst.restore_source(cfg, vdisk)
    if in_place:
        return rst.restore_in_place(cfg, src, sel, **kw)
    return rst.restore_to_file(cfg, src, sel, Path(to), fmt, force=force, device_ok=to_device, **kw)  # type: ignore[arg-type]


Warn = Callable[[str], None]


def _collecting(warn: Warn | None) -> tuple[list[str], Warn]:
    """A warning callback that keeps what it is told (for the document) and passes it on."""
    said: list[str] = []

    def collect(text: str) -> None:
        said.append(text)
        if warn is not None:
            warn(text)
    return said, collect


def failover_doc(cfg: Config, cg: str, sel: Selector | None, *, resume: bool = False, listen: str | None = None,
                 warn: Warn | None = None) -> dict[str, Any]:
    """Fail ``cg`` over to its replicas at the PIT ``sel`` names, or
    ``resume`` the server of a failed-over CG (``sel`` None); the document
    of `nicsplit.recovery.failover` plus ``"warnings": [TEXT]``."""
    if resume:
        if sel is not None:
            raise OpError("--resume serves the point in time the failover chose: it takes no other selector")
        return {**fo.resume(cfg, cg, listen=listen), "warnings": []}
    if sel is None:
        raise OpError("say which point in time: --at TIME, --seq N, --bookmark NAME, --latest, or --resume")
    said, collect = _collecting(warn)
    return {**fo.failover(cfg, cg, sel, listen=listen, warn=collect), "warnings": said}


def failback_doc(cfg: Config, cg: str, *, production_uri: str | None = None,
                 warn: Warn | None = None) -> dict[str, Any]:
    """Fail ``cg`` back to production; `nicsplit.recovery.failover`'s document plus ``"warnings"``."""
    said, collect = _collecting(warn)
    return {**fo.failback(cfg, cg, production_uri=production_uri, warn=collect), "warnings": said}


def verify_doc(cfg: Config, cg: str, *, repair: bool = False, rounds: int = 3, timeout: float = 120.0,
               **kw: Any) -> dict[str, Any]:
    """Compare production with the latest PIT (and with ``repair`` resync
    what differs, then compare again): the report's JSON plus ``"clean"``."""
    if rounds < 1:
        raise OpError("--rounds must be at least 1")
    if timeout <= 0:
        raise OpError("--timeout must be positive")
    check = verify_and_repair if repair else verify_cg
    r = check(cfg, cg, rounds=rounds, timeout=timeout, **kw)
    return {**r.to_json(), "clean": r.clean}
