"""The operations the CLI and the REST API share (`nicsplit.console.api`).

Each function does one operation and returns the JSON document that both
the CLI's ``--json`` output and the API's response body are; the CLI
formats the same document for humans. Errors are the domain's own
(`nicsplit.cli.common.USER_ERRORS`): the CLI prints them as one line, the
API maps them to a 4xx reply with ``{"error": MESSAGE}``.
"""

from __future__ import annotations

import time
from typing import Any

from nicsplit.core.cgs import CGError
from nicsplit.core.config import Config, ConfigError
from nicsplit.core.pki import PkiError
from nicsplit.host.chain import ChainError
from nicsplit.host.datastore import DatastoreError
from nicsplit.journal.writer import JournalError
from nicsplit.recovery import images
from nicsplit.recovery.errors import RecoveryError
from nicsplit.recovery.pits import PitError
from nicsplit.recovery.retention import RetentionError
from nicsplit.recovery.select import Selector, bookmark, list_pits
from nicsplit.storage.atrest import AtRestError

__all__ = ["DOMAIN_ERRORS", "pits_doc", "bookmark_doc", "export_doc", "images_doc", "close_doc"]

# The errors whose message is one complete line for the user: the CLI prints
# it (exit 1), the API returns it as a 400 ``{"error": MESSAGE}``.
DOMAIN_ERRORS: tuple[type[Exception], ...] = (
    RecoveryError, ConfigError, CGError, ChainError, DatastoreError, PkiError, JournalError, PitError,
    AtRestError, RetentionError,
)


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
                 quiesce: str | None = None, thaw: str | None = None, hook_timeout: float = 60.0,
                 timeout: float = 30.0) -> dict[str, Any]:
    """``{"name", "seq", "time", "locked", "host_down"}``"""
    done = bookmark(cfg.data, cg, name, lock=lock, seq=seq, quiesce=quiesce, thaw=thaw,
                    hook_timeout=hook_timeout, timeout=timeout)
    b = done.bookmark
    return {"name": b.name, "seq": b.seq, "time": b.time_ns / 1e9, "locked": b.locked, "host_down": done.host_down}


def export_doc(cfg: Config, cg: str, sel: Selector, *, writable: bool = False, listen: str | None = None) -> dict[str, Any]:
    """``{"id", "cg", "seq", "time", "writable", "pid", "exports": {VDISK: URI}, "ready_seconds",
    "server_ready_seconds", "in_appliance"}``"""
    t0 = time.monotonic()
    ready = images.export(cfg.data, cg, sel, writable=writable, listen=listen)
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
