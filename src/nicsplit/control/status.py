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
holding data is copied in full: its initial sync), ``card-down`` (``link-down`` for a
CG on the net transport: the host's link to the appliance is not up), ``refused`` (the card
holds the CG's batches: its name breaks `nicsplit.core.names` or the appliance
refused it in Hello; ``refused`` says why), ``lagging`` (the card's
overflow log holds writes of the CG: protected, in order, RPO growing),
``protected``; a vdisk shows ``lagging`` the same way; a resyncing or
initializing vdisk carries ``resync`` (percent, rate, ETA). While marking,
resyncing or initializing the CG's ``rpo_seconds`` is at least the age of the gap (the
writes only a resync will protect were acknowledged since it began), and its
``rpo_bytes`` counts its vdisks' dirty bytes on top of what the card holds.

Cheap by rule (status must never stall a process): every process answers
from counters it keeps (the card its byte counts and ~10 s rates, the host
its split histograms); status itself reads a journal's first commit, stats
the journal's segment files and reads two small JSON files per CG (the
bookmarks, the base's state). Every key is documented in operations.md
("Status"); ``alerts`` comes from `nicsplit.control.alerts.evaluate`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from nicsplit.core.catalog import open_catalog
from nicsplit.core.cgs import CGCatalog
from nicsplit.control.alerts import evaluate as evaluate_alerts
from nicsplit.core.config import Config
from nicsplit.core.ctl import request
from nicsplit.core.layout import Layout
from nicsplit.journal.scan import JournalScanner
from nicsplit.recovery.bookmarks import BookmarkError, list_bookmarks
from nicsplit.recovery.failover import status_fields

__all__ = ["system_status", "protection_window", "pid_alive", "journal_bytes", "last_bookmark"]

# A control socket that accepts but does not answer (a stopped process) is
# down after this long: status answers within seconds whatever happens, and
# a loaded host still has the time to answer.
CTL_TIMEOUT_S = 5.0


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
            "seconds": max(0.0, time.time() - commit.t_last_ns / 1e9), "base_seq": _base_seq(data, cg)}


def _base_seq(data: Path, cg: str) -> int:
    """The seq retention folded the journal into base images up to (0: it never trimmed)."""
    try:
        seq = json.loads((Layout(data).base(cg) / "state.json").read_text()).get("seq", 0)
    except (OSError, ValueError, AttributeError):
        return 0
    return seq if isinstance(seq, int) else 0


def journal_bytes(data: Path, cg: str) -> int | None:
    """Bytes of the CG's journal segments on disk (a stat per segment), None without a journal."""
    try:
        with os.scandir(Layout(data).journal(cg)) as it:
            return sum(e.stat().st_size for e in it if e.name.endswith(".seg") and e.is_file())
    except OSError:
        return None


def last_bookmark(data: Path, cg: str) -> dict | None:
    """The bookmark of the newest PIT (``{"name", "seq", "time"}``), None without one."""
    try:
        marks = list_bookmarks(data, cg)
    except (BookmarkError, OSError):
        return None
    if not marks:
        return None
    b = max(marks, key=lambda m: (m.seq, m.created))
    return {"name": b.name, "seq": b.seq, "time": b.time_ns / 1e9}


def _pcts(p50: float | None, p99: float | None) -> dict[str, float | None]:
    return {"p50": p50, "p99": p99}


