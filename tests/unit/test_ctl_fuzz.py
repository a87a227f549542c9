"""Fuzz the JSON-lines control-socket protocol (nicsplit.core.ctl): arbitrary
lines — bad JSON, deep nesting, non-objects, wrong types, invalid UTF-8, over-long —
sent to a server in this process get one JSON reply each (``{"ok": ...}``)
or the connection is closed, and the server keeps serving the next client.
Derandomized; budgets in `nicsplit.testing.fuzz`."""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path

from hypothesis import example, given, strategies as st

from nicsplit.core import ctl
from nicsplit.testing.fuzz import fuzz_settings


class Refused(Exception):
    pass


async def handler(req: dict) -> dict:
    """Like the real handlers: reads fields without checking their types."""
    cmd = req.get("cmd")
    if cmd == "ping":
        return {"ok": True}
    if cmd == "echo":
        return {"ok": True, "n": len(req.get("args", ""))}  # TypeError on a number: a handler bug
    if cmd == "refuse":
        raise Refused(f"refused {req.get('why')!r}")
    return {"ok": False, "error": f"unknown command {cmd!r}"}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12)
requests = st.fixed_dictionaries({"cmd": st.sampled_from(["ping", "echo", "refuse", "nope", 3, None, [1]])},
                                 optional={"args": json_values, "why": json_values})
lines = st.one_of(
    st.binary(max_size=300).map(lambda b: b.replace(b"\n", b"")),
    requests.map(lambda r: json.dumps(r).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.integers(1, 100_000).map(lambda n: b"[" * n),          # nesting: RecursionError in json
    st.integers(1, 5000).map(lambda n: b"9" * n),              # over the int-digits limit
    st.integers(60_000, 70_000).map(lambda n: b'{"cmd":"' + b"x" * n + b'"}'),  # over the line limit
)


async def exchange(path: Path, batch: list[bytes]) -> list:
    """Send the lines one by one; the reply to each, or None once closed."""
    r, w = await asyncio.open_unix_connection(str(path), limit=1 << 20)  # a reply may echo a 64 KiB line
    out = []
    try:
        for line in batch:
            w.write(line + b"\n")
            await w.drain()
            reply = await asyncio.wait_for(r.readline(), 10)
            if not reply:
                out.append(None)
                break
            out.append(json.loads(reply))
    except (ConnectionResetError, BrokenPipeError):
        out.append(None)
    finally:
        w.close()
    return out


@fuzz_settings(60)
@given(st.lists(lines, min_size=1, max_size=4))
@example([b"[" * 100_000])  # found by this target: RecursionError ended the connection with no reply
@example([b'{"cmd": "echo", "args": 5}', b'{"cmd": "ping"}'])
def test_any_line_gets_a_reply_or_a_close_and_the_server_lives_on(batch):
    async def main(path: Path) -> None:
        server = await ctl.serve(path, handler, errors=(Refused,), read_timeout=10)
        try:
            replies = await exchange(path, batch)
            for line, reply in zip(batch, replies):
                if reply is None:  # closed: only for a handler bug or an over-long line
                    assert len(line) > 60_000 or b"echo" in line, line[:80]
                    break
                assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool)
                if not reply["ok"]:
                    assert isinstance(reply.get("error"), str)
                req = ctl.decode_request(line)
                if not req:  # not a JSON object: answered as {} ("unknown command")
                    assert reply == {"ok": False, "error": "unknown command None"}
            assert await exchange(path, [b'{"cmd": "ping"}']) == [{"ok": True}], "the server must serve on"
        finally:
            server.close()
            await server.wait_closed()

    with tempfile.TemporaryDirectory() as d:
        asyncio.run(main(Path(d) / "x.sock"))


@fuzz_settings(200)
@given(st.binary(max_size=200) | st.integers(1, 100_000).map(lambda n: b"[" * n + b"]" * n))
@example(b"[" * 100_000)
def test_decode_request_is_total(line):
    assert isinstance(ctl.decode_request(line), dict)
    assert ctl.ready_message(line) is None or isinstance(ctl.ready_message(line), dict)
