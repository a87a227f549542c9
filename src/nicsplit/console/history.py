"""The dashboard's charts over time: a background task samples
`system_status` every ``[console] history_interval`` (default 2 s) into a
bounded ring covering ``[console] history`` (default 1 h), and
``GET /api/v1/history[?cg=CG][&since=T]`` returns the series.

The console holds no state a restart could lose: the ring is a view for
eyes, it starts empty with the process, and Prometheus (``/metrics``) is
where long history belongs.

A sample per CG: ``t`` (Unix seconds), ``state``, ``rpo_seconds``,
``rpo_bytes``, ``journal_bytes``, ``protection_window_seconds``,
``in_bytes_per_s`` / ``out_bytes_per_s`` (the status document's throughput,
or the rate of its byte totals between two samples) and ``writes_per_s`` /
``durable_per_s`` (the rate of the host's and the journal's CG sequence
numbers: writes split and writes made durable). A value the status does not
give is null.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from typing import Any, AsyncIterator

from aiohttp import web

from nicsplit.console.api import CFG
from nicsplit.control.status import system_status
from nicsplit.core.cgs import CGCatalog
from nicsplit.core.config import ConfigError
from nicsplit.recovery.retention import parse_duration

__all__ = ["History", "setup", "HISTORY"]

log = logging.getLogger(__name__)

INTERVAL = 2.0
WINDOW = 3600.0


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return float(x)


def _rate(now: float | None, before: float | None, dt: float) -> float | None:
    if now is None or before is None or dt <= 0 or now < before:  # a restart resets totals: no rate
        return None
    return (now - before) / dt


class History:
    """A ring of samples, oldest first: ``(t, {cg: point})``."""

    def __init__(self, interval: float = INTERVAL, window: float = WINDOW) -> None:
        self.interval = interval
        self.window = window
        self.samples: deque[tuple[float, dict[str, dict]]] = deque(maxlen=max(2, int(window / interval)))
        self._totals: dict[str, dict[str, float | None]] = {}  # per CG: the counters the last sample saw

    def add(self, t: float, status: dict) -> None:
        prev_t = self.samples[-1][0] if self.samples else None
        dt = t - prev_t if prev_t is not None else 0.0
        points: dict[str, dict] = {}
        totals: dict[str, dict[str, float | None]] = {}
        for c in status.get("cgs") or []:
            name = str(c.get("name"))
            tp = c.get("throughput") or {}
            now = {"in": _num(tp.get("in_bytes_total")), "out": _num(tp.get("out_bytes_total")),
                   "host": _num(c.get("host_last_seq")), "durable": _num(c.get("last_durable_seq"))}
            before = self._totals.get(name, {})
            totals[name] = now
            in_rate = _num(tp.get("in_bytes_per_s"))
            out_rate = _num(tp.get("out_bytes_per_s"))
            points[name] = {
                "t": t, "state": c.get("state"),
                "rpo_seconds": _num(c.get("rpo_seconds")), "rpo_bytes": _num(c.get("rpo_bytes")),
                "journal_bytes": _num(c.get("journal_bytes")),
                "protection_window_seconds": _num((c.get("protection_window") or {}).get("seconds")),
                "in_bytes_per_s": in_rate if in_rate is not None else _rate(now["in"], before.get("in"), dt),
                "out_bytes_per_s": out_rate if out_rate is not None else _rate(now["out"], before.get("out"), dt),
                "writes_per_s": _rate(now["host"], before.get("host"), dt),
                "durable_per_s": _rate(now["durable"], before.get("durable"), dt),
            }
        self._totals = totals
        self.samples.append((t, points))

    def series(self, cg: str, since: float | None = None) -> list[dict]:
        return [p[cg] for t, p in self.samples if cg in p and (since is None or t > since)]

    def cgs(self) -> list[str]:
        names: dict[str, None] = {}
        for _, p in self.samples:
            names.update(dict.fromkeys(p))
        return list(names)


HISTORY = web.AppKey("history", History)


async def sample_forever(app: web.Application) -> None:
    hist, cfg = app[HISTORY], app[CFG]
    loop = asyncio.get_running_loop()
    failing = False
    while True:
        t0 = loop.time()
        try:
            hist.add(time.time(), await asyncio.to_thread(system_status, cfg))
            failing = False
        except Exception as e:  # status fails only on a broken data directory; say so once, keep trying
            if not failing:
                log.warning("history: reading the status failed: %s", e)
            failing = True
        await asyncio.sleep(max(0.0, hist.interval - (loop.time() - t0)))


async def _sampler(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(sample_forever(app), name="console-history")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _bad(message: str, status: type[web.HTTPException] = web.HTTPBadRequest) -> web.HTTPException:
    return status(text=web.json_response({"error": message}).text, content_type="application/json")


async def get_history(request: web.Request) -> web.Response:
    hist = request.app[HISTORY]
    since = None
    if "since" in request.query:
        try:
            since = float(request.query["since"])
        except ValueError:
            raise _bad(f"since={request.query['since']!r}: not a number (Unix seconds)") from None
    head = {"interval": hist.interval, "window_seconds": hist.window}
    cg = request.query.get("cg")
    if cg is None:
        return web.json_response({**head, "cgs": {name: hist.series(name, since) for name in hist.cgs()}})
    if cg not in hist.cgs():
        known = await asyncio.to_thread(lambda: [c.name for c in CGCatalog(request.app[CFG].data).list()])
        if cg not in known:
            raise _bad(f"no consistency group {cg!r}", web.HTTPNotFound)
    return web.json_response({**head, "cg": cg, "samples": hist.series(cg, since)})


def setup(app: web.Application) -> None:
    cfg = app[CFG]
    interval = parse_duration(cfg.console("history_interval", INTERVAL), "[console] history_interval")
    window = parse_duration(cfg.console("history", WINDOW), "[console] history")
    if interval <= 0 or window < interval:
        raise ConfigError(f"[console] history_interval = {interval:g}s must be > 0 and at most history = {window:g}s")
    app[HISTORY] = History(interval, window)
    app.cleanup_ctx.append(_sampler)
    app.router.add_get("/api/v1/history", get_history)
