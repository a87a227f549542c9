"""The JSON-lines control sockets in DATA/run (host.sock, card-ctl.sock,
appliance.sock): the one server loop and the one client.

Protocol: a request is one JSON object on one line, ``{"cmd": NAME, ...}``;
the reply is one JSON object on one line, ``{"ok": true, ...}`` or
``{"ok": false, "error": "one line"}``. A connection may carry several
requests in turn; the clients here send one and close.

Rules:
- A line that is not a JSON object reaches the handler as ``{}`` (so it
  answers "unknown command", each process in its own words).
- An error the handler raises from ``errors`` becomes ``{"ok": false,
  "error": str(e)}``; the connection lives on.
- A client that goes away or sends an over-long line costs its own
  connection only; a bug in a handler is logged with its traceback and ends
  that connection without a reply (the client sees no answer).
- Replies encode what JSON cannot (a Path, an enum) with ``str``.
- The socket is mode 0600 whatever the umask (only our user may ask): it is
  bound, chmodded, and only then listens, so nobody connects in between.
- A client must send each request line within ``read_timeout`` (30 s) of
  connecting or of its previous reply; one that sends nothing, or half a
  line, is disconnected then and holds no server task.

Example::

    async def handle(req: dict) -> dict:
        if req.get("cmd") == "ping":
            return {"ok": True, "pid": os.getpid()}
        return {"ok": False, "error": f"unknown command {req.get('cmd')!r}"}

    server = await serve(layout.host_sock, handle)
    ...
    request(layout.host_sock, {"cmd": "ping"})   # {"ok": True, "pid": ...}
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any, Awaitable, Callable

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def _event(line: str | bytes, name: str) -> dict[str, Any] | None:
    """The JSON object on ``line`` if its ``event`` is ``name``, else None."""
    try:
        msg = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return msg if isinstance(msg, dict) and msg.get("event") == name else None


def ready_message(line: str | bytes) -> dict[str, Any] | None:
    """The ``{"event": "ready", ...}`` object a child process prints on
    stdout once it serves (the supervisor and the test harness wait for it);
    None for any other line."""
    return _event(line, "ready")


def starting_message(line: str | bytes) -> dict[str, Any] | None:
    """The ``{"event": "starting", ...}`` object a child prints while a long
    start is under way (the appliance recovering a big journal): alive and
    working, not ready yet. None for any other line."""
    return _event(line, "starting")


def decode_request(line: bytes) -> dict[str, Any]:
    """One request line → its object; ``{}`` for anything that is not a JSON object."""
    try:
        req = json.loads(line or b"{}")
    except (ValueError, RecursionError):  # RecursionError: nesting too deep for json (e.g. "[" * 2000)
        return {}
    return req if isinstance(req, dict) else {}


def jsonable(obj: Any) -> Any:
    """Statistics (dataclasses, dicts, tuples of them) as plain JSON values."""
    if hasattr(obj, "__dataclass_fields__"):
        return {k: jsonable(getattr(obj, k)) for k in obj.__dataclass_fields__}
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def encode_reply(reply: dict[str, Any]) -> bytes:
    return json.dumps(reply, default=str).encode() + b"\n"


# Long enough for any client that means to send (a request is one short
# line, written at once); short enough that idle connections do not pile up.
READ_TIMEOUT = 30.0


async def serve(path: Path, handler: Handler, *, errors: tuple[type[BaseException], ...] = (),
                mode: int = 0o600, read_timeout: float = READ_TIMEOUT) -> asyncio.AbstractServer:
    """Listen on the Unix socket ``path`` (a stale one is replaced) and answer
    each request line with ``await handler(request)``. ``mode``: of the
    socket, set before it listens (rules); ``read_timeout``: per request line."""

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await asyncio.wait_for(reader.readline(), read_timeout):
                req = decode_request(line)
                try:
                    reply = await handler(req)
                except errors as e:
                    reply = {"ok": False, "error": str(e)}
                except Exception:  # a bug in the handler: this connection ends, the server lives on
                    log.exception("control socket %s: request %r failed", path, req.get("cmd"))
                    return
                writer.write(encode_reply(reply))
                await writer.drain()
        except asyncio.TimeoutError:  # before OSError: in 3.11 it is one
            log.info("control socket %s: a client sent no complete request for %gs: disconnected", path, read_timeout)
        except (OSError, asyncio.LimitOverrunError, ValueError):
            pass  # a client that went away or sent an over-long line: its problem only
        finally:
            writer.close()

    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, mode)  # before listen(): no one can connect to it yet
    except BaseException:
        sock.close()
        raise
    return await asyncio.start_unix_server(connection, sock=sock)


def request(path: Path, cmd: dict, timeout: float = 5.0) -> dict | None:
    """Send ``cmd``; the decoded reply, or None when nobody answers."""
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(json.dumps(cmd).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                buf += chunk
        return json.loads(buf)
    except (OSError, ValueError):
        return None
