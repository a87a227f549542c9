"""wire/ring.py: every layout's size, round trips, and refusal of bad entries."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nicsplit.core.records import Op, Status, WFlag
from nicsplit.wire import ring as R

U8, U32, U64 = st.integers(0, 255), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1)


def test_sizes_and_offsets():
    assert R.DESC.size == 64 == R.CACHE_LINE
    assert R.CQE.size == 16
    assert R.IDENTITY.size == 128
    assert R.HEADER_SIZE == R.PAGE == 4096
    # every counter on its own cache line, and none inside the identity block
    lines = [c.value * 8 // 64 for c in (R.Counter.SQ_TAIL, R.Counter.SQ_HEAD, R.Counter.CQ_TAIL,
                                         R.Counter.CQ_HEAD, R.Counter.DATA_TAIL, R.Counter.DATA_HEAD)]
    assert len(set(lines)) == 6 and min(lines) >= 3
    assert R.Counter.CARD_STATE * 8 // 64 == R.Counter.CARD_HEARTBEAT * 8 // 64 == 2
    assert {c * 8 // 64 for c in R.CardCounter} == {9}
    assert R.Counter.HOST_PID * 8 // 64 == 10
    # the descriptor kinds share records.Op's values
    for op in Op:
        assert R.Kind[op.name] == op
    assert {int(s) for s in Status} == {R.AckStatus.OK, R.AckStatus.FAILED}


def test_geometry_regions_are_page_aligned_and_disjoint():
    g = R.Geometry(4096, 4096, 64 << 20)
    assert g.sq_offset == 4096
    assert g.cq_offset == 4096 + 4096 * 64
    assert g.data_offset == g.cq_offset + 4096 * 16
    assert g.total_size == g.data_offset + (64 << 20)
    small = R.Geometry(2, 2, R.MIN_DATA)
    for off in (small.sq_offset, small.cq_offset, small.data_offset):
        assert off % R.PAGE == 0
    assert small.sq_offset < small.cq_offset < small.data_offset


@pytest.mark.parametrize("sq,cq,data", [
    (3, 4, 1 << 20), (4, 6, 1 << 20), (1, 4, 1 << 20), (1 << 21, 4, 1 << 20),
    (4, 4, 1000), (4, 4, R.MIN_DATA - R.PAGE), (4, 4, (1 << 20) + 1),
])
def test_geometry_refuses_bad_sizes(sq, cq, data):
    with pytest.raises(R.RingFormatError):
        R.Geometry(sq, cq, data)


def test_identity_round_trip_and_refusals():
    buf = bytearray(R.HEADER_SIZE)
    ident = R.Identity(R.VERSION, bytes(range(16)), R.Geometry(8, 16, 1 << 20), 4242, R.CsumAlg.XXH3_LOW32, 123)
    R.pack_identity(buf, ident)
    assert R.unpack_identity(buf) == ident
    assert buf[:8] == b"NSPLITHV"

    bad = bytearray(buf)
    bad[0:8] = b"NOTMAGIC"
    with pytest.raises(R.RingFormatError, match="magic"):
        R.unpack_identity(bad)
    bad = bytearray(buf)
    struct.pack_into("<I", bad, 8, 99)
    with pytest.raises(R.RingFormatError, match="version 99"):
        R.unpack_identity(bad)
    bad = bytearray(buf)
    struct.pack_into("<Q", bad, 56, 12345)  # data_offset inconsistent with the geometry
    with pytest.raises(R.RingFormatError, match="offsets"):
        R.unpack_identity(bad)
    bad = bytearray(buf)
    struct.pack_into("<I", bad, 32, 7)  # sq_entries not a power of two
    with pytest.raises(R.RingFormatError, match="sq_entries"):
        R.unpack_identity(bad)
    with pytest.raises(R.RingFormatError):
        R.unpack_identity(buf[:100])


@given(kind=U8, wflags=U8, dflags=U8, status=U8, length=U32, io_id=U64, cg_seq=U64, cg_id=U32,
       vdisk_id=U32, voffset=U64, ts=U64, data_pos=U64, csum=U32, seq=U32, slot=st.integers(0, 7))
def test_descriptor_round_trip(kind, wflags, dflags, status, length, io_id, cg_seq, cg_id, vdisk_id, voffset,
                               ts, data_pos, csum, seq, slot):
    d = R.Descriptor(kind, wflags, dflags, status, length, io_id, cg_seq, cg_id, vdisk_id, voffset, ts, data_pos,
                     csum, seq)
    buf = memoryview(bytearray(8 * 64))
    R.pack_descriptor(buf, slot * 64, d)
    assert R.unpack_descriptor(buf, slot * 64) == d
    # neighbours untouched
    assert not any(buf[: slot * 64]) and not any(buf[slot * 64 + 64:])


@given(io_id=U64, status=U8, reason=U8, seq=U32)
def test_completion_round_trip(io_id, status, reason, seq):
    c = R.Completion(io_id, status, reason, seq)
    buf = bytearray(64)
    R.pack_completion(buf, 16, c)
    assert R.unpack_completion(buf, 16) == c


def test_descriptor_fields_out_of_range_are_refused():
    d = R.Descriptor(1, 0, 0, 0, 4096, 1, 1, 2**32, 1, 0, 0, 0, 0, 0)  # cg_id does not fit u32
    with pytest.raises(R.RingFormatError, match="out of range"):
        R.pack_descriptor(bytearray(64), 0, d)
    with pytest.raises(R.RingFormatError):
        R.pack_completion(bytearray(16), 0, R.Completion(-1, 0, 0, 0))


def _d(kind=1, wflags=0, dflags=1, status=0, length=4096, data_pos=0, csum=7, seq=5):
    return R.Descriptor(kind, wflags, dflags, status, length, 1, 1, 1, 1, 0, 0, data_pos, csum, seq)


@pytest.mark.parametrize("d,reason", [
    (_d(), R.AckReason.NONE),
    (_d(kind=2, dflags=0, csum=0), R.AckReason.NONE),  # ZERO
    (_d(kind=3, dflags=0, csum=0, wflags=WFlag.FUA), R.AckReason.NONE),  # TRIM with FUA
    (_d(kind=4, dflags=0, csum=0, length=0), R.AckReason.NONE),  # BARRIER
    (_d(kind=16, dflags=0, csum=0, length=0, status=1), R.AckReason.NONE),  # OUTCOME failed
    (_d(seq=6), R.AckReason.BAD_SEQ),
    (_d(kind=0), R.AckReason.BAD_KIND),
    (_d(kind=5), R.AckReason.BAD_KIND),
    (_d(kind=255), R.AckReason.BAD_KIND),
    (_d(wflags=2), R.AckReason.NONE),  # GAP
    (_d(wflags=4), R.AckReason.BAD_KIND),
    (_d(dflags=4), R.AckReason.BAD_KIND),
    (_d(kind=2, dflags=0, wflags=0x80, csum=0), R.AckReason.BAD_KIND),
    (_d(length=0), R.AckReason.BAD_FIELD),  # empty WRITE
    (_d(status=1), R.AckReason.BAD_FIELD),  # status on a WRITE
    (_d(kind=4, dflags=0, csum=0, length=512), R.AckReason.BAD_FIELD),  # BARRIER with a length
    (_d(kind=2, dflags=1), R.AckReason.BAD_FIELD),  # ZERO with a checksum
    (_d(kind=3, dflags=0, csum=0, data_pos=4096), R.AckReason.BAD_FIELD),  # TRIM with a payload
    (_d(kind=16, dflags=0, csum=0, length=0, status=2), R.AckReason.BAD_FIELD),  # unknown status
    (_d(kind=16, dflags=0, csum=0, length=4096), R.AckReason.BAD_FIELD),  # OUTCOME with a length
])
def test_validate_descriptor(d, reason):
    assert R.validate_descriptor(d, position=5) == reason
    # the 32-bit seq matches modulo 2**32 of a 64-bit position
    assert R.validate_descriptor(d, position=5 + (1 << 32)) == reason


@given(kind=U8, wflags=U8, dflags=U8, status=U8, length=U32, data_pos=U64, csum=U32, seq=U32, pos=U64)
def test_check_fields_never_raises(kind, wflags, dflags, status, length, data_pos, csum, seq, pos):
    r = R.check_fields(kind, wflags, dflags, status, length, data_pos, csum, seq, pos)
    assert r in {int(x) for x in R.AckReason}


def test_payload_checksum_is_low_32_bits_of_xxh3():
    import xxhash

    data = bytes(range(256)) * 16
    assert R.payload_checksum(data) == xxhash.xxh3_64_intdigest(data) & 0xFFFFFFFF
    assert R.payload_checksum(memoryview(data)) == R.payload_checksum(data)
