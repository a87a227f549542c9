"""The sans-IO NBD client codec (nicsplit.wire.nbd.ClientConnection) wired
back to back with the server codec in memory, input fed at every split
point; and the blocking client (recovery.nbdclient) over a socketpair."""

from __future__ import annotations

import socket
import threading

import pytest

from nicsplit.recovery.nbdclient import NbdClient, NbdError
from nicsplit.wire import nbd as N
from nicsplit.wire.nbd import (
    NEED_DATA, ClientConnection, ExportInfo, ExportReady, LocalProtocolError, Negotiated, RemoteProtocolError,
    Reply, Request, ServerConnection,
)

SIZE = 1 << 20


class Provider:
    def __init__(self, *exports: ExportInfo) -> None:
        self.exports = {e.name: e for e in exports}

    def lookup(self, name: str) -> ExportInfo | None:
        return self.exports.get(name)

    def list_exports(self) -> list[ExportInfo]:
        return list(self.exports.values())


def feed(conn, data: bytes, step: int) -> list:
    """Feed ``data`` in ``step``-byte pieces; every event produced."""
    events = []
    for i in range(0, len(data), step):
        conn.receive_data(data[i:i + step])
        while (ev := conn.next_event()) is not NEED_DATA:
            events.append(ev)
    return events


def handshake(client: ClientConnection, server: ServerConnection, step: int) -> tuple[list, list]:
    cev = feed(client, server.data_to_send(), step)  # greeting -> client flags + OPT_GO
    sev = feed(server, client.data_to_send(), step)
    cev += feed(client, server.data_to_send(), step)  # INFO + ACK
    return cev, sev


@pytest.mark.parametrize("step", [1, 3, 7, 64, 4096])
def test_client_and_server_codecs_back_to_back(step):
    server = ServerConnection(Provider(ExportInfo("disk", SIZE)))
    client = ClientConnection("disk")
    cev, sev = handshake(client, server, step)
    assert cev == [ExportReady(SIZE, cev[0].flags)]
    assert not cev[0].flags & N.NBD_FLAG_READ_ONLY and cev[0].flags & N.NBD_FLAG_SEND_WRITE_ZEROES
    assert isinstance(sev[0], Negotiated) and sev[0].export.name == "disk"

    payload = bytes(range(256)) * 16
    wire = client.request(N.NBD_CMD_WRITE, 7, 4096, len(payload)) + payload
    wire += client.request(N.NBD_CMD_WRITE_ZEROES, 8, 0, 8192)
    wire += client.request(N.NBD_CMD_FLUSH, 9)
    reqs = feed(server, wire, step)
    assert [(r.cmd, r.handle, r.offset, r.length, r.error) for r in reqs] == [
        (N.NBD_CMD_WRITE, 7, 4096, len(payload), 0), (N.NBD_CMD_WRITE_ZEROES, 8, 0, 8192, 0),
        (N.NBD_CMD_FLUSH, 9, 0, 0, 0)]
    assert bytes(reqs[0].data) == payload
    replies = server.reply_ok(8) + server.reply_error(7, N.NBD_EIO) + server.reply_ok(9)
    assert feed(client, replies, step) == [Reply(8, 0), Reply(7, N.NBD_EIO), Reply(9, 0)]


def test_client_refused_export_and_bad_server():
    server = ServerConnection(Provider(ExportInfo("disk", SIZE)))
    client = ClientConnection("nope")
    feed(client, server.data_to_send(), 4096)
    feed(server, client.data_to_send(), 4096)
    with pytest.raises(RemoteProtocolError, match="export 'nope' refused"):
        feed(client, server.data_to_send(), 4096)
    with pytest.raises(RemoteProtocolError):  # sticky
        client.next_event()

    with pytest.raises(RemoteProtocolError, match="not a fixed-newstyle NBD server"):
        feed(ClientConnection("x"), b"\0" * 18, 18)
    with pytest.raises(RemoteProtocolError, match="closed the connection"):
        ClientConnection("x").receive_data(b"")
    with pytest.raises(LocalProtocolError):
        ClientConnection("x").request(N.NBD_CMD_FLUSH, 1)


