"""An asyncio NBD server (`ImageServer`, `ReplicaServer`) run in-process in
its own event-loop thread, so a test can drive it with a blocking client."""

from __future__ import annotations

import asyncio
import threading
from typing import Any


class Served:
    """A server with ``async start(host, port) -> (host, port)`` and ``async
    stop()`` on ``host`` (127.0.0.1), port 0, in its own event-loop thread."""

    def __init__(self, srv: Any, host: str = "127.0.0.1") -> None:
        self.srv = srv
        self.listen_host = host
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> "Served":
        self.thread.start()
        self.host, self.port = asyncio.run_coroutine_threadsafe(self.srv.start(self.listen_host, 0), self.loop).result(10)
        return self

    def uri(self, name: str) -> str:
        return f"nbd://127.0.0.1:{self.port}/{name}"

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.srv.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
