"""Fuzz the sans-IO NBD *client* codec (nicsplit.wire.nbd.ClientConnection):
whatever a server sends, in any chunking, gives events or RemoteProtocolError
(sticky), never anything else. The server side is test_nbd_fuzz.py.
Derandomized; budgets in `nicsplit.testing.fuzz`."""

from __future__ import annotations

import struct

from hypothesis import given, strategies as st

from nicsplit.testing.fuzz import fuzz_settings
from nicsplit.wire import nbd as N

GREETING = b"NBDMAGIC" + b"IHAVEOPT" + struct.pack(">H", 3)
INFO = struct.pack(">QIII", 0x3E889045565A9, 7, 3, 12) + struct.pack(">HQH", 0, 1 << 20, 1)
ACK = struct.pack(">QIII", 0x3E889045565A9, 7, 1, 0)
REPLY = struct.pack(">IIQ", 0x67446698, 0, 5)
VALID = GREETING + INFO + ACK + REPLY


def feed(chunks: list[bytes]) -> None:
    c = N.ClientConnection("disk")
    try:
        for ch in chunks:
            c.receive_data(ch)
            while (ev := c.next_event()) is not N.NEED_DATA:
                assert isinstance(ev, (N.ExportReady, N.Reply))
            c.data_to_send()
    except N.RemoteProtocolError:
        try:
            c.next_event()
        except N.RemoteProtocolError:
            return
        raise AssertionError("RemoteProtocolError was not sticky")


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)]) if b > a]


def test_valid_exchange_gives_export_and_reply():
    c = N.ClientConnection("disk")
    c.receive_data(VALID)
    assert c.next_event() == N.ExportReady(1 << 20, 1)
    assert c.next_event() == N.Reply(5, 0)


@fuzz_settings(200)
@given(st.binary(max_size=300), st.lists(st.integers(0, 400), max_size=6), st.booleans())
def test_random_server_bytes(data, cuts, eof):
    feed(chunked(data, cuts) + ([b""] if eof else []))


@fuzz_settings(200)
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=4),
       st.lists(st.integers(0, 400), max_size=6), st.integers(0, 40))
def test_mutated_server_stream(flips, cuts, chop):
    data = bytearray(VALID)
    for at, val in flips:
        data[at] = val
    feed(chunked(bytes(data[:len(data) - chop]), cuts) + [b""])
