"""The state of the whole system, as ``nicsplit status`` shows it.

One function, `system_status`, asks each running process on its control
socket (host: vdisk states and CG seqs; card: RPO and durable seq per CG;
appliance: distribution, failover and retention per CG), reads the
protection window off each journal, and folds them into one document per
CG. A process that does not answer is reported down, never an error:
status must work best exactly when something is broken.

CG state, first match wins: ``failed-over`` (the CG's role), ``host-down``,
``marking`` (a vdisk of the CG lost its card), ``resyncing`` (a vdisk copies
its dirty regions to the card), ``initializing`` (a vdisk that joined the CG
holding data is copied in full: its initial sync), ``card-down``, ``refused`` (the card
holds the CG's batches: its name breaks `nicsplit.core.names` or the appliance
refused it in Hello; ``refused`` says why), ``lagging`` (the card's
overflow log holds writes of the CG: protected, in order, RPO growing),
``protected``; a vdisk shows ``lagging`` the same way; a resyncing or
initializing vdisk carries ``resync`` (percent, rate, ETA). While marking,
resyncing or initializing the CG's ``rpo_seconds`` is at least the age of the gap (the
writes only a resync will protect were acknowledged since it began).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from nicsplit.core.catalog import open_catalog
from nicsplit.core.cgs import CGCatalog
from nicsplit.core.config import Config
from nicsplit.core.ctl import request
from nicsplit.core.layout import Layout
from nicsplit.journal.scan import JournalScanner
from nicsplit.recovery.failover import status_fields

__all__ = ["system_status", "protection_window", "pid_alive"]


def pid_alive(path: Path) -> int | None:
    """The pid in a pid file if that process exists, else None."""
    try:
        pid = int(path.read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def protection_window(data: Path, cg: str) -> dict | None:
    """The protection window: the oldest PIT the journal still holds (one
    read of its first commit, not a scan of the whole journal)."""
    jd = Layout(data).journal(cg)
    if not jd.is_dir():
        return None
    try:
        commit, _ = next(iter(JournalScanner(jd).scan()))
    except StopIteration:
        return None
    except Exception as e:  # a damaged journal must not break status; say so
        return {"error": str(e)}
    return {"oldest_seq": commit.last_seq, "oldest_time": commit.t_last_ns / 1e9,
            "seconds": max(0.0, time.time() - commit.t_last_ns / 1e9)}


_GAP_STATES = ("marking", "resyncing", "initializing")  # the journal lacks acknowledged writes


def _cg_state(role: str, vdisks: list[dict], host_up: bool, card_up: bool, lagging: bool = False,
              refused: bool = False) -> str:
    if role == "failed-over":
        return "failed-over"
    if not host_up:
        return "host-down"
    states = {v["state"] for v in vdisks}
    if "marking" in states:
        return "marking"
    if "resyncing" in states:
        return "resyncing"
    if "initializing" in states:
        return "initializing"
    if not card_up:
        return "card-down"
    if refused:
        return "refused"
    if lagging:
        return "lagging"
    return "protected"


def system_status(cfg: Config) -> dict[str, Any]:
    """``{"cgs": [...], "processes": {...}}``: the document behind
    ``nicsplit status --json`` (its keys are documented in operations.md)."""
    catalog = open_catalog(cfg.datastore_dir)
    lay = Layout(cfg.data)
    host = request(lay.host_sock, {"cmd": "status"})
    card = request(lay.card_ctl_sock, {"cmd": "stats"})
    processes = {
        "host": {"pid": (host or {}).get("status", {}).get("pid") or pid_alive(lay.pid("host"))},
        "card": {"pid": ((card or {}).get("stats") or {}).get("pid") or pid_alive(lay.pid("card"))},
        "appliance": {"pid": pid_alive(lay.pid("appliance"))},
        "console": {"pid": pid_alive(lay.pid("console"))},
    }
    vstate = {v["name"]: v for v in (host or {}).get("status", {}).get("vdisks", [])}
    card_cgs = ((card or {}).get("stats") or {}).get("cgs", {})
    refused = ((((card or {}).get("stats") or {}).get("stages") or {}).get("ship") or {}).get("refused_cgs") or {}
    appl = request(lay.appliance_sock, {"cmd": "status"})
    appl_cgs = None if appl is None else (appl.get("status") or {}).get("cgs", {})
    out = []
    for cg in CGCatalog(cfg.data).list():
        vds = []
        lagging = bool(card_cgs.get(cg.name, {}).get("lagging"))  # the card's overflow log holds writes of it
        for v in catalog.cg_members(cg.name):
            st = vstate.get(v.name, {})
            vstate_ = st.get("state", "unknown" if host is None else "protected")
            if vstate_ == "protected" and lagging:
                vstate_ = "lagging"
            vds.append({"name": v.name, "state": vstate_,
                        "dirty_bytes": st.get("dirty_bytes", 0), "reason": st.get("reason", ""),
                        "since": st.get("since"),
                        **({"resync": st["resync"]} if "resync" in st else {})})
        state = _cg_state(cg.role, vds, host is not None, card is not None and processes["card"]["pid"] is not None,
                          lagging, cg.name in refused)
        c = dict(card_cgs.get(cg.name, {}))
        if state in _GAP_STATES:
            gap_since = min((v["since"] for v in vds if v["state"] in _GAP_STATES and v["since"]), default=None)
            if gap_since is not None:
                c["rpo_seconds"] = max(c.get("rpo_seconds") or 0.0, time.time() - gap_since)
        host_seq = (host or {}).get("status", {}).get("cgs", {}).get(cg.name, {}).get("last_seq")
        out.append({"name": cg.name, "state": state, "rpo_seconds": c.get("rpo_seconds", 0.0 if state == "protected" else None),
                    "last_durable_seq": c.get("last_durable_seq"), "host_last_seq": host_seq, "role": cg.role,
                    "protection_window": protection_window(cfg.data, cg.name), "vdisks": vds,
                    "retention": None if appl_cgs is None else (appl_cgs.get(cg.name) or {}).get("retention"),
                    **({"refused": refused[cg.name]} if cg.name in refused else {}),
                    **status_fields(cfg.data, cg.name, None if appl_cgs is None else appl_cgs.get(cg.name, {}))})
    return {"cgs": out, "processes": processes, "endpoints": console_endpoints(lay, processes["console"]["pid"])}


def console_endpoints(lay: Layout, pid: int | None) -> dict[str, str | None]:
    """Where the console serves (its ``run/console.json``), or None each
    while it is not running."""
    try:
        info = json.loads(lay.console_info.read_text()) if pid else {}
    except (OSError, ValueError):
        info = {}
    ep = info.get("endpoints") or {}
    return {k: ep.get(k) for k in ("api", "metrics", "dashboard")}
