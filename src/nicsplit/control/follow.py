"""Follow a CG's initial sync or resync until it is protected
(``nicsplit wait CG``, ``nicsplit cg add CG VDISK --wait``).

Both run inside the host (`nicsplit.host.resync`); this polls the host's
control socket (``{"cmd": "status"}``), whose per-vdisk ``resync`` carries
``done_bytes`` and ``total_bytes`` of the current pass, and folds the CG's
vdisks into one ``progress(done, total, state)``. A vdisk that reached
``protected`` counts as done in full (the largest total seen for it). The
CG is protected when every vdisk of it is (``lagging`` is protected too:
the card's overflow log holds its writes in order).

A vdisk in ``marking`` waits for its card; the call waits too, within its
timeout, and says so. No host: an error at once (nothing can make progress).

Example::

    follow_sync(cfg, "web", timeout=600, progress=lambda d, t, s: print(d, t, s))
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from nicsplit.core.catalog import open_catalog
from nicsplit.core.cgs import CGCatalog
from nicsplit.core.config import Config
from nicsplit.core.ctl import request
from nicsplit.core.layout import Layout
from nicsplit.recovery.errors import RecoveryError

__all__ = ["SyncDone", "follow_sync", "POLL"]

POLL = 0.2  # seconds between status requests: a resync moves MiB per poll, the host barely notices
_DONE = ("protected", "lagging")


@dataclass(frozen=True, slots=True)
class SyncDone:
    cg: str
    vdisks: list[str]
    bytes: int            # bytes the followed syncs copied (sum of the largest totals seen)
    seconds: float
    waited_for: list[str]  # vdisks that were not protected when the call began


def _host_status(cfg: Config) -> dict[str, Any]:
    reply = request(Layout(cfg.data).host_sock, {"cmd": "status"})
    if reply is None:
        raise RecoveryError(f"no running host for {cfg.data} ({Layout(cfg.data).host_sock} does not answer): "
                            "the initial sync and resyncs run in it (start it: nicsplit up)")
    if not reply.get("ok"):
        raise RecoveryError(f"the host refused its status: {reply.get('error')}")
    return reply["status"]


def follow_sync(cfg: Config, cg: str, *, timeout: float = 3600.0, vdisks: list[str] | None = None,
                progress: Callable[[int, int, str], None] | None = None, poll: float = POLL) -> SyncDone:
    """Wait until every vdisk of ``cg`` (or of ``vdisks``) is protected;
    ``progress(done, total, state)`` after each poll (bytes; ``state`` a
    short phrase: "initializing a (42%)", "marking b: card lost"...)."""
    CGCatalog(cfg.data).get(cg)  # CGError for an unknown CG
    names = vdisks or [v.name for v in open_catalog(cfg.datastore_dir).cg_members(cg)]
    if not names:
        raise RecoveryError(f"consistency group {cg} has no vdisks")
    t0 = time.monotonic()
    deadline = t0 + timeout
    best: dict[str, int] = {}   # largest total seen per vdisk
    seen_done: dict[str, int] = {}
    waited: list[str] | None = None
    while True:
        st = {v["name"]: v for v in _host_status(cfg).get("vdisks", [])}
        missing = [n for n in names if n not in st]
        if missing:
            raise RecoveryError(f"the running host does not serve {', '.join(missing)} (is it in its catalog?)")
        phrases = []
        for n in names:
            v = st[n]
            state = v.get("state", "unknown")
            r = v.get("resync") or {}
            total = int(r.get("total_bytes", 0) or v.get("dirty_bytes", 0) or 0)
            best[n] = max(best.get(n, 0), total)
            if state in _DONE:
                seen_done[n] = best[n]
            else:
                seen_done[n] = min(best[n], int(r.get("done_bytes", 0)))
                phrases.append(f"{state} {n}" + (f" ({r['percent']:.0f}%)" if "percent" in r else "")
                               + (f": {v['reason']}" if state == "marking" and v.get("reason") else ""))
        if waited is None:
            waited = [n for n in names if st[n].get("state") not in _DONE]
        done, total = sum(seen_done.values()), sum(best.values())
        if progress:
            progress(done, total, ", ".join(phrases) or "protected")
        if not phrases:
            return SyncDone(cg, names, total, time.monotonic() - t0, waited)
        if time.monotonic() >= deadline:
            raise RecoveryError(f"consistency group {cg} is not protected after {timeout:g} s: {'; '.join(phrases)} "
                                "(see 'nicsplit status')")
        time.sleep(poll)  # the host has no push channel for its status
