"""``nicsplit status`` for people: the status document as tables (rich).

Tables of CGs, vdisks and processes, the card's fill, the endpoints and the
active alerts. Without a terminal (CI, a pipe) rich prints plain text at a
fixed width wide enough that no cell wraps, so scripts can still grep it
(``--json`` is the stable interface). Notes that do not fit a table (the
replica, failover exports, retention) follow the CG table as lines.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

__all__ = ["render"]

_STATE_STYLE = {"protected": "green", "lagging": "yellow", "resyncing": "yellow", "initializing": "yellow",
                "marking": "red", "card-down": "red", "link-down": "red", "host-down": "red", "refused": "red", "failed-over": "magenta"}


def span(seconds: float) -> str:
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n:
            return f"{seconds / n:.1f}{unit}"
    return f"{seconds:.0f}s"


def size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:g} {unit}" if unit == "B" else f"{n:.4g} {unit}"
        n /= 1024
    return str(n)


def _rate(n: float | None) -> str:
    return "-" if n is None else f"{size(n)}/s"


def _ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def _lat(d: dict | None) -> str:
    d = d or {}
    if d.get("p50") is None:
        return "-"
    return f"{d['p50']:.0f}/{d['p99']:.0f}us"


def _state(s: str) -> str:
    st = _STATE_STYLE.get(s)
    return f"[{st}]{s}[/{st}]" if st else escape(s)


def _window(w: dict | None) -> str:
    if not w:
        return "no point in time yet"
    if "error" in w:
        return f"unknown: {w['error']}"
    return f"{span(w['seconds'])} (since seq {w['oldest_seq']})"


def _cg_notes(c: dict) -> list[str]:
    out = []
    d, f = c["distribution"], c["failover"]
    if d["applied_seq"] is not None:
        lag = "" if d["lag_records"] is None else f", lag {d['lag_records']} records / {d['lag_seconds']:.2f}s"
        out.append(f"replica at seq {d['applied_seq']} ({d['state']}{lag})")
    for n, u in ((f or {}).get("exports") or {}).items():
        out.append(f"failover {n:<20} {u}{'' if f['alive'] else ' (server not running)'}")
    r = c.get("retention")
    if r and (r["base_seq"] or r["blocked_by"]):
        why = f"; over its size limit: {r['blocked_by']}" if r["blocked_by"] else ""
        out.append(f"journal {size(r['journal_bytes'])}, older points in time folded into the base at seq "
                   f"{r['base_seq']}{why}")
    if c.get("refused"):
        out.append(f"refused: {c['refused']}")
    return [f"cg {c['name']}: {line}" for line in out]


def _vdisk_detail(v: dict) -> str:
    extra = ""
    if v["state"] == "marking":
        extra = f"{v['reason']}; {size(v['dirty_bytes'])} dirty"
    r = v.get("resync")
    if v["state"] in ("resyncing", "initializing"):
        if r:
            eta = "" if r.get("eta_s") is None else f", eta {r['eta_s']:.0f}s"
            extra = f"{r['percent']:.0f}% of {size(r['total_bytes'])}, {r['rate_mib_s']:.1f} MiB/s{eta}"
        else:
            extra = f"{size(v['dirty_bytes'])} to copy"
    return extra


def render(doc: dict[str, Any], file: IO[str] | None = None) -> None:
    """Print ``doc`` (a `nicsplit.control.status.system_status` document)."""
    file = file or sys.stdout
    tty = file.isatty()
    con = Console(file=file, width=None if tty else 200, no_color=not tty, highlight=False, soft_wrap=False)

    t = Table(title="Consistency groups", title_justify="left")
    for h in ("CG", "state", "RPO", "RPO bytes", "window", "journal", "last bookmark", "in", "out",
              "compr.", "dedup", "split p50/p99"):
        t.add_column(h, no_wrap=True)
    notes: list[str] = []
    for c in doc["cgs"]:
        tp = c.get("throughput") or {}
        bm = c.get("last_bookmark")
        t.add_row(c["name"], _state(c["state"]),
                  "-" if c["rpo_seconds"] is None else f"{c['rpo_seconds']:.2f}s", size(c.get("rpo_bytes")),
                  escape(_window(c["protection_window"])), size(c.get("journal_bytes")),
                  "-" if not bm else escape(f"{bm['name']} (seq {bm['seq']})"),
                  _rate(tp.get("in_bytes_per_s")), _rate(tp.get("out_bytes_per_s")),
                  _ratio(c.get("compression_ratio")), _ratio(c.get("dedup_ratio")), _lat(c.get("split_latency_us")))
        notes += _cg_notes(c)
    con.print(t)
    for line in notes:
        con.print(line, markup=False, soft_wrap=True)  # a line, never cut: scripts grep it

    t = Table(title="Vdisks", title_justify="left")
    for h in ("vdisk", "CG", "state", "detail", "since", "split p50/p99"):
        t.add_column(h, no_wrap=h != "detail", overflow="fold")
    for c in doc["cgs"]:
        for v in c["vdisks"]:
            since = time.strftime("%H:%M:%S", time.localtime(v["since"])) if v.get("since") and v["state"] != "protected" else ""
            t.add_row(v["name"], c["name"], _state(v["state"]), escape(_vdisk_detail(v)), since, _lat(v.get("split_latency_us")))
    con.print(t)

    card = doc.get("card") or {}
    if card.get("hidden_volume_fill") is None:
        con.print("card: not answering", markup=False)
    else:
        con.print(f"card: hidden volume {100 * card['hidden_volume_fill']:.1f}% full, overflow log "
                  f"{100 * (card.get('overflow_fill') or 0):.1f}% full ({size(card.get('overflow_bytes'))})")

    t = Table(title="Processes", title_justify="left")
    for h in ("process", "pid", "answering"):
        t.add_column(h, no_wrap=True)
    for name, p in doc["processes"].items():
        t.add_row(name, str(p["pid"]) if p["pid"] else "not running", "yes" if p.get("answering") else "no")
    con.print(t)
    eps = {k: v for k, v in (doc.get("endpoints") or {}).items() if v}
    if eps:
        con.print("endpoints: " + ", ".join(f"{k} {v}" for k, v in eps.items()), markup=False, soft_wrap=True)

    alerts = doc.get("alerts") or []
    if not alerts:
        con.print("alerts: none")
        return
    t = Table(title="Alerts", title_justify="left")
    for h in ("severity", "alert", "CG", "message"):
        t.add_column(h, no_wrap=h != "message", overflow="fold")
    for a in alerts:
        sev = "[red]critical[/red]" if a["severity"] == "critical" else "[yellow]warning[/yellow]"
        t.add_row(sev, a["name"], a["cg"] or "-", escape(a["message"]))
    con.print(t)
