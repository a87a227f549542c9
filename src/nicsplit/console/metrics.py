"""Prometheus metrics at ``GET /metrics`` (docs/operations.md "Metrics").

No registry of live counters: a custom collector builds every family at
scrape time from one fresh `system_status` (the document behind ``nicsplit
status --json``) plus the host's split-latency histograms (its control
socket's ``status``: ``vdisks[].split_hist``, the log-linear histogram of
`nicsplit.host.filters.stats.Histogram` in sparse form). The pair is cached
for `MAX_AGE` seconds, so scrapers, however many and however often, cost the
control sockets at most one round per second; it is fetched in a worker
thread (blocking IO) and never on the event loop.

`families` is pure (documents in, metric families out), so the names and
labels are pinned by a unit test without processes. Keys the status
document may lack (older processes, a process that is down) give no
sample rather than an error: absent is Prometheus' "unknown".

The histogram's buckets are fixed (`SPLIT_BOUNDS`, seconds) so that every
scrape has the same ``le`` series; a host bucket counts under the first
bound at or above its upper edge, so each ``le`` count is exact to within
one host bucket (1/16 of the value).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from typing import Any, Callable, Iterator

from aiohttp import web
from prometheus_client.exposition import choose_encoder
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from nicsplit.console.api import CFG
from nicsplit.control.status import system_status
from nicsplit.core.config import Config
from nicsplit.core.ctl import request
from nicsplit.core.layout import Layout

__all__ = ["setup", "families", "StatusCollector", "CG_STATES", "VDISK_STATES", "SPLIT_BOUNDS", "MAX_AGE"]

log = logging.getLogger(__name__)

MAX_AGE = 1.0  # seconds a fetched status serves scrapes
CG_STATES = ("protected", "lagging", "refused", "card-down", "link-down", "initializing", "resyncing", "marking", "host-down",
             "failed-over")
VDISK_STATES = ("protected", "lagging", "marking", "resyncing", "initializing", "unprotected", "unknown", "error")
SPLIT_BOUNDS = (5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25,
                0.5, 1.0, 2.5, 5.0, 10.0)
PROCESSES = ("host", "card", "appliance", "console")

REGISTRY = web.AppKey("metrics_registry", CollectorRegistry)


def _num(x: Any) -> float | None:
    """A finite number, or None (absent, null, a string, a bool)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return float(x)


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


def _states(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return _gauge(name, doc + " (1 for the current state, 0 for the others)", [*labels, "state"])


def _one_hot(fam: GaugeMetricFamily, values: list[str], current: str, known: tuple[str, ...]) -> None:
    for s in (*known, *([current] if current not in known else [])):
        fam.add_metric([*values, s], 1.0 if s == current else 0.0)


def split_buckets(hist: dict) -> tuple[list[tuple[str, float]], float]:
    """Cumulative ``(le, count)`` pairs over `SPLIT_BOUNDS` (and +Inf) and
    the sum in seconds, from a host histogram's sparse form."""
    edges = [b * 1e9 for b in SPLIT_BOUNDS]
    counts = [0] * (len(edges) + 1)
    for upper_ns, n in hist.get("buckets") or []:
        i = next((k for k, e in enumerate(edges) if upper_ns <= e), len(edges))
        counts[i] += int(n)
    out, acc = [], 0
    for b, c in zip((*[repr(b) for b in SPLIT_BOUNDS], "+Inf"), counts):
        acc += c
        out.append((b, float(acc)))
    total = _num(hist.get("count"))
    if total is not None and total >= acc:  # the host's count is the truth for +Inf
        out[-1] = ("+Inf", total)
    return out, (_num(hist.get("sum_ns")) or 0.0) / 1e9


def families(status: dict, host_vdisks: dict[str, dict] | None = None) -> list[Metric]:
    """Every metric family from a status document (and the host's vdisks,
    by name, for their split histograms)."""
    up = _gauge("nicsplit_up", "Whether a nicsplit process is running (1) or not (0)", ["process"])
    procs = status.get("processes") or {}
    for p in sorted(set(PROCESSES) | set(procs)):
        up.add_metric([p], 1.0 if (procs.get(p) or {}).get("pid") else 0.0)

    cg_state = _states("nicsplit_cg_state", "A consistency group's protection state", ["cg"])
    vd_state = _states("nicsplit_vdisk_state", "A vdisk's protection state", ["cg", "vdisk"])
    per_cg: dict[str, tuple[str, str, Callable[[dict], Any]]] = {
        "nicsplit_rpo_seconds": ("Age of the oldest write not yet durable in the journal (recovery point objective)",
                                 "gauge", lambda c: c.get("rpo_seconds")),
        "nicsplit_rpo_bytes": ("Bytes written but not yet durable in the journal", "gauge", lambda c: c.get("rpo_bytes")),
        "nicsplit_protection_window_seconds": ("Age of the oldest point in time the journal holds", "gauge",
                                               lambda c: (c.get("protection_window") or {}).get("seconds")),
        "nicsplit_journal_bytes": ("Size of the CG's journal on the appliance", "gauge", lambda c: c.get("journal_bytes")),
        "nicsplit_last_durable_seq": ("Newest CG sequence number durable in the journal", "gauge",
                                      lambda c: c.get("last_durable_seq")),
        "nicsplit_host_last_seq": ("Newest CG sequence number the host handed out", "gauge",
                                   lambda c: c.get("host_last_seq")),
        "nicsplit_last_bookmark_timestamp_seconds": ("Time of the newest bookmark (Unix seconds)", "gauge",
                                                     lambda c: (c.get("last_bookmark") or {}).get("time")),
        "nicsplit_compression_ratio": ("Bytes before compression over bytes after", "gauge",
                                       lambda c: c.get("compression_ratio")),
        "nicsplit_dedup_ratio": ("Bytes before deduplication over bytes after", "gauge", lambda c: c.get("dedup_ratio")),
        "nicsplit_in_bytes": ("Bytes written by the CG's vdisks and split to the card", "counter",
                              lambda c: (c.get("throughput") or {}).get("in_bytes_total")),
        "nicsplit_out_bytes": ("Bytes the card shipped to the appliance for the CG", "counter",
                               lambda c: (c.get("throughput") or {}).get("out_bytes_total")),
    }
    fams: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
        name: (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, doc, labels=["cg"])
        for name, (doc, kind, _) in per_cg.items()}
    dirty = _gauge("nicsplit_dirty_bytes", "Bytes of a vdisk's dirty regions (written while unprotected, not yet resynced)",
                   ["cg", "vdisk"])
    resync = _gauge("nicsplit_resync_progress_ratio",
                    "Share of a vdisk's dirty regions copied to the card (1 when nothing is left to copy)", ["cg", "vdisk"])
    latency = HistogramMetricFamily("nicsplit_split_latency_seconds",
                                    "Time the host waits for the card to take a write (the split)", labels=["cg", "vdisk"])
    for c in status.get("cgs") or []:
        cg = str(c.get("name"))
        _one_hot(cg_state, [cg], str(c.get("state")), CG_STATES)
        for name, (_, _, get) in per_cg.items():
            v = _num(get(c))
            if v is not None:
                fams[name].add_metric([cg], v)
        for v in c.get("vdisks") or []:
            vd, st = str(v.get("name")), str(v.get("state"))
            _one_hot(vd_state, [cg, vd], st, VDISK_STATES)
            d = _num(v.get("dirty_bytes"))
            if d is not None:
                dirty.add_metric([cg, vd], d)
            pct = _num((v.get("resync") or {}).get("percent"))
            resync.add_metric([cg, vd], pct / 100 if pct is not None else 0.0 if st == "marking" else 1.0)
            hist = ((host_vdisks or {}).get(vd) or {}).get("split_hist")
            if isinstance(hist, dict):
                buckets, total = split_buckets(hist)
                latency.add_metric([cg, vd], buckets, total)

    out: list[Metric] = [up, cg_state, vd_state, *fams.values(), dirty, resync, latency]
    card = status.get("card") or {}
    for name, key, doc in (("nicsplit_hidden_volume_fill_ratio", "hidden_volume_fill", "Share of the card's hidden volume in use"),
                           ("nicsplit_overflow_fill_ratio", "overflow_fill", "Share of the card's overflow log in use"),
                           ("nicsplit_overflow_bytes", "overflow_bytes", "Bytes in the card's overflow log")):
        v = _num(card.get(key))
        if v is not None:
            out.append(GaugeMetricFamily(name, doc, value=v))
    alerts = _gauge("nicsplit_alert_active", "An alert that is firing (docs/operations.md \"Alerts\")", ["name", "severity", "cg"])
    for a in status.get("alerts") or []:
        if isinstance(a, dict):
            alerts.add_metric([str(a.get("name")), str(a.get("severity") or ""), str(a.get("cg") or "")], 1.0)
    out.append(alerts)
    return [f for f in out if f.samples]  # a family with no sample is noise in the exposition


