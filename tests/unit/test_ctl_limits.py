"""Issue 11: control sockets are 0600 whatever the umask, and a client that
sends nothing (or half a line) is disconnected after the read timeout."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from nicsplit.core import ctl

pytestmark = pytest.mark.unit


async def handler(req: dict) -> dict:
    return {"ok": True, "cmd": req.get("cmd")}


def test_socket_is_0600_under_any_umask(tmp_path: Path):
    path = tmp_path / "run" / "x.sock"

    async def main() -> None:
        old = os.umask(0)
        try:
            server = await ctl.serve(path, handler)
        finally:
            os.umask(old)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        server.close()
        await server.wait_closed()

    asyncio.run(main())


def test_silent_and_half_line_clients_are_disconnected(tmp_path: Path):
    path = tmp_path / "x.sock"

    async def main() -> None:
        server = await ctl.serve(path, handler, read_timeout=0.3)
        loop = asyncio.get_running_loop()
        silent_r, silent_w = await asyncio.open_unix_connection(str(path))
        half_r, half_w = await asyncio.open_unix_connection(str(path))
        half_w.write(b'{"cmd": "pi')
        # a well-behaved client is served meanwhile
        assert await loop.run_in_executor(None, ctl.request, path, {"cmd": "ping"}) == {"ok": True, "cmd": "ping"}
        # both idle clients see the server close their connection (EOF) soon after the timeout
        assert await asyncio.wait_for(silent_r.read(), 10) == b""
        assert await asyncio.wait_for(half_r.read(), 10) == b""
        # a client that keeps talking within the timeout keeps its connection
        r, w = await asyncio.open_unix_connection(str(path))
        for i in range(3):
            w.write(b'{"cmd": "n%d"}\n' % i)
            assert b'"n%d"' % i in await asyncio.wait_for(r.readline(), 10)
        for wr in (silent_w, half_w, w):
            wr.close()
        server.close()
        await server.wait_closed()

    asyncio.run(main())