def _resync(st: dict, state: str) -> dict | None:
    """The vdisk's copy progress while resyncing or initializing (also
    before its copy started: 0 % of its dirty bytes), else None."""
    if "resync" in st:
        return st["resync"]
    if state not in ("resyncing", "initializing"):
        return None
    total = st.get("dirty_bytes", 0)
    return {"done_bytes": 0, "total_bytes": total, "percent": 0.0 if total else 100.0, "rate_mib_s": 0.0, "eta_s": None}


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
    host = request(lay.host_sock, {"cmd": "status"}, timeout=CTL_TIMEOUT_S)
    card = request(lay.card_ctl_sock, {"cmd": "stats"}, timeout=CTL_TIMEOUT_S)
    appl = request(lay.appliance_sock, {"cmd": "status"}, timeout=CTL_TIMEOUT_S)
    # answering: its control socket answered (a process can exist and not answer: stopped, hung)
    processes = {
        "host": {"pid": (host or {}).get("status", {}).get("pid") or pid_alive(lay.pid("host")), "answering": host is not None},
        "card": {"pid": ((card or {}).get("stats") or {}).get("pid") or pid_alive(lay.pid("card")), "answering": card is not None},
        "appliance": {"pid": pid_alive(lay.pid("appliance")), "answering": appl is not None},
        "console": {"pid": pid_alive(lay.pid("console"))},
    }
    processes["console"]["answering"] = console_endpoints(lay, processes["console"]["pid"])["api"] is not None
    vstate = {v["name"]: v for v in (host or {}).get("status", {}).get("vdisks", [])}
    card_cgs = ((card or {}).get("stats") or {}).get("cgs", {})
    refused = ((((card or {}).get("stats") or {}).get("stages") or {}).get("ship") or {}).get("refused_cgs") or {}
    appl_cgs = None if appl is None else (appl.get("status") or {}).get("cgs", {})
    card_up = card is not None and processes["card"]["pid"] is not None
    host_cgs = (host or {}).get("status", {}).get("cgs", {})
    # The net transport (docs/operations.md "Choosing a transport"): the host
    # ships to the appliance itself; its link stands in for the card, and
    # what the appliance holds durably is the journal's durable seq.
    links = (host or {}).get("status", {}).get("transports", {})
    if host is not None and vstate and all(v.get("transport") == "net" for v in vstate.values() if v.get("cg")):
        processes["card"]["needed"] = False
    out = []
    for cg in CGCatalog(cfg.data).list():
        vds = []
        lagging = bool(card_cgs.get(cg.name, {}).get("lagging"))  # the card's overflow log holds writes of it
        members = catalog.cg_members(cg.name)
        net = bool(members) and all(vstate.get(v.name, {}).get("transport") == "net" for v in members)
        for v in members:
            st = vstate.get(v.name, {})
            vstate_ = st.get("state", "unknown" if host is None else "protected")
            if vstate_ == "protected" and lagging:
                vstate_ = "lagging"
            split = bool(st.get("split"))  # its histogram holds a sample
            vds.append({"name": v.name, "state": vstate_, "transport": st.get("transport"),
                        "dirty_bytes": st.get("dirty_bytes", 0), "reason": st.get("reason", ""),
                        "since": st.get("since"), "resync": _resync(st, vstate_),
                        "split_latency_us": _pcts(st.get("split_p50_us") if split else None,
                                                  st.get("split_p99_us") if split else None)})
        if net:  # no card: the appliance link is the host's own, acked means durable (RPO 0)
            link_up = bool(links.get("net", {}).get("attached"))
            state = _cg_state(cg.role, vds, host is not None, link_up)
            durable = (appl_cgs or {}).get(cg.name, {}).get("durable_seq") if appl_cgs is not None else None
            c = {"last_durable_seq": durable, "rpo_bytes": 0, "rpo_seconds": 0.0} if link_up else {}
            if state == "card-down":
                state = "link-down"
        else:
            state = _cg_state(cg.role, vds, host is not None, card_up, lagging, cg.name in refused)
            c = dict(card_cgs.get(cg.name, {}))
        rpo_bytes = c.get("rpo_bytes", 0 if card_up else None)
        if state in _GAP_STATES:
            gap_since = min((v["since"] for v in vds if v["state"] in _GAP_STATES and v["since"]), default=None)
            if gap_since is not None:
                c["rpo_seconds"] = max(c.get("rpo_seconds") or 0.0, time.time() - gap_since)
            rpo_bytes = (rpo_bytes or 0) + sum(v["dirty_bytes"] or 0 for v in vds)  # acknowledged, only in production
        hc = host_cgs.get(cg.name, {})
        out.append({"name": cg.name, "state": state, "rpo_seconds": c.get("rpo_seconds", 0.0 if state == "protected" else None),
                    "rpo_bytes": rpo_bytes,
                    "last_durable_seq": c.get("last_durable_seq"), "host_last_seq": hc.get("last_seq"), "role": cg.role,
                    "protection_window": protection_window(cfg.data, cg.name),
                    "journal_bytes": journal_bytes(cfg.data, cg.name),
                    "last_bookmark": last_bookmark(cfg.data, cg.name),
                    "throughput": {k: c.get(k, 0 if k.endswith("total") else 0.0) if card_up else None
                                   for k in ("in_bytes_per_s", "out_bytes_per_s", "in_bytes_total", "out_bytes_total")},
                    "compression_ratio": c.get("compression_ratio"), "dedup_ratio": c.get("dedup_ratio"),
                    "split_latency_us": _pcts(hc.get("split_p50_us"), hc.get("split_p99_us")),
                    "vdisks": vds,
                    "retention": None if appl_cgs is None else (appl_cgs.get(cg.name) or {}).get("retention"),
                    **({"refused": refused[cg.name]} if cg.name in refused else {}),
                    **status_fields(cfg.data, cg.name, None if appl_cgs is None else appl_cgs.get(cg.name, {}))})
    cs = (card or {}).get("stats") or {}
    ovf = cs.get("overflow") or {}
    doc: dict[str, Any] = {
        "cgs": out, "processes": processes, "endpoints": console_endpoints(lay, processes["console"]["pid"]),
        "card": {"hidden_volume_fill": cs.get("hidden_volume_fill") if card_up else None,
                 "overflow_fill": ovf.get("fill", 0.0 if card_up else None) if card_up else None,
                 "overflow_bytes": ovf.get("bytes", 0) if card_up else None},
    }
    doc["alerts"] = evaluate_alerts(doc, cfg)
    return doc


def console_endpoints(lay: Layout, pid: int | None) -> dict[str, str | None]:
    """Where the console serves (its ``run/console.json``), or None each
    while it is not running."""
    try:
        info = json.loads(lay.console_info.read_text()) if pid else {}
    except (OSError, ValueError):
        info = {}
    ep = info.get("endpoints") or {}
    return {k: ep.get(k) for k in ("api", "metrics", "dashboard")}
