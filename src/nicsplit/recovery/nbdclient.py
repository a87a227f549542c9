"""A blocking NBD client for one export: the IO loop around the sans-IO
client codec (`nicsplit.wire.nbd.ClientConnection`).

Failback copies the failover site's changes to production through it:
WRITE / WRITE_ZEROES / FLUSH, up to ``depth`` requests in flight, simple
replies only (structured replies are never asked for). Verify reads
production with it (``read_many``: READs pipelined the same way; opened
with ``readonly_ok``). ``nbd://HOST:PORT/EXPORT`` and
``nbd+unix:///EXPORT?socket=PATH`` URIs.

Example::

    with NbdClient("nbd://127.0.0.1:10809/web1-root") as c:
        c.write(0, b"x" * 4096)
        c.flush()
"""

from __future__ import annotations

import errno
import socket
import urllib.parse

from nicsplit.wire import nbd as N

# 1 MiB requests, 16 in flight: about what nbdcopy uses per connection.
COPY_DEPTH = 16
# Payloads this large go in their own send() instead of being joined to the
# header (a copy of up to 1 MiB per request otherwise).
_JOIN_BELOW = 64 << 10


class NbdError(Exception):
    """The NBD server refused or failed something (one line)."""


class NbdClient:
    def __init__(self, uri: str, *, depth: int = COPY_DEPTH, timeout: float = 60.0, readonly_ok: bool = False) -> None:
        self.uri = uri
        self.depth = depth
        u = urllib.parse.urlsplit(uri)
        if u.scheme == "nbd":
            export = urllib.parse.unquote(u.path.lstrip("/"))
            self.sock = socket.create_connection((u.hostname or "127.0.0.1", u.port or 10809), timeout=timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        elif u.scheme == "nbd+unix":
            path = urllib.parse.parse_qs(u.query).get("socket", [""])[0]
            if not path:
                raise NbdError(f"{uri}: nbd+unix needs ?socket=PATH")
            export = urllib.parse.unquote(u.path.lstrip("/"))
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.settimeout(timeout)
            self.sock.connect(path)
        else:
            raise NbdError(f"{uri}: not an nbd:// or nbd+unix:// URI")
        self.export = export
        self.conn = N.ClientConnection(export)
        self._cookie = 0
        self._inflight: dict[int, tuple[str, int, int]] = {}
        self._data: dict[int, bytes] = {}  # cookie -> a READ's data, until read_many takes it
        try:
            ready = self._next()
            assert isinstance(ready, N.ExportReady)
        except BaseException:
            self.sock.close()
            raise
        self.size, self.flags = ready.size, ready.flags
        if self.flags & N.NBD_FLAG_READ_ONLY and not readonly_ok:
            self.sock.close()
            raise NbdError(f"{uri}: the export is read-only (is the consistency group still fenced?)")
        self.can_zero = bool(self.flags & N.NBD_FLAG_SEND_WRITE_ZEROES)

    def _next(self) -> object:
        """The codec's next event, receiving (and sending its handshake) as needed."""
        try:
            while True:
                ev = self.conn.next_event()
                out = self.conn.data_to_send()
                if out:
                    self.sock.sendall(out)
                if ev is not N.NEED_DATA:
                    return ev
                self.conn.receive_data(self.sock.recv(256 << 10))
        except N.RemoteProtocolError as e:
            raise NbdError(f"{self.uri}: {e}") from None

    def _send(self, cmd: int, what: str, offset: int, length: int, data: bytes | memoryview = b"") -> int:
        while len(self._inflight) >= self.depth:
            self._reply()
        self._cookie += 1
        self._inflight[self._cookie] = (what, offset, length)
        head = self.conn.request(cmd, self._cookie, offset, length)
        if data and len(data) < _JOIN_BELOW:
            self.sock.sendall(head + bytes(data))
        else:
            self.sock.sendall(head)
            if data:
                self.sock.sendall(data)
        return self._cookie

    def _reply(self) -> None:
        r = self._next()
        assert isinstance(r, N.Reply)
        if r.handle not in self._inflight:
            raise NbdError(f"{self.uri}: unexpected reply (cookie {r.handle})")
        what, off, n = self._inflight.pop(r.handle)
        if r.error:
            name = errno.errorcode.get(r.error, str(r.error))
            hint = " (is the consistency group still fenced?)" if r.error == N.NBD_EPERM else ""
            raise NbdError(f"{self.uri}: {what} of {n} bytes at offset {off} failed: {name}{hint}")
        if what == "read":
            self._data[r.handle] = r.data

    def read_many(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        """The data of each (offset, length), in order: up to ``depth`` READs
        in flight (the caller bounds the total by the ranges it asks for)."""
        cookies = [self._send(N.NBD_CMD_READ, "read", off, n) for off, n in ranges]
        out = []
        for c in cookies:
            while c not in self._data:
                self._reply()
            out.append(self._data.pop(c))
        return out

    def read(self, offset: int, length: int) -> bytes:
        return self.read_many([(offset, length)])[0]

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self._send(N.NBD_CMD_WRITE, "write", offset, len(data), data)

    def zero(self, offset: int, length: int) -> None:
        self._send(N.NBD_CMD_WRITE_ZEROES, "write-zeroes", offset, length)

    def flush(self) -> None:
        """Wait for every request, then make them durable (NBD_CMD_FLUSH)."""
        while self._inflight:
            self._reply()
        self._send(N.NBD_CMD_FLUSH, "flush", 0, 0)
        while self._inflight:
            self._reply()

    def close(self) -> None:
        try:
            if not self._inflight:
                self.sock.sendall(self.conn.request(N.NBD_CMD_DISC, 0))
        except OSError:
            pass
        self.sock.close()

    def __enter__(self) -> "NbdClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
