"""The card ↔ appliance codec: round trips, split feeding, limits, records,
dedup expansion and the sealed envelope."""

from __future__ import annotations

import os
import struct
import zlib

import pytest

from nicsplit.core.records import Op, WFlag
from nicsplit.wire import envelope as E, frames as F
from nicsplit.wire.frames import (
    NEED_DATA, Ack, Batch, Error, FrameDecoder, FrameError, Heartbeat, Hello, HelloAck, Record,
)

KEY = bytes(range(32))

FRAMES = [
    Hello("card-1", F.PROTOCOL_VERSION, ("db", "web")),
    Hello("c", 1, ()),
    HelloAck("appliance-x", F.PROTOCOL_VERSION, {"db": 17, "web": 0}),
    HelloAck("a", 1, {}),
    Batch(7, "db", 1, 10, 1_700_000_000_000_000_000, 1_700_000_000_000_500_000, b"sealed bytes"),
    Batch(2**64 - 1, "ünïcode-cg", 5, 5, 0, 0, b""),
    Ack(7, "db", 10, True, (b"\x01" * 16, b"\x02" * 16)),
    Ack(8, "db", 11, False, ()),
    Error(F.ErrorCode.PROTOCOL, "bad frame"),
    Error(0, ""),
    Heartbeat(123456789),
    Heartbeat(-1),
]


def records() -> list[Record]:
    payload = os.urandom(3 * 4096 + 100)
    return [
        Record(1, 11, 3, Op.WRITE, WFlag.NONE, 8192, len(payload), 1000, payload),
        Record(2, 12, 4, Op.ZERO, WFlag.NONE, 0, 1 << 30, 1001),
        Record(3, 13, 3, Op.TRIM, WFlag.NONE, 4096, 4096, 1002),
        Record(4, 14, 3, Op.BARRIER, WFlag.FUA, 0, 0, 1003),
        # blocks 0 and 2 by reference: data holds block 1 and the 100-byte tail
        Record(5, 15, 4, Op.WRITE, WFlag.FUA, 0, len(payload), 1004, payload[4096:8192] + payload[12288:],
               ((0, F.fingerprint(payload[:4096])), (2, F.fingerprint(payload[8192:12288])))),
        Record(6, 16, 4, Op.WRITE, 0, 512, 512, 1005, b"z" * 512),
    ]


@pytest.mark.parametrize("frame", FRAMES, ids=lambda f: type(f).__name__)
def test_round_trip(frame):
    dec = FrameDecoder()
    dec.receive_data(F.encode(frame))
    assert dec.next_event() == frame
    assert dec.next_event() is NEED_DATA
    assert dec.statistics().buffered == 0


def test_every_split_point_and_byte_by_byte():
    stream = b"".join(F.encode(f) for f in FRAMES)
    for cut in range(len(stream) + 1):
        dec = FrameDecoder()
        got = []
        for part in (stream[:cut], stream[cut:]):
            if not part:
                continue  # b"" would mean EOF
            dec.receive_data(part)
            while (ev := dec.next_event()) is not NEED_DATA:
                got.append(ev)
        assert got == FRAMES, cut
    dec = FrameDecoder()
    got = []
    for i in range(len(stream)):
        dec.receive_data(stream[i : i + 1])
        while (ev := dec.next_event()) is not NEED_DATA:
            got.append(ev)
    assert got == FRAMES


def test_header_layout_is_documented():
    raw = F.encode(Heartbeat(5))
    magic, version, ftype, flags, length, crc = struct.unpack(">4sBBHII", raw[:16])
    assert (magic, version, ftype, flags, length) == (b"NSPF", 1, F.FrameType.HEARTBEAT, 0, 8)
    assert crc == zlib.crc32(raw[16:])
    assert raw[16:] == struct.pack(">q", 5)


def test_oversized_body_refused_before_buffering():
    dec = FrameDecoder(max_body=1024)
    head = struct.pack(">4sBBHII", b"NSPF", 1, F.FrameType.BATCH, 0, 1025, 0)
    dec.receive_data(head)  # only the header: refused before any body arrives
    with pytest.raises(FrameError, match="exceeds the limit"):
        dec.next_event()
    with pytest.raises(FrameError):  # sticky
        dec.next_event()
    with pytest.raises(FrameError):
        dec.receive_data(b"more")
    head = struct.pack(">4sBBHII", b"NSPF", 1, F.FrameType.BATCH, 0, F.MAX_BODY + 1, 0)
    dec = FrameDecoder()
    dec.receive_data(head)
    with pytest.raises(FrameError, match="exceeds"):
        dec.next_event()


