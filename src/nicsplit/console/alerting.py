"""The console's alert loop: evaluate, diff, tell the webhook.

Every ``[alerts] interval`` (default 2 s) a background task computes the
status document (`nicsplit.control.status.system_status`, in a worker
thread: it talks to control sockets) and diffs its ``alerts`` against the
active set (`AlertState.update`, pure):

- an alert (identified by name and CG) that appears *fires*; one that is
  gone *clears*; one whose severity changed fires again with the new
  severity (its ``since`` stays);
- each active alert carries ``since`` (epoch seconds it first fired);
  `AlertState.current` is the list (the app holds it as ``app[ALERTS]``
  for the metrics and the dashboard).

Each event is POSTed to ``[alerts] webhook`` (when set) as JSON
``{"event": "fire" | "clear", "alert": {...alert, "since"}, "time"}``, in
order, by a sender task behind a bounded queue (a slow receiver never
delays the evaluation; when the queue is full the oldest event is dropped
and logged). A POST times out after `POST_TIMEOUT_S` and is tried
`ATTEMPTS` times with a doubling pause; a 2xx answer is success.

Wired into the app by `setup` (one line in `nicsplit.console.server.make_app`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator

import aiohttp
from aiohttp import web

from nicsplit.console.api import CFG
from nicsplit.control.alerts import AlertSettings
from nicsplit.control.status import system_status

__all__ = ["setup", "AlertState", "ALERTS", "POST_TIMEOUT_S", "ATTEMPTS"]

log = logging.getLogger(__name__)

POST_TIMEOUT_S = 3.0
ATTEMPTS = 3
QUEUE_MAX = 256


class AlertState:
    """The active alerts and their ``since``; `update` diffs a new evaluation."""

    def __init__(self) -> None:
        self._active: dict[tuple[str, str | None], dict[str, Any]] = {}
        self.evaluations = 0
        self.last_error: str | None = None  # the last evaluation that failed, and why
        self.webhook_sent = 0
        self.webhook_failed = 0

    def current(self) -> list[dict[str, Any]]:
        return [dict(a) for a in self._active.values()]

    def update(self, alerts: list[dict[str, Any]], now: float) -> list[dict[str, Any]]:
        """Take a fresh evaluation; the events it makes, in order (fires, then clears)."""
        self.evaluations += 1
        events: list[dict[str, Any]] = []
        seen: set[tuple[str, str | None]] = set()
        for a in alerts:
            key = (a["name"], a.get("cg"))
            seen.add(key)
            old = self._active.get(key)
            cur = {**a, "since": old["since"] if old else now}
            self._active[key] = cur
            if old is None or old["severity"] != a["severity"]:
                events.append({"event": "fire", "alert": dict(cur), "time": now})
        for key in [k for k in self._active if k not in seen]:
            events.append({"event": "clear", "alert": self._active.pop(key), "time": now})
        return events


ALERTS = web.AppKey("alerts", AlertState)


def setup(app: web.Application) -> None:
    app[ALERTS] = AlertState()
    app.cleanup_ctx.append(_alert_loop)


async def _alert_loop(app: web.Application) -> AsyncIterator[None]:
    settings = AlertSettings.from_config(app[CFG])  # a bad [alerts] stops the console's start, clearly
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(QUEUE_MAX)
    tasks = [asyncio.create_task(_evaluate_forever(app, settings, queue), name="alerts-evaluate")]
    if settings.webhook:
        tasks.append(asyncio.create_task(_send_forever(app[ALERTS], settings.webhook, queue), name="alerts-webhook"))
    yield
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _evaluate_forever(app: web.Application, settings: AlertSettings, queue: asyncio.Queue) -> None:
    state, cfg = app[ALERTS], app[CFG]
    while True:
        try:
            doc = await asyncio.to_thread(system_status, cfg)
            events = state.update(doc.get("alerts", []), time.time())
            state.last_error = None
        except Exception as e:  # status must keep being tried: say why this round failed
            log.exception("alert evaluation failed")
            state.last_error = f"{type(e).__name__}: {e}"
            events = []
        for ev in events:
            a = ev["alert"]
            log.warning("alert %s: %s %s%s: %s", ev["event"], a["severity"], a["name"],
                        f" ({a['cg']})" if a.get("cg") else "", a["message"])
            if settings.webhook:
                if queue.full():
                    dropped = queue.get_nowait()
                    log.error("webhook queue full: dropped the %s of %s", dropped["event"], dropped["alert"]["name"])
                queue.put_nowait(ev)
        await asyncio.sleep(settings.interval_s)


async def _send_forever(state: AlertState, url: str, queue: asyncio.Queue) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=POST_TIMEOUT_S)) as session:
        while True:
            ev = await queue.get()
            pause = 0.5
            for attempt in range(1, ATTEMPTS + 1):
                try:
                    async with session.post(url, json=ev) as r:
                        if 200 <= r.status < 300:
                            state.webhook_sent += 1
                            break
                        why = f"HTTP {r.status}"
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                    why = f"{type(e).__name__}: {e}"
                if attempt == ATTEMPTS:
                    state.webhook_failed += 1
                    log.error("webhook %s: %s of %s not delivered after %d attempts (%s)", url, ev["event"],
                              ev["alert"]["name"], ATTEMPTS, why)
                else:
                    await asyncio.sleep(pause)  # ok-sleep: retry backoff
                    pause *= 2