def fetch(cfg: Config) -> tuple[dict, dict[str, dict]]:
    """A fresh status document and the host's vdisks by name (blocking IO)."""
    status = system_status(cfg)
    # This process answers the scrape: the console is up whoever started it.
    status.setdefault("processes", {}).setdefault("console", {})["pid"] = os.getpid()
    reply = request(Layout(cfg.data).host_sock, {"cmd": "status"})
    vdisks = ((reply or {}).get("status") or {}).get("vdisks") or []
    return status, {str(v.get("name")): v for v in vdisks if isinstance(v, dict)}


class StatusCollector(Collector):
    """Builds the families from a fetch that is at most ``max_age`` old;
    concurrent scrapes share one fetch (the lock)."""

    def __init__(self, fetch: Callable[[], tuple[dict, dict]], max_age: float = MAX_AGE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._fetch, self.max_age, self._clock = fetch, max_age, clock
        self._lock = threading.Lock()
        self._at = -math.inf
        self._value: tuple[dict, dict] | None = None
        self.fetches = 0

    def snapshot(self) -> tuple[dict, dict]:
        with self._lock:
            if self._value is None or self._clock() - self._at > self.max_age:
                self._value = self._fetch()
                self._at = self._clock()
                self.fetches += 1
            return self._value

    def collect(self) -> Iterator[Metric]:
        ok = GaugeMetricFamily("nicsplit_status_ok", "Whether the console could read the system's status (1) or not (0)")
        try:
            status, host = self.snapshot()
        except Exception:  # a scrape reports the failure as a metric; the log says why
            log.exception("metrics: reading the status failed")
            ok.add_metric([], 0.0)
            yield ok
            return
        ok.add_metric([], 1.0)
        yield ok
        yield from families(status, host)


def make_registry(fetch_fn: Callable[[], tuple[dict, dict]], max_age: float = MAX_AGE) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)  # no describe(): registering must not fetch
    reg.register(StatusCollector(fetch_fn, max_age))
    return reg


async def get_metrics(request: web.Request) -> web.Response:
    # Prometheus asks for OpenMetrics in Accept; curl and older scrapers get the text format.
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    body = await asyncio.to_thread(encoder, request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": content_type})


def setup(app: web.Application) -> None:
    cfg = app[CFG]
    app[REGISTRY] = make_registry(lambda: fetch(cfg))
    app.router.add_get("/metrics", get_metrics)
