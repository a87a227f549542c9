"""`nicsplit host serve --stdio`: one NBD session on standard input and
output, as ``nbdkit -s`` (issue 11 Build item 4: the whole server, codec,
session and chains, can be fuzzed by feeding a process bytes).

- stdin a socket (libnbd's ``nbd_connect_command`` / ``connect_systemd_socket``
  hand the server one end of a socketpair): the session runs on it directly.
- stdin and stdout pipes (a fuzzer): `_PipePair` joins the two pipe
  transports into the one duplex transport `NBDSession` expects, with its
  flow control (pause/resume reading on stdin, write-buffer marks on stdout).

TLS is off on stdio (the peer is our parent). The listener limits that
concern many clients (connection cap) do not apply; the handshake, idle and
send timeouts and the byte bounds do. The process ends when the session does.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

from nicsplit.host.nbdpolicy import NO_TLS
from nicsplit.host.session import NBDSession


class _PipePair(asyncio.Transport):
    """stdin's read transport and stdout's write transport as one."""

    def __init__(self, read: asyncio.ReadTransport, write: asyncio.WriteTransport) -> None:
        super().__init__()
        self._r = read
        self._w = write

    def write(self, data: Any) -> None:
        self._w.write(data)

    def writelines(self, data: Any) -> None:
        self._w.writelines(data)

    def get_write_buffer_size(self) -> int:
        return self._w.get_write_buffer_size()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._w.set_write_buffer_limits(high, low)

    def pause_reading(self) -> None:
        if not self._r.is_closing():
            self._r.pause_reading()

    def resume_reading(self) -> None:
        if not self._r.is_closing():
            self._r.resume_reading()

    def is_closing(self) -> bool:
        return self._w.is_closing()

    def close(self) -> None:   # stdout is flushed first, then closed
        self._r.close()
        self._w.close()

    def abort(self) -> None:
        self._r.close()
        self._w.abort()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return "stdio" if name == "peername" else default


class _Forward(asyncio.Protocol):
    """Data, EOF and flow control go to the NBD session as they come."""

    session: NBDSession

    def data_received(self, data: bytes) -> None:
        self.session.data_received(data)

    def eof_received(self) -> bool:
        self.session.eof_received()
        return False

    def pause_writing(self) -> None:
        self.session.pause_writing()

    def resume_writing(self) -> None:
        self.session.resume_writing()


class _Side(_Forward):
    """One pipe's protocol, forwarding to the session; ``done`` resolves when
    stdout is closed (after its buffer drained) or broken."""

    def __init__(self, session: NBDSession, done: asyncio.Future, writer: bool,
                 stdout: asyncio.WriteTransport | None = None) -> None:
        self.session = session
        self.done = done
        self.writer = writer
        self.stdout = stdout

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self.writer and self.stdout is not None:
            self.session.connection_made(_PipePair(transport, self.stdout))  # type: ignore[arg-type, abstract]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.writer and not self.done.done():
            self.session.connection_lost(exc)
            self.done.set_result(None)
        elif not self.writer:   # stdin gone: finish what is in flight, then close
            self.session.shutdown()


async def serve_stdio(host: Any) -> None:
    """Serve one NBD session on fds 0 and 1 until it ends."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()
    session = NBDSession(host, NO_TLS)
    try:
        sock = socket.socket(fileno=os.dup(0))
    except OSError:
        sock = None   # not a socket: pipes (or a tty)
    if sock is not None:
        await loop.connect_accepted_socket(lambda: _SocketSession(session, done), sock)
    else:
        w, _ = await loop.connect_write_pipe(lambda: _Side(session, done, True), os.fdopen(1, "wb", buffering=0))
        # The read side's connection_made (before any data) starts the session.
        await loop.connect_read_pipe(lambda: _Side(session, done, False, w), os.fdopen(0, "rb", buffering=0))
    await done


class _SocketSession(_Forward):
    """The session on stdin's socket, resolving ``done`` when it ends."""

    def __init__(self, session: NBDSession, done: asyncio.Future) -> None:
        self.session = session
        self.done = done

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.session.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.connection_lost(exc)
        if not self.done.done():
            self.done.set_result(None)
