"""Fuzz the NBD server codec: random and mutated byte streams, fed in random
chunks, in the handshake and the transmission phase.

Rule (h11 style): the codec yields events or raises RemoteProtocolError --
never anything else -- and after draining, its buffered input stays below the
largest frame it may hold whole.  Hypothesis runs derandomized (seeded from
the test name) so CI is reproducible; a failure prints a reproduce blob.
"""

from __future__ import annotations

import struct

from hypothesis import given, strategies as st

from nicsplit.testing.fuzz import fuzz_settings

from nicsplit.wire import nbd as N
from nicsplit.wire.nbd import (
    NEED_DATA, Closed, Disconnect, ExportInfo, Negotiated, RemoteProtocolError,
    Request, ServerConnection,
)

MAX_PAYLOAD = 4096        # small limits so random lengths hit every path
MAX_OPTION = 512
# After NEED_DATA the unconsumed input is shorter than the awaited frame.
BOUND = max(16 + MAX_OPTION, 28 + MAX_PAYLOAD)

FUZZ = fuzz_settings(400)  # NICSPLIT_FUZZ_SCALE runs it longer


class Provider:
    exports = [ExportInfo("disk", 1 << 20, description="d"), ExportInfo("ro", 4096, readonly=True)]

    def lookup(self, name):
        return self.exports[0] if name == "" else next(
            (e for e in self.exports if e.name == name), None)

    def list_exports(self):
        return list(self.exports)


def option(opt, data=b""):
    return b"IHAVEOPT" + struct.pack(">II", opt, len(data)) + data


def name_list(name, items, fmt):
    return (struct.pack(">I", len(name)) + name + struct.pack(fmt, len(items))
            + b"".join(struct.pack(">H", i) if fmt == ">H" else struct.pack(">I", len(i)) + i
                       for i in items))


def request(cmd, handle=1, offset=0, length=0, flags=0, data=b""):
    return struct.pack(">IHHQQI", 0x25609513, flags, cmd, handle, offset, length) + data


HANDSHAKE = [
    struct.pack(">I", 3),
    option(3), option(8), option(8, b"x"), option(99, b"abc"), option(5),
    option(6, name_list(b"disk", [1, 2, 3], ">H")),
    option(6, name_list(b"nope", [], ">H")),
    option(9, name_list(b"", [b"base:"], ">I")),
    option(10, name_list(b"", [b"base:allocation"], ">I")),
    option(7, name_list(b"", [3], ">H")),
]
TRANSMISSION = [
    request(1, 1, 0, 5, data=b"hello"),
    request(0, 2, 0, 4096, flags=4),
    request(1, 3, 1 << 20, 4, data=b"nope"),
    request(1, 4, 0, 5000, data=bytes(5000)),      # over MAX_PAYLOAD: discarded
    request(6, 5, 0, 512, flags=2 | 16),
    request(7, 6, 0, 1 << 20, flags=8),
    request(4, 7, 0, 512, flags=1),
    request(3, 8),
    request(5, 9, 0, 512),
    request(2, 10),
]
STREAM = b"".join(HANDSHAKE + TRANSMISSION)
TRANSMISSION_START = len(b"".join(HANDSHAKE))


def feed(chunks: list[bytes], eof: bool, conn: ServerConnection | None = None) -> list:
    """Feed chunks, drain events; return events (exceptions other than
    RemoteProtocolError propagate and fail the test)."""
    conn = conn or ServerConnection(Provider(), max_payload=MAX_PAYLOAD,
                                    max_option_length=MAX_OPTION)
    conn.data_to_send()
    events = []
    try:
        for c in chunks + ([b""] if eof else []):
            conn.receive_data(c)
            while True:
                ev = conn.next_event()
                if ev is NEED_DATA:
                    break
                assert isinstance(ev, (Negotiated, Request, Disconnect, Closed))
                events.append(ev)
                if isinstance(ev, Request) and ev.error == 0 and ev.cmd == N.NBD_CMD_WRITE:
                    assert len(ev.data) == ev.length <= MAX_PAYLOAD
                if isinstance(ev, (Disconnect, Closed)):
                    return events
                if conn.phase == "transmission":
                    conn.reply_ok(getattr(ev, "handle", 0))
            st_ = conn.statistics()
            assert st_.buffered < BOUND, st_
            assert st_.sink_size <= MAX_PAYLOAD
            conn.data_to_send()
    except RemoteProtocolError:
        # sticky: it must come back on the next call
        try:
            conn.next_event()
        except RemoteProtocolError:
            return events
        raise AssertionError("RemoteProtocolError was not sticky")
    return events


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    cuts = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for c in cuts + [len(data)]:
        if c > prev:
            out.append(data[prev:c])
        prev = c
    return out


def test_reference_stream_is_clean():
    evs = feed([STREAM], eof=False)
    assert isinstance(evs[0], Negotiated) and isinstance(evs[-1], Disconnect)
    assert [e.error for e in evs[1:-1]] == [0, 0, 28, 22, 0, 0, 0, 0, 22]