def serve_socket(sock: socket.socket, provider: Provider, writes: list) -> None:
    """A minimal server loop over the server codec (the test's peer)."""
    conn = ServerConnection(provider)
    sock.sendall(conn.data_to_send())
    while True:
        data = sock.recv(1 << 16)
        conn.receive_data(data)
        while (ev := conn.next_event()) is not NEED_DATA:
            if isinstance(ev, Request):
                if ev.cmd == N.NBD_CMD_WRITE and not ev.error:
                    writes.append((ev.offset, bytes(ev.data)))
                sock.sendall(conn.reply_error(ev.handle, ev.error) if ev.error else conn.reply_ok(ev.handle))
            elif not isinstance(ev, Negotiated):
                sock.close()
                return
        out = conn.data_to_send()
        if out:
            sock.sendall(out)


def test_blocking_client_over_a_socket(tmp_path):
    path = str(tmp_path / "nbd.sock")
    lsock = socket.socket(socket.AF_UNIX)
    lsock.bind(path)
    lsock.listen(2)
    writes: list = []

    def accept(provider: Provider) -> threading.Thread:
        def run() -> None:
            s, _ = lsock.accept()
            serve_socket(s, provider, writes)
        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t

    t = accept(Provider(ExportInfo("disk", SIZE)))
    with NbdClient(f"nbd+unix:///disk?socket={path}", depth=2) as c:
        assert (c.size, c.can_zero) == (SIZE, True)
        for i in range(5):  # more than depth: replies are collected while sending
            c.write(i * 65536, bytes([i + 1]) * 65536)
        c.zero(0, 4096)
        c.flush()
    t.join(5)
    assert sorted(writes) == [(i * 65536, bytes([i + 1]) * 65536) for i in range(5)]

    t = accept(Provider(ExportInfo("disk", SIZE, readonly=True)))
    with pytest.raises(NbdError, match="read-only"):
        NbdClient(f"nbd+unix:///disk?socket={path}")
    t.join(5)
    lsock.close()
    with pytest.raises(NbdError, match="not an nbd"):
        NbdClient("http://x/disk")


@pytest.mark.parametrize("step", [1, 5, 16, 17, 4096, 1 << 16])
def test_client_codec_reads_data_at_every_split(step):
    """A READ's reply carries exactly its length of data, whatever pieces
    it arrives in; a failed READ carries none, and the next reply after it
    is parsed from the right byte (verify reads production with this)."""
    server = ServerConnection(Provider(ExportInfo("disk", SIZE)))
    client = ClientConnection("disk")
    handshake(client, server, step)
    wire = client.request(N.NBD_CMD_READ, 1, 0, 4096) + client.request(N.NBD_CMD_READ, 2, 8192, 512)
    wire += client.request(N.NBD_CMD_READ, 3, 0, 4096) + client.request(N.NBD_CMD_FLUSH, 4)
    reqs = feed(server, wire, step)
    assert [(r.cmd, r.handle, r.length) for r in reqs] == [
        (N.NBD_CMD_READ, 1, 4096), (N.NBD_CMD_READ, 2, 512), (N.NBD_CMD_READ, 3, 4096), (N.NBD_CMD_FLUSH, 4, 0)]
    a, b = bytes(range(256)) * 16, b"\x5a" * 512
    replies = b"".join(server.reply_read(2, 8192, b)) + server.reply_error(3, N.NBD_EIO)
    replies += b"".join(server.reply_read(1, 0, a)) + server.reply_ok(4)
    assert feed(client, replies, step) == [Reply(2, 0, b), Reply(3, N.NBD_EIO), Reply(1, 0, a), Reply(4, 0)]
    with pytest.raises(LocalProtocolError, match="already in flight"):
        client.request(N.NBD_CMD_READ, 5, 0, 1)
        client.request(N.NBD_CMD_READ, 5, 0, 1)