@pytest.mark.parametrize("mutate, match", [
    (lambda b: b"XSPF" + b[4:], "bad magic"),
    (lambda b: b[:4] + b"\x02" + b[5:], "version 2"),
    (lambda b: b[:5] + b"\x09" + b[6:], "unknown frame type"),
    (lambda b: b[:6] + b"\x00\x01" + b[8:], "flags"),
    (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "CRC"),
])
def test_bad_headers(mutate, match):
    dec = FrameDecoder()
    dec.receive_data(mutate(F.encode(Heartbeat(5))))
    with pytest.raises(FrameError, match=match):
        dec.next_event()


def test_bad_magic_refused_from_first_byte():
    dec = FrameDecoder()
    dec.receive_data(b"G")  # e.g. an HTTP client
    with pytest.raises(FrameError, match="bad magic"):
        dec.next_event()


def _frame(ftype: int, body: bytes) -> bytes:
    return struct.pack(">4sBBHII", b"NSPF", 1, ftype, 0, len(body), zlib.crc32(body)) + body


@pytest.mark.parametrize("ftype, body, match", [
    (F.FrameType.HEARTBEAT, b"\0" * 9, "trailing"),
    (F.FrameType.HEARTBEAT, b"\0" * 7, "truncated"),
    (F.FrameType.HELLO, b"\x00\x02\xff\xfe\x00\x01\x00\x00", "UTF-8"),
    (F.FrameType.HELLO, b"\x00\x00\x00\x01\x00\x00", "card_id length 0"),
    (F.FrameType.HELLO, b"\x00\x01c\x00\x01\x00\x02\x00\x01a\x00\x01a", "twice"),
    (F.FrameType.BATCH, struct.pack(">QQQQQ", 1, 5, 4, 0, 0) + b"\x00\x01c", "seq range"),
    (F.FrameType.BATCH, struct.pack(">QQQQQ", 1, 0, 4, 0, 0) + b"\x00\x01c", "seq range"),
    (F.FrameType.BATCH, struct.pack(">QQQQQ", 1, 1, 4, 9, 8) + b"\x00\x01c", "time range"),
    (F.FrameType.ACK, struct.pack(">QQBI", 1, 1, 2, 0) + b"\x00\x01c", "durable"),
    (F.FrameType.ACK, struct.pack(">QQBI", 1, 1, 1, 2) + b"\x00\x01c" + b"x" * 16, "truncated"),
])
def test_bad_bodies(ftype, body, match):
    dec = FrameDecoder()
    dec.receive_data(_frame(ftype, body))
    with pytest.raises(FrameError, match=match):
        dec.next_event()


def test_eof_mid_frame_is_an_error_and_clean_eof_is_not():
    raw = F.encode(Heartbeat(1))
    dec = FrameDecoder()
    dec.receive_data(raw[:10])
    dec.receive_data(b"")
    with pytest.raises(FrameError, match="closed in the middle"):
        dec.next_event()
    dec = FrameDecoder()
    dec.receive_data(raw)
    dec.receive_data(b"")
    assert dec.next_event() == Heartbeat(1)
    assert dec.next_event() is NEED_DATA


def test_encode_refuses_invalid_frames():
    with pytest.raises(ValueError):
        F.encode(Batch(1, "cg", 5, 4, 0, 0, b""))
    with pytest.raises(ValueError):
        F.encode(Batch(1, "", 1, 1, 0, 0, b""))
    with pytest.raises(ValueError):
        F.encode(Ack(1, "cg", 1, True, (b"short",)))
    with pytest.raises(ValueError):
        F.encode(Batch(1, "cg", 1, 1, 0, 0, b"x" * (F.MAX_BODY + 1)))
    with pytest.raises(ValueError):
        F.encode("not a frame")  # type: ignore[arg-type]


# -- records ---------------------------------------------------------------------


def test_records_round_trip():
    rs = records()
    assert F.decode_records(F.encode_records(rs)) == rs
    assert F.decode_records(F.encode_records([])) == []


