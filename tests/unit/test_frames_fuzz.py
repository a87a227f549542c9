"""Fuzz the frame, record and envelope decoders (h11 rule): random and
mutated bytes, fed in random chunks, give frames or FrameError — nothing
else — and the buffered input stays below one header + max_body.
Hypothesis runs derandomized so CI is reproducible."""

from __future__ import annotations

from hypothesis import given, strategies as st

from nicsplit.testing.fuzz import fuzz_settings

from nicsplit.core.records import Op
from nicsplit.wire import envelope, frames as F

MAX_BODY = 4096
FUZZ = fuzz_settings(400)  # NICSPLIT_FUZZ_SCALE runs it longer

SEEDS = [
    F.encode(F.Hello("card", 1, ("a", "b"))),
    F.encode(F.HelloAck("app", 1, {"a": 3})),
    F.encode(F.Batch(1, "a", 1, 2, 3, 4, b"body")),
    F.encode(F.Ack(1, "a", 2, True, (b"f" * 16,))),
    F.encode(F.Error(1, "oops")),
    F.encode(F.Heartbeat(9)),
]
RECORDS = F.encode_records([
    F.Record(1, 1, 1, Op.WRITE, 0, 0, 5000, 0, b"d" * 904, ((0, b"f" * 16),)),
    F.Record(2, 1, 1, Op.TRIM, 0, 0, 5000, 0),
])


def drain(dec: F.FrameDecoder, chunks: list[bytes]) -> None:
    try:
        for c in chunks:
            dec.receive_data(c)
            while (ev := dec.next_event()) is not F.NEED_DATA:
                assert isinstance(ev, (F.Hello, F.HelloAck, F.Batch, F.Ack, F.Error, F.Heartbeat))
            assert dec.statistics().buffered < 16 + MAX_BODY
    except F.FrameError:
        pass


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    parts = [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]
    return [p for p in parts if p] + [b""]  # then EOF


@FUZZ
@given(st.binary(max_size=2000), st.lists(st.integers(0, 4000), max_size=8))
def test_random_bytes(data, cuts):
    drain(F.FrameDecoder(max_body=MAX_BODY), chunked(data, cuts))


@FUZZ
@given(st.lists(st.sampled_from(SEEDS), min_size=1, max_size=4),
       st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
       st.lists(st.integers(0, 4000), max_size=8))
def test_mutated_frames(frames, flips, cuts):
    data = bytearray(b"".join(frames))
    for pos, val in flips:
        data[pos % len(data)] = val
    drain(F.FrameDecoder(max_body=MAX_BODY), chunked(bytes(data), cuts))


def _fix_crc(frame: bytes) -> bytes:
    """Mutate a body but keep the header consistent, so the body decoders
    (not just the CRC check) see the damage."""
    import struct
    import zlib

    body = frame[16:]
    return frame[:8] + struct.pack(">II", len(body), zlib.crc32(body)) + body


@FUZZ
@given(st.sampled_from(SEEDS), st.lists(st.tuples(st.integers(16, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
       st.integers(0, 40))
def test_mutated_bodies_with_valid_crc(frame, flips, chop):
    data = bytearray(frame)
    for pos, val in flips:
        if len(data) > 16:
            data[16 + pos % (len(data) - 16)] = val
    data = data[: max(16, len(data) - chop)]
    drain(F.FrameDecoder(max_body=MAX_BODY), [_fix_crc(bytes(data))])


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6), st.integers(0, 2000))
def test_mutated_records(flips, chop):
    data = bytearray(RECORDS)
    for pos, val in flips:
        data[pos % len(data)] = val
    try:
        for r in F.decode_records(bytes(data[: len(data) - chop])):
            assert isinstance(r, F.Record)
    except F.FrameError:
        pass


@FUZZ
@given(st.binary(max_size=300), st.sampled_from([None, bytes(32)]))
def test_unseal_random(body, key):
    try:
        envelope.unseal(body, key, b"aad")
    except F.FrameError:
        pass
