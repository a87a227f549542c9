"""Alerts: what is wrong right now, judged from one status document.

`evaluate` is a pure function of a `nicsplit.control.status.system_status`
document and the ``[alerts]`` / ``[retention]`` settings; status lists its
result under ``alerts``, the console (`nicsplit.console.alerting`) POSTs
the changes to a webhook. Each alert is ``{"name", "severity" ("warning" |
"critical"), "cg" (or None), "message", "value", "threshold"}``; an alert is
identified by (name, cg). docs/operations.md "Alerts" lists them:

- ``card_down`` / ``appliance_down`` (critical): the process does not answer
  its control socket (gone, stopped or hung);
- ``rpo_above_target``: the CG's RPO is above ``rpo_target`` (warning) or
  twice it (critical);
- ``window_below_history``: retention has cut the journal (its base is past
  seq 0) and the protection window is below 85 % (warning) or 75 %
  (critical) of the history (``[alerts] history``, default ``[retention]
  keep_all``). A CG younger than its history has a short window too, but
  nothing was cut: no alert;
- ``marking``: a vdisk of the CG is in the protection gap: marking
  (critical: its writes are not protected) or resyncing / initializing
  (warning); value is the dirty bytes still to copy;
- ``journal_forecast`` (warning, only with ``[retention]
  max_journal_size``): at the CG's current ingest rate (its in throughput:
  the journal keeps what clients wrote, uncompressed) the size limit cannot hold the history, and the journal reaches the limit
  (where retention starts cutting into the history) within
  ``forecast_horizon``; value is the seconds left (0: cutting already).

A failed-over CG does not replicate: it gets none of the per-CG alerts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nicsplit.core.config import Config, ConfigError, parse_size
from nicsplit.recovery.retention import RetentionError, parse_duration

__all__ = ["evaluate", "AlertSettings", "WINDOW_WARNING", "WINDOW_CRITICAL", "KEYS"]

WINDOW_WARNING = 0.85  # of the history (Zerto's thresholds)
WINDOW_CRITICAL = 0.75
KEYS = ("rpo_target", "history", "forecast_horizon", "webhook", "interval")  # of [alerts]
_GAP = {"marking": "critical", "resyncing": "warning", "initializing": "warning"}


@dataclass(frozen=True)
class AlertSettings:
    rpo_target_s: float = 60.0
    history_s: float = 86400.0
    forecast_horizon_s: float = 86400.0
    max_journal_bytes: int = 0  # [retention] max_journal_size (0: no limit, no forecast)
    webhook: str = ""
    interval_s: float = 2.0

    @classmethod
    def from_config(cls, cfg: Config) -> "AlertSettings":
        """From ``[alerts]`` (and ``[retention]``); a bad value is one clear `ConfigError`."""
        a = cfg.raw.get("alerts", {})
        r = cfg.raw.get("retention", {})
        if not isinstance(r, dict):
            r = {}
        unknown = set(a) - set(KEYS)
        if unknown:
            raise ConfigError(f"[alerts]: unknown setting(s) {', '.join(sorted(unknown))} (known: {', '.join(KEYS)})")
        try:
            hist = a.get("history") or r.get("keep_all", "24h")
            s = cls(rpo_target_s=parse_duration(a.get("rpo_target", "60s"), "[alerts] rpo_target"),
                    history_s=parse_duration(hist, "[alerts] history" if a.get("history") else "[retention] keep_all"),
                    forecast_horizon_s=parse_duration(a.get("forecast_horizon", "24h"), "[alerts] forecast_horizon"),
                    max_journal_bytes=_size(r.get("max_journal_size", 0)),
                    webhook=str(a.get("webhook", "")),
                    interval_s=parse_duration(a.get("interval", "2s"), "[alerts] interval"))
        except RetentionError as e:
            raise ConfigError(str(e)) from None
        if s.rpo_target_s <= 0 or s.interval_s <= 0:
            raise ConfigError("[alerts] rpo_target and interval must be > 0")
        if s.webhook and not s.webhook.startswith(("http://", "https://")):
            raise ConfigError(f"[alerts] webhook {s.webhook!r}: use an http:// or https:// URL (or \"\" for none)")
        return s


def _size(v: Any) -> int:
    return 0 if v in (0, "0", "") else parse_size(v, "[retention] max_journal_size")


def _alert(name: str, severity: str, cg: str | None, message: str, value: Any, threshold: Any) -> dict[str, Any]:
    return {"name": name, "severity": severity, "cg": cg, "message": message, "value": value, "threshold": threshold}


def _span(s: float) -> str:
    if s < 120:
        return f"{s:.1f}s"
    if s < 7200:
        return f"{s / 60:.0f}m"
    return f"{s / 3600:.1f}h"


def evaluate(status: dict[str, Any], cfg: Config | AlertSettings) -> list[dict[str, Any]]:
    """The alerts a status document shows, critical first."""
    st = cfg if isinstance(cfg, AlertSettings) else AlertSettings.from_config(cfg)
    out: list[dict[str, Any]] = []
    procs = status.get("processes", {})
    for name in ("card", "appliance"):
        p = procs.get(name) or {}
        if not p.get("answering") and p.get("needed", True):  # no card is needed when every vdisk uses net
            why = "not running" if not p.get("pid") else f"pid {p['pid']} does not answer its control socket"
            out.append(_alert(f"{name}_down", "critical", None, f"the {name} is down: {why}", None, None))
    for c in status.get("cgs", []):
        if c.get("role") == "failed-over" or c.get("state") == "failed-over":
            continue
        out += _cg_alerts(c, st)
    out.sort(key=lambda a: (a["severity"] != "critical", a["name"], a["cg"] or ""))
    return out


def _cg_alerts(c: dict[str, Any], st: AlertSettings) -> list[dict[str, Any]]:
    name = c["name"]
    out = []
    rpo = c.get("rpo_seconds")
    if rpo is not None and rpo > st.rpo_target_s:
        crit = rpo > 2 * st.rpo_target_s
        out.append(_alert("rpo_above_target", "critical" if crit else "warning", name,
                          f"CG {name}: RPO {_span(rpo)} is above {'twice ' if crit else ''}the target "
                          f"{_span(st.rpo_target_s)}", round(rpo, 3), 2 * st.rpo_target_s if crit else st.rpo_target_s))
    w = c.get("protection_window") or {}
    if w.get("base_seq") and w.get("seconds") is not None and w["seconds"] < WINDOW_WARNING * st.history_s:
        crit = w["seconds"] < WINDOW_CRITICAL * st.history_s
        limit = (WINDOW_CRITICAL if crit else WINDOW_WARNING) * st.history_s
        out.append(_alert("window_below_history", "critical" if crit else "warning", name,
                          f"CG {name}: retention cut the protection window to {_span(w['seconds'])}, "
                          f"{100 * w['seconds'] / st.history_s:.0f}% of the {_span(st.history_s)} history",
                          round(w["seconds"], 3), limit))
    gap = [v for v in c.get("vdisks", []) if v.get("state") in _GAP]
    if gap:
        sev = "critical" if any(v["state"] == "marking" for v in gap) else "warning"
        dirty = sum(v.get("dirty_bytes") or 0 for v in gap)
        which = ", ".join(f"{v['name']} {v['state']}" for v in gap)
        out.append(_alert("marking", sev, name, f"CG {name} is in a protection gap ({which}): "
                          f"{dirty / 2**20:.1f} MiB acknowledged but not journaled", dirty, 0))
    if st.max_journal_bytes > 0:
        rate = (c.get("throughput") or {}).get("in_bytes_per_s")
        jb = c.get("journal_bytes")
        if rate and jb is not None and st.max_journal_bytes / rate < st.history_s:
            left = max(0.0, (st.max_journal_bytes - jb) / rate)
            if left < st.forecast_horizon_s:
                out.append(_alert("journal_forecast", "warning", name,
                                  f"CG {name}: at {rate / 2**20:.2f} MiB/s the journal limit "
                                  f"{st.max_journal_bytes / 2**30:.2f} GiB holds {_span(st.max_journal_bytes / rate)}, "
                                  f"less than the {_span(st.history_s)} history; retention cuts into it "
                                  + ("now" if left == 0 else f"in {_span(left)}"),
                                  round(left, 1), st.forecast_horizon_s))
    return out