def test_record_split_by_reference_expands():
    payload = os.urandom(3 * 4096 + 100)
    blocks = {F.fingerprint(payload[i : i + 4096]): payload[i : i + 4096] for i in range(0, len(payload), 4096)}
    full = Record(1, 1, 1, Op.WRITE, 0, 0, len(payload), 0, payload)
    assert F.expand(full, blocks.__getitem__) == payload
    ref = Record(1, 1, 1, Op.WRITE, 0, 0, len(payload), 0, payload[4096:8192] + payload[12288:],
                 ((0, F.fingerprint(payload[:4096])), (2, F.fingerprint(payload[8192:12288]))))
    assert F.expand(ref, blocks.__getitem__) == payload
    tail_ref = Record(1, 1, 1, Op.WRITE, 0, 0, len(payload), 0, payload[:12288], ((3, F.fingerprint(payload[12288:])),))
    assert F.expand(tail_ref, blocks.__getitem__) == payload
    assert F.expand(Record(2, 1, 1, Op.ZERO, 0, 0, 4096, 0), blocks.__getitem__) == b""
    with pytest.raises(FrameError, match="expected 4096"):
        F.expand(ref, lambda fp: b"short")


@pytest.mark.parametrize("rec, match", [
    (Record(1, 1, 1, 9, 0, 0, 0, 0), "unknown op"),
    (Record(0, 1, 1, Op.BARRIER, 0, 0, 0, 0), "start at 1"),
    (Record(1, 1, 1, Op.ZERO, 0, 0, 10, 0, b"x"), "carries no data"),
    (Record(1, 1, 1, Op.WRITE, 0, 0, 10, 0, b"x"), "expected 10"),
    (Record(1, 1, 1, Op.WRITE, 0, 0, 8192, 0, b"", ((1, b"a" * 16), (0, b"b" * 16))), "out of order"),
    (Record(1, 1, 1, Op.WRITE, 0, 0, 4096, 0, b"", ((1, b"a" * 16),)), "outside"),
])
def test_bad_records_refused_both_ways(rec, match):
    with pytest.raises(ValueError, match=match):
        F.encode_record(rec)
    # the same record forged on the wire is a FrameError
    head = struct.pack(">QQQBBQQqII", rec.seq, rec.io_id, rec.vdisk_id, rec.op, rec.flags, rec.offset, rec.length,
                       rec.time_ns, len(rec.refs), len(rec.data))
    raw = struct.pack(">I", 1) + head + b"".join(struct.pack(">I16s", b, fp) for b, fp in rec.refs) + rec.data
    with pytest.raises(FrameError, match=match):
        F.decode_records(raw)


def test_decode_records_malformed():
    good = F.encode_records(records())
    for cut in (0, 3, 10, len(good) - 1):
        with pytest.raises(FrameError):
            F.decode_records(good[:cut])
    with pytest.raises(FrameError, match="trailing"):
        F.decode_records(good + b"\0")
    with pytest.raises(FrameError, match="cannot fit"):
        F.decode_records(struct.pack(">I", 2**32 - 1))


def test_fingerprint_is_xxh3_128():
    import xxhash

    assert F.fingerprint(b"abc") == xxhash.xxh3_128_digest(b"abc")
    assert len(F.fingerprint(b"")) == 16


# -- envelope ----------------------------------------------------------------------


def _aad(batch_id: int = 1) -> bytes:
    return F.batch_aad(Batch(batch_id, "db", 1, 4, 10, 20, b""))


@pytest.mark.parametrize("key", [KEY, None], ids=["aes", "plain"])
@pytest.mark.parametrize("compress", [True, False])
def test_seal_round_trip(key, compress):
    plain = F.encode_records(records()) + b"\0" * 50000
    body = E.seal(plain, key, _aad(), compress=compress)
    assert body[0] == (F.COMPRESS_ZSTD if compress else F.COMPRESS_NONE)
    assert body[1] == (F.CIPHER_AES256GCM if key else F.CIPHER_NONE)
    assert E.unseal(body, key, _aad()) == plain
    if compress:
        assert len(body) < len(plain)


def test_incompressible_data_stays_uncompressed():
    plain = os.urandom(10000)
    body = E.seal(plain, KEY, _aad())
    assert body[0] == F.COMPRESS_NONE
    assert E.unseal(body, KEY, _aad()) == plain


