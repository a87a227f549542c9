"""The REST API under ``/api/v1`` (docs/operations.md "REST API").

Each handler calls the same library function the CLI command calls, in a
worker thread, and returns its JSON.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from nicsplit.control.status import system_status

__all__ = ["setup"]


async def get_status(request: web.Request) -> web.Response:
    from nicsplit.console.server import CFG  # server imports this module
    return web.json_response(await asyncio.to_thread(system_status, request.app[CFG]))


def setup(app: web.Application) -> None:
    app.router.add_get("/api/v1/status", get_status)
