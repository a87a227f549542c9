"""``encode_record_fields`` (card/pipeline/encode.py: the card's unchecked
encoder for records it builds itself) gives exactly ``encode_record``'s bytes for every valid record
(memoryview data too), ``join_records`` exactly ``encode_records``'s, and a
field out of range still raises ``encode_record``'s ValueError. Derandomized
(`nicsplit.testing.fuzz`)."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from nicsplit.card.pipeline.encode import encode_record_fields, join_records
from nicsplit.core.records import Op
from nicsplit.testing.fuzz import fuzz_settings
from nicsplit.wire import frames as F

fps = st.binary(min_size=F.FP_SIZE, max_size=F.FP_SIZE)


@st.composite
def records(draw):
    """Any valid record: every op, WRITEs with and without blocks by reference."""
    op = draw(st.sampled_from(list(Op)))
    fields = dict(seq=draw(st.integers(1, (1 << 64) - 1)), io_id=draw(st.integers(0, (1 << 64) - 1)),
                  vdisk_id=draw(st.integers(0, (1 << 64) - 1)), op=int(op), flags=draw(st.integers(0, 255)),
                  offset=draw(st.integers(0, (1 << 64) - 1)), time_ns=draw(st.integers(-(1 << 63), (1 << 63) - 1)))
    if op != Op.WRITE:
        return F.Record(length=draw(st.integers(0, 1 << 40)), **fields)
    length = draw(st.integers(1, 3 * F.BLOCK_SIZE))
    nblocks = F.block_spans(length)
    by_ref = sorted(draw(st.sets(st.integers(0, nblocks - 1), max_size=nblocks)))
    refs = tuple((b, draw(fps)) for b in by_ref)
    data_len = length - sum(min(F.BLOCK_SIZE, length - b * F.BLOCK_SIZE) for b in by_ref)
    return F.Record(length=length, data=draw(st.binary(min_size=data_len, max_size=data_len)), refs=refs, **fields)

pytestmark = pytest.mark.unit


def fields(r: F.Record, data) -> bytes:
    return encode_record_fields(r.seq, r.io_id, r.vdisk_id, r.op, r.flags, r.offset, r.length, r.time_ns,
                                  data, r.refs)


@fuzz_settings(200)
@given(records())
def test_fields_encode_like_encode_record(r):
    want = F.encode_record(r)
    assert fields(r, r.data) == want
    assert fields(r, memoryview(bytearray(r.data))) == want
    assert F.decode_record(want)[0] == r


@fuzz_settings(60)
@given(st.lists(records(), max_size=6))
def test_join_records_like_encode_records(rs):
    assert join_records([F.encode_record(r) for r in rs]) == F.encode_records(rs)


@pytest.mark.parametrize("field,value,culprit", [
    ("seq", 1 << 64, "seq"), ("offset", -1, "offset"), ("flags", 256, "flags"), ("time_ns", 1 << 63, "time_ns"),
])
def test_out_of_range_field_raises_value_error(field, value, culprit):
    r = F.Record(seq=1, io_id=1, vdisk_id=1, op=int(Op.WRITE), flags=0, offset=0, length=4, time_ns=0, data=b"abcd")
    bad = dict(seq=r.seq, io_id=r.io_id, vdisk_id=r.vdisk_id, op=r.op, flags=r.flags, offset=r.offset,
               length=r.length, time_ns=r.time_ns, data=r.data)
    bad[field] = value
    with pytest.raises(ValueError, match=culprit):
        encode_record_fields(**bad)