def test_flipped_ciphertext_byte_rejected():
    body = bytearray(E.seal(b"hello records" * 100, KEY, _aad()))
    for i in (14, len(body) // 2, len(body) - 1):  # first ciphertext byte, middle, tag
        bad = bytearray(body)
        bad[i] ^= 0x40
        with pytest.raises(FrameError, match="authentication"):
            E.unseal(bytes(bad), KEY, _aad())
    bad = bytearray(body)
    bad[5] ^= 1  # nonce
    with pytest.raises(FrameError, match="authentication"):
        E.unseal(bytes(bad), KEY, _aad())


def test_changed_aad_rejected():
    body = E.seal(b"x" * 1000, KEY, _aad(1))
    with pytest.raises(FrameError, match="authentication"):
        E.unseal(body, KEY, _aad(2))
    other = F.batch_aad(Batch(1, "db", 1, 5, 10, 20, b""))  # same id, longer range
    with pytest.raises(FrameError, match="authentication"):
        E.unseal(body, KEY, other)
    with pytest.raises(FrameError, match="authentication"):
        E.unseal(body, bytes(32), _aad(1))


def test_cipher_mismatch_and_bad_envelopes():
    with pytest.raises(FrameError, match="unencrypted batch refused"):
        E.unseal(E.seal(b"x", None, b""), KEY, b"")
    with pytest.raises(FrameError, match="no batch key"):
        E.unseal(E.seal(b"x", KEY, b""), None, b"")
    with pytest.raises(FrameError, match="shorter"):
        E.unseal(b"\0" * 5, KEY, b"")
    with pytest.raises(FrameError, match="unknown compression"):
        E.unseal(b"\x07\x00" + bytes(12), None, b"")
    with pytest.raises(FrameError, match="unknown cipher"):
        E.unseal(b"\x00\x07" + bytes(12), KEY, b"")
    with pytest.raises(FrameError, match="zstd"):
        E.unseal(b"\x01\x00" + bytes(12) + b"not zstd", None, b"")


def test_decompression_bomb_refused():
    import zstandard

    bomb = zstandard.ZstdCompressor().compress(bytes(F.MAX_PLAIN + 1))
    with pytest.raises(FrameError, match="above the limit"):
        E.unseal(b"\x01\x00" + bytes(12) + bomb, None, b"")
    bomb = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(F.MAX_PLAIN + 1))
    with pytest.raises(FrameError, match="zstd"):
        E.unseal(b"\x01\x00" + bytes(12) + bomb, None, b"")


def test_batch_aad_layout():
    b = Batch(7, "db", 1, 4, 10, 20, b"ignored")
    assert F.batch_aad(b) == b"\x01" + struct.pack(">QQQQQ", 7, 1, 4, 10, 20) + b"\x00\x02db"
    wire = F.encode(b)
    assert wire[16 : 16 + 44] == F.batch_aad(b)[1:]


def test_large_bodies_assembled_from_chunks(seed):
    """A body of 64 KiB or more that arrives in pieces is kept as the pieces
    and joined once (FrameDecoder._parts): frames before, inside and after
    it come out whole and in order whatever the chunking, the CRC is still
    checked, the buffered count stays bounded, and EOF inside it is an error."""
    import random

    rng = random.Random(seed)
    big = [F.Batch(i, "cg", i, i, 1, 2, rng.randbytes(rng.choice((65_536, 70_000, 300_000)))) for i in range(1, 4)]
    frames = [F.Heartbeat(1), big[0], F.Heartbeat(2), big[1], big[2], F.Heartbeat(3)]
    stream = b"".join(map(F.encode, frames))
    for _ in range(20):
        dec, out, pos = F.FrameDecoder(), [], 0
        while pos < len(stream):
            n = rng.choice((1, 7, 4096, 16384, 65_536, 200_000))
            dec.receive_data(stream[pos : pos + n])
            pos += n
            while (fr := dec.next_event()) is not F.NEED_DATA:
                out.append(fr)
            assert dec.statistics().buffered < 16 + dec.max_body
        assert out == frames
        assert dec.statistics().buffered == 0
    bad = bytearray(F.encode(big[0]))
    bad[-1] ^= 1
    dec = F.FrameDecoder()
    with pytest.raises(F.FrameError, match="CRC"):
        for i in range(0, len(bad), 16384):
            dec.receive_data(bytes(bad[i : i + 16384]))
            assert dec.next_event() is F.NEED_DATA
    dec = F.FrameDecoder()
    dec.receive_data(F.encode(big[0])[:16 + 40_000])
    assert dec.next_event() is F.NEED_DATA
    dec.receive_data(F.encode(big[0])[16 + 40_000 : 16 + 50_000])
    assert dec.next_event() is F.NEED_DATA
    dec.receive_data(b"")
    with pytest.raises(F.FrameError, match="closed in the middle"):
        dec.next_event()
