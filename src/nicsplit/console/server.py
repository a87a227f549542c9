"""The console's HTTP server (aiohttp): the app factory, authentication and
the foreground runner.

Rules:
- Everything under ``/api/`` needs ``Authorization: Bearer TOKEN`` (the
  token of `nicsplit.console.token`); no token or a wrong one gets 401 with
  ``WWW-Authenticate: Bearer``. ``/metrics`` and the dashboard's static
  files do not: Prometheus scrapes without a secret, and the dashboard's
  page holds no data (its script calls the API with the token).
- It listens on loopback by default (``[console] listen``).
- Handlers never block the event loop: status and recovery operations run
  in a worker thread (`asyncio.to_thread`), since they talk to control
  sockets and read journals with blocking IO.
- The address it really listens on (port 0 picks one) is written to
  ``DATA/run/console.json`` so that ``nicsplit status`` can name the
  endpoints.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from typing import Any, Callable

from aiohttp import web

from nicsplit.console import alerting
from nicsplit.console import api
from nicsplit.console import dashboard
from nicsplit.console import history
from nicsplit.console import metrics
from nicsplit.console.api import CFG
from nicsplit.console.token import ensure_token, token_matches
from nicsplit.core.config import Config, parse_listen
from nicsplit.core.fsutil import atomic_write
from nicsplit.core.layout import Layout

log = logging.getLogger(__name__)

__all__ = ["make_app", "serve", "CFG", "endpoints"]

DEFAULT_LISTEN = "127.0.0.1:10811"


def _auth(token: str) -> Callable:
    @web.middleware
    async def middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
        if request.path.startswith("/api/") and not token_matches(request.headers.get("Authorization"), token):
            raise web.HTTPUnauthorized(text=json.dumps({"error": "missing or wrong bearer token"}),
                                       content_type="application/json",
                                       headers={"WWW-Authenticate": 'Bearer realm="nicsplit"'})
        return await handler(request)
    return middleware


def make_app(cfg: Config, token: str) -> web.Application:
    app = web.Application(middlewares=[_auth(token)])
    app[CFG] = cfg
    api.setup(app)
    alerting.setup(app)
    metrics.setup(app)
    history.setup(app)
    dashboard.setup(app)
    return app


def endpoints(address: str) -> dict[str, str]:
    base = f"http://{address}"
    return {"api": f"{base}/api/v1", "metrics": f"{base}/metrics", "dashboard": f"{base}/"}


async def serve(cfg: Config, listen: str | None = None, ready: Callable[[dict], None] | None = None) -> None:
    lay = Layout(cfg.data)
    token = ensure_token(lay.api_token)
    host, port = parse_listen(listen or cfg.console("listen", DEFAULT_LISTEN))
    runner = web.AppRunner(make_app(cfg, token), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    sockets = site._server.sockets if site._server else []  # type: ignore[union-attr]  # aiohttp keeps the bound port only here
    bound = sockets[0].getsockname()[1] if sockets else port
    address = f"{host}:{bound}"
    info: dict[str, Any] = {"event": "ready", "pid": os.getpid(), "address": address, "endpoints": endpoints(address)}
    atomic_write(lay.console_info, json.dumps(info).encode())
    log.info("console listening on http://%s", address)
    if ready:
        ready(info)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        lay.console_info.unlink(missing_ok=True)
        await runner.cleanup()