@FUZZ
@given(st.binary(max_size=2000), st.lists(st.integers(0, 4000), max_size=8), st.booleans())
def test_random_handshake_bytes(data, cuts, eof):
    feed(chunked(data, cuts), eof)


@FUZZ
@given(st.binary(max_size=2000), st.lists(st.integers(0, 4000), max_size=8), st.booleans())
def test_random_bytes_after_valid_handshake(data, cuts, eof):
    feed(chunked(STREAM[:TRANSMISSION_START] + data, cuts), eof)


@FUZZ
@given(st.binary(max_size=600), st.lists(st.integers(0, 4000), max_size=8), st.booleans())
def test_random_bytes_after_option_header_magic(data, cuts, eof):
    # random option numbers/lengths/payloads behind a valid magic
    feed(chunked(struct.pack(">I", 3) + b"IHAVEOPT" + data, cuts), eof)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, len(STREAM) - 1),
                          st.binary(min_size=1, max_size=8)), min_size=1, max_size=6),
       st.lists(st.integers(0, 4000), max_size=8), st.booleans())
def test_mutated_stream(mutations, cuts, eof):
    data = bytearray(STREAM)
    for kind, pos, blob in mutations:
        pos %= len(data) or 1
        if kind == 0:        # overwrite
            data[pos:pos + len(blob)] = blob
        elif kind == 1:      # insert
            data[pos:pos] = blob
        elif kind == 2:      # delete
            del data[pos:pos + len(blob)]
        elif kind == 3:      # truncate
            del data[pos:]
        elif kind == 4:      # flip one bit
            if data:
                data[pos] ^= 1 << (blob[0] % 8)
        else:                # big-endian field smash: set 4 bytes to 0xff
            data[pos:pos + 4] = b"\xff\xff\xff\xff"
    feed(chunked(bytes(data), cuts), eof)


@FUZZ
@given(st.lists(st.sampled_from(TRANSMISSION[:-1]), max_size=20),
       st.lists(st.integers(0, 20000), max_size=10))
def test_request_sequences_split_anywhere_match_whole(reqs, cuts):
    stream = STREAM[:TRANSMISSION_START] + b"".join(reqs)
    whole = feed([stream], eof=False)
    split = feed(chunked(stream, cuts), eof=False)
    def norm(evs):
        return [(type(e), getattr(e, "handle", None), getattr(e, "error", None),
                 bytes(e.data) if getattr(e, "data", None) is not None else None) for e in evs]
    assert norm(whole) == norm(split)
    assert len(whole) == 1 + len(reqs)


# Grammar-aware: valid framing, with inner lengths/counts close to the truth,
# so off-by-one bugs in the option parsers are reachable.
near = st.integers(-8, 8)


@st.composite
def option_frames(draw):
    opt = draw(st.sampled_from([1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 99]))
    name = draw(st.sampled_from([b"", b"disk", b"ro", b"nope", b"\xff\xfe"]))
    body = draw(st.binary(max_size=24))
    if draw(st.booleans()):      # meta-context shaped: u32 count, u32-len queries
        q = draw(st.sampled_from([b"base:", b"base:allocation", b"x:", b""]))
        body = (struct.pack(">I", max(0, draw(st.integers(0, 3)) + draw(near)))
                + struct.pack(">I", max(0, len(q) + draw(near))) + q + body)
    namelen = max(0, len(name) + draw(near))
    data = struct.pack(">I", namelen) + name + body
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data)))]
    return option(opt, data)


@FUZZ
@given(st.lists(option_frames(), min_size=1, max_size=8), st.lists(st.integers(0, 4000), max_size=6),
       st.booleans())
def test_structured_option_fuzz(frames, cuts, eof):
    feed(chunked(struct.pack(">I", 3) + option(8) + b"".join(frames), cuts), eof)


@st.composite
def request_frames(draw):
    cmd = draw(st.integers(0, 9))
    flags = draw(st.one_of(st.integers(0, 31), st.integers(0, 0xFFFF)))
    offset = draw(st.one_of(st.integers(0, 1 << 20), st.sampled_from([(1 << 64) - 1, (1 << 20) - 1])))
    length = draw(st.one_of(st.integers(0, 2 * MAX_PAYLOAD), st.sampled_from([0, 1, (1 << 32) - 1])))
    data = bytes(length) if cmd == 1 and length <= 2 * MAX_PAYLOAD else b""
    return request(cmd, draw(st.integers(0, (1 << 64) - 1)), offset, length, flags, data)


@FUZZ
@given(st.lists(request_frames(), max_size=10), st.lists(st.integers(0, 40000), max_size=6),
       st.booleans())
def test_structured_request_fuzz(reqs, cuts, eof):
    evs = feed(chunked(STREAM[:TRANSMISSION_START] + b"".join(reqs), cuts), eof)
    for ev in evs:
        if isinstance(ev, Request) and ev.error == 0:
            # anything accepted is executable: in range, allowed size
            assert ev.cmd in (0, 1, 3, 4, 6, 7)
            assert ev.offset + ev.length <= 1 << 20
            assert ev.cmd == 3 or 0 < ev.length
