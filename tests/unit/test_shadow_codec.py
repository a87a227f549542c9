"""The shadow transport's device queue codec (`nicsplit.wire.shadow`):
sizes, round trips, every bad entry refused with a reason, headers of
another kind or version refused, and random bytes parse or are refused —
never anything else."""

from __future__ import annotations

import random

import pytest

from nicsplit.host.datastore.volume import volume_name
from nicsplit.wire import shadow as S


def buf(n: int = 4 * S.SQE.size) -> memoryview:
    return memoryview(bytearray(n))


G = S.Geometry(4, 1 << 16)


def test_sizes_and_geometry():
    assert S.SQE.size == 64 and S.CQE.size == 16
    g = S.Geometry(256, 16 << 20)
    assert g.sq_offset == 4096 and g.cq_offset == 4096 + 16384 and g.data_offset == g.cq_offset + 4096
    assert g.total == g.data_offset + (16 << 20)
    for entries, size in ((3, 4096), (1, 4096), (1 << 17, 4096), (4, 4095), (4, 5000)):
        with pytest.raises(S.ShadowFormatError):
            S.Geometry(entries, size)


def test_entry_and_completion_round_trip():
    b = buf()
    S.pack_entry(b, 64, volume=3, length=4096, seq=(1 << 32) + 1, io_id=1 << 60, physical=1 << 40, data_pos=8192,
                 flags=S.F_MORE)
    e = S.unpack_entry(b, 64)
    assert e == S.Entry(S.OP_WRITE, S.F_MORE, 3, 4096, 1, 1 << 60, 1 << 40, 8192)
    assert S.check_entry(e, (1 << 32) + 1, G, 1 << 63) == ""
    S.pack_completion(b, 16, 77, 5, 9)
    assert S.unpack_completion(b, 16) == (77, 5, 9)


@pytest.mark.parametrize("field,value,why", [
    ("opcode", 2, "opcode 2"),
    ("flags", 2, "unknown flags"),
    ("seq", 8, "stale or torn"),
    ("volume", S.MAX_VOLUMES, "volume"),
    ("length", 0, "length 0"),
    ("length", (1 << 16) + 1, "not in [1,"),
    ("data_pos", (1 << 16) - 100, "crosses the end"),
    ("physical", 100, "header's first page"),
])
def test_bad_entries_are_refused_with_a_reason(field, value, why):
    good = dict(opcode=S.OP_WRITE, flags=0, volume=0, length=4096, seq=7, io_id=1, physical=1 << 20, data_pos=0)
    e = S.Entry(**{**good, field: value})
    got = S.check_entry(e, 7, G, 1 << 63)
    assert why in got, got
    assert S.check_entry(S.Entry(**good), 7, G, 1 << 63) == ""
    assert "past the data" in S.check_entry(S.Entry(**good), 7, G, 2048)


def test_headers_of_another_kind_or_version_are_refused():
    c = memoryview(bytearray(S.PAGE)).cast("Q")
    with pytest.raises(S.ShadowFormatError, match="not a shadow device queue"):
        S.check_header(c)
    c[S.Counter.MAGIC], c[S.Counter.VERSION], c[S.Counter.ENTRIES], c[S.Counter.DATA_SIZE] = S.MAGIC, 2, 4, 4096
    with pytest.raises(S.ShadowFormatError, match="version 2"):
        S.check_header(c)
    c[S.Counter.VERSION] = S.VERSION
    assert S.check_header(c) == S.Geometry(4, 4096)
    c[S.Counter.ENTRIES] = 5
    with pytest.raises(S.ShadowFormatError, match="power of two"):
        S.check_header(c)


def test_random_entries_parse_or_are_refused(seed):
    rng = random.Random(seed)
    b = buf(S.SQE.size)
    refused = 0
    for _ in range(20000):
        b[:] = rng.randbytes(S.SQE.size)
        e = S.unpack_entry(b, 0)
        why = S.check_entry(e, rng.randrange(1 << 40), G, rng.randrange(1 << 63))
        assert isinstance(why, str)
        refused += bool(why)
    assert refused > 19000  # random bytes are almost never a good entry
    print(f"seed={seed}: {refused} of 20000 random entries refused")


def test_the_card_names_volumes_as_the_datastore_does():
    for i in (0, 1, 42, 9999, 12345):
        assert S.volume_file(i) == volume_name(i)
