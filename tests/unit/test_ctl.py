"""nicsplit.core.ctl: the one JSON-lines control socket (server and client)."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from nicsplit.core import ctl


class Refused(Exception):
    pass


async def handler(req: dict) -> dict:
    cmd = req.get("cmd")
    if cmd == "echo":
        return {"ok": True, "req": req, "path": Path("/x")}  # a Path goes out as str
    if cmd == "refuse":
        raise Refused("no, because")
    if cmd == "bug":
        raise KeyError("a bug")
    return {"ok": False, "error": f"unknown command {cmd!r}"}


def test_requests_replies_errors_and_garbage(tmp_path: Path):
    path = tmp_path / "run" / "x.sock"

    async def main() -> None:
        server = await ctl.serve(path, handler, errors=(Refused,), mode=0o600)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        loop = asyncio.get_running_loop()

        def ask(cmd: dict) -> dict | None:
            return ctl.request(path, cmd, timeout=5)

        assert await loop.run_in_executor(None, ask, {"cmd": "echo", "a": 1}) == \
            {"ok": True, "req": {"cmd": "echo", "a": 1}, "path": "/x"}
        assert await loop.run_in_executor(None, ask, {"cmd": "refuse"}) == {"ok": False, "error": "no, because"}
        assert await loop.run_in_executor(None, ask, {"cmd": "bug"}) is None  # no answer; the server lives on
        # Several lines on one connection; garbage and non-objects reach the handler as {}.
        r, w = await asyncio.open_unix_connection(str(path))
        for line in (b"not json\n", b"[1, 2]\n", b'{"cmd": "nope"}\n', b'{"cmd": "echo"}\n'):
            w.write(line)
        replies = [json.loads(await r.readline()) for _ in range(4)]
        assert replies[:3] == [{"ok": False, "error": "unknown command None"}] * 2 + \
            [{"ok": False, "error": "unknown command 'nope'"}]
        assert replies[3]["ok"] is True
        w.close()
        server.close()
        await server.wait_closed()

    asyncio.run(main())


def test_request_without_a_server_is_none(tmp_path: Path):
    assert ctl.request(tmp_path / "none.sock", {"cmd": "ping"}, timeout=1) is None


def test_jsonable_flattens_statistics():
    @dataclass(frozen=True)
    class Inner:
        n: int
        per: dict

    @dataclass(frozen=True)
    class Outer:
        inner: Inner
        items: tuple

    assert ctl.jsonable(Outer(Inner(1, {2: (3, 4)}), (Inner(5, {}),))) == \
        {"inner": {"n": 1, "per": {"2": [3, 4]}}, "items": [{"n": 5, "per": {}}]}
