"""The NBD codec's lent sinks (`ServerConnection.lend`, `sink_buffer`,
`sink_received`, `abandon_sink`): a large write's payload lands in the
buffer the IO layer lent, whether its bytes come through ``receive_data``
or straight into ``sink_buffer()``, at every split point; ``filled`` follows
every byte; a refused write lends nothing; a payload cut by EOF hands its
sink back. Client and server codecs back to back, in memory."""

from __future__ import annotations

import pytest

from nicsplit.wire import nbd as N

SIZE = 1 << 24
PAYLOAD = 96 * 1024  # above the codec's 64 KiB sink threshold


class Provider:
    def lookup(self, name):
        return N.ExportInfo("disk", SIZE) if name in ("", "disk") else None

    def list_exports(self):
        return [N.ExportInfo("disk", SIZE)]


class Lent:
    def __init__(self, n: int) -> None:
        self.store = bytearray(n)
        self.buf = memoryview(self.store)
        self.data = self.buf.toreadonly()
        self.marks: list[int] = []

    def filled(self, n: int) -> None:
        self.marks.append(n)


def connected() -> tuple[N.ServerConnection, N.ClientConnection]:
    srv, cli = N.ServerConnection(Provider()), N.ClientConnection("disk")
    negotiated = False
    for _ in range(20):
        out = srv.data_to_send()
        if out:
            cli.receive_data(out)
        ev = cli.next_event()
        if isinstance(ev, N.ExportReady):
            assert negotiated and srv.phase == "transmission"
            return srv, cli
        req = cli.data_to_send()
        if req:
            srv.receive_data(req)
        while (got := srv.next_event()) is not N.NEED_DATA:
            assert isinstance(got, N.Negotiated), got
            negotiated = True
    raise AssertionError("no handshake")


def feed(srv: N.ServerConnection, data: bytes, cuts: list[int], direct: bool) -> list:
    """Feed ``data`` in pieces ending at ``cuts``; with ``direct``, whatever
    the codec offers through sink_buffer goes there (as recv_into would)."""
    evs, at = [], 0
    for end in [*cuts, len(data)]:
        while at < end:
            mv = srv.sink_buffer(end - at) if direct else None
            if mv is not None:
                n = len(mv)
                mv[:] = data[at: at + n]
                srv.sink_received(n)
            else:
                n = end - at
                srv.receive_data(data[at: at + n])
            at += n
            while (ev := srv.next_event()) is not N.NEED_DATA:
                evs.append(ev)
    return evs


@pytest.mark.parametrize("direct", [False, True])
def test_a_lent_sink_gets_the_payload_at_every_split_point(rng, direct):
    payload = rng.randbytes(PAYLOAD)
    frame_len = 28 + PAYLOAD
    points = sorted({0, 1, 27, 28, 29, 4096, 65536, frame_len - 1, *rng.sample(range(1, frame_len), 40)})
    for cut in points:
        srv, cli = connected()
        lent_to: list = []

        def lend(handle, offset, length, flags):
            lent_to.append((handle, offset, length, flags))
            lent = Lent(length)
            lent_to.append(lent)
            return lent

        srv.lend = lend
        frame = cli.request(N.NBD_CMD_WRITE, 5, 8192, PAYLOAD, N.NBD_CMD_FLAG_FUA) + payload
        evs = feed(srv, frame, [cut] if 0 < cut < frame_len else [], direct)
        assert len(evs) == 1, (cut, evs)
        req = evs[0]
        (args, lent) = lent_to
        assert args == (5, 8192, PAYLOAD, N.NBD_CMD_FLAG_FUA)
        assert req.lease is lent and req.data is lent.data and bytes(lent.store) == payload
        assert lent.marks == sorted(lent.marks) and lent.marks[-1] == PAYLOAD, (cut, lent.marks)
        assert srv.abandon_sink() is None  # done: nothing to hand back


def test_without_a_lender_the_codec_buffer_is_filled_directly(rng):
    srv, cli = connected()
    payload = rng.randbytes(PAYLOAD)
    evs = feed(srv, cli.request(N.NBD_CMD_WRITE, 1, 0, PAYLOAD) + payload, [28, 1000], True)
    (req,) = evs
    assert req.lease is None and bytes(req.data) == payload


def test_a_refused_write_lends_nothing_and_its_payload_is_dropped(rng):
    srv, cli = connected()
    srv.lend = lambda *a: pytest.fail("lent for a refused write")
    frame = cli.request(N.NBD_CMD_WRITE, 2, SIZE - 4096, PAYLOAD) + rng.randbytes(PAYLOAD)
    assert srv.sink_buffer(1 << 20) is None
    (req,) = feed(srv, frame, [28, 5000], True)
    assert req.error == N.NBD_ENOSPC and req.lease is None
    assert srv.statistics().discarded_bytes == PAYLOAD


def test_eof_mid_payload_hands_the_lent_sink_back(rng):
    srv, cli = connected()
    lent = Lent(PAYLOAD)
    srv.lend = lambda *a: lent
    srv.receive_data(cli.request(N.NBD_CMD_WRITE, 3, 0, PAYLOAD) + rng.randbytes(1000))
    assert srv.next_event() is N.NEED_DATA
    mv = srv.sink_buffer(1 << 20)
    assert mv is not None and len(mv) == PAYLOAD - 1000  # the rest, straight into the lent buffer
    srv.receive_data(b"")
    with pytest.raises(N.RemoteProtocolError, match="truncated payload"):
        srv.next_event()
    assert srv.abandon_sink() is lent and srv.abandon_sink() is None
    with pytest.raises(N.RemoteProtocolError):
        srv.sink_received(1)  # sticky error first


def test_misuse_is_a_local_error(rng):
    srv, cli = connected()
    srv.lend = lambda *a: Lent(10)  # wrong size
    srv.receive_data(cli.request(N.NBD_CMD_WRITE, 4, 0, PAYLOAD))
    with pytest.raises(N.LocalProtocolError, match="lent sink of 10 bytes"):
        srv.next_event()
    srv2, cli2 = connected()
    srv2.receive_data(cli2.request(N.NBD_CMD_WRITE, 4, 0, PAYLOAD))
    assert srv2.next_event() is N.NEED_DATA
    with pytest.raises(N.LocalProtocolError):
        srv2.sink_received(PAYLOAD + 1)  # more than the payload
