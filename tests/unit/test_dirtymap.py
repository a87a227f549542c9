"""nicsplit.core.dirtymap: the one dirty-region bitmap (host marking, failover, failback)."""

from __future__ import annotations

import os
import random
from pathlib import Path

from nicsplit.core.dirtymap import REGION, DirtyMap, RegionBitmap
from nicsplit.host.marking import MarkingMap


def regions_of(runs: list[tuple[int, int]]) -> set[int]:
    return {r for off, n in runs for r in range(off // REGION, (off + n - 1) // REGION + 1)}


def test_file_format_is_one_bit_per_region_lsb_first(tmp_path: Path):
    m = DirtyMap(tmp_path / "b", 20 * REGION)
    assert os.path.getsize(tmp_path / "b") == 3  # ceil(20 / 8)
    for r in (0, 3, 9, 19):
        m.write(m.mark(r * REGION + 7, 1))
    m.sync()
    m.close()
    assert (tmp_path / "b").read_bytes() == bytes([0b0000_1001, 0b0000_0010, 0b0000_1000])


def test_marks_clip_to_the_vdisk_and_merge_runs():
    b = RegionBitmap(5 * REGION + 100)
    assert b.mark(0, 0) is None
    assert b.mark(REGION - 1, 2) == (0, 1)
    assert b.mark(5 * REGION, 10) == (0, 1)
    assert b.runs() == [(0, 2 * REGION), (5 * REGION, 100)]
    assert b.count() == 3 and b.dirty_bytes() == 2 * REGION + 100
    assert b.is_marked(10, REGION) and not b.is_marked(REGION, REGION + 1)


def test_merge_ors_another_bitmap_and_ignores_bits_past_the_end():
    a = RegionBitmap(10 * REGION)
    a.mark(0, 1)
    other = RegionBitmap(10 * REGION)
    other.mark(0, 1)
    other.mark(9 * REGION, 1)
    extra = other.to_bytes()[:1] + bytes([other.to_bytes()[1] | 0b1111_1100]) + b"\xff"  # bits 10.. and a 3rd byte
    assert a.merge(extra) == 2  # regions 0 and 9: what the other bitmap marks, counted even if already set
    assert a.runs() == [(0, REGION), (9 * REGION, REGION)]


def test_read_of_a_missing_file_marks_nothing(tmp_path: Path):
    assert RegionBitmap.read(tmp_path / "none", 4 * REGION).runs() == []


def test_random_marks_match_a_set_model_across_reopen(tmp_path: Path):
    rng = random.Random(8)
    size = 200 * REGION + 4096
    m = DirtyMap(tmp_path / "v.dirty", size)
    model: set[int] = set()
    for _ in range(300):
        off = rng.randrange(0, size - 1)
        n = rng.randint(1, min(3 * REGION, size - off))
        span = m.mark(off, n)
        if span is not None:
            m.write(span)
        model.update(range(off // REGION, (off + n - 1) // REGION + 1))
    assert regions_of(m.runs()) == model and m.count() == len(model)
    m.close()
    again = DirtyMap(tmp_path / "v.dirty", size)
    assert regions_of(again.runs()) == model
    assert regions_of(RegionBitmap.read(tmp_path / "v.dirty", size).runs()) == model
    again.close()


def test_generations_say_when_a_sync_is_owed(tmp_path: Path):
    m = DirtyMap(tmp_path / "g", REGION * 8)
    assert not m.unsynced
    assert m.mark_and_write(0, 1) and m.unsynced
    assert not m.mark_and_write(0, 1)  # already marked: nothing written
    m.sync()
    assert not m.unsynced
    m.close()
    m.close()  # idempotent


def test_host_marking_map_writes_the_core_format(tmp_path: Path):
    """Failback reads the host's bitmap file with the core codec."""
    mm = MarkingMap(tmp_path / "marking", "u1", 8 * REGION)
    assert not mm.marking
    mm.enter_marking("card gone")
    mm.mark(3 * REGION, 2 * REGION)
    mm.close()
    assert RegionBitmap.read(tmp_path / "marking" / "u1.bitmap", 8 * REGION).runs() == [(3 * REGION, 2 * REGION)]
    again = MarkingMap(tmp_path / "marking", "u1", 8 * REGION)
    assert again.marking and again.reason == "card gone" and again.regions() == [(3 * REGION, 2 * REGION)]
    again.close()


def test_marking_a_long_range_a_byte_at_a_time_matches_region_by_region(rng):
    """The bulk path of `mark` (64+ regions: an initial sync) sets the same
    bits, counts the same and reports a span covering every changed byte."""
    RB = RegionBitmap
    size = 3000 * REGION + 123
    for _ in range(200):
        a, b = RB(size), RB(size)
        for _ in range(rng.randrange(0, 4)):  # some bits set before
            off, n = rng.randrange(size), rng.randrange(1, 200 * REGION)
            n = min(n, size - off)
            a.mark(off, n)
            b.mark(off, n)
        off = rng.randrange(size - 1)
        n = min(rng.randrange(1, 400 * REGION), size - off)
        old = b.to_bytes()
        span = a.mark(off, n)
        r0, r1 = off // REGION, (off + n - 1) // REGION
        for r in range(r0, r1 + 1):  # the region-by-region reference
            b.mark(r * REGION, 1)
        assert a.to_bytes() == b.to_bytes() and a.count() == b.count()
        new = a.to_bytes()
        changed = [i for i in range(len(new)) if new[i] != old[i]]
        if not changed:
            assert span is None
        else:
            assert span is not None and span[0] <= changed[0] and changed[-1] < span[1]


def test_sparse_chunks_match_a_set_model(rng, monkeypatch):
    """With tiny chunks (3 bytes: 24 regions), random marks, clears and
    merges across chunk boundaries give the same bits, count, runs, bytes
    and dirty bytes as a set of regions; a chunk exists only while it holds
    a bit (issue 11 item 10: the bitmap is sparse)."""
    import nicsplit.core.dirtymap as dm

    monkeypatch.setattr(dm, "CHUNK", 3)
    size = 500 * REGION + 777
    nregions = -(-size // REGION)
    for _ in range(30):
        b = dm.RegionBitmap(size)
        model: set[int] = set()
        for _ in range(rng.randrange(1, 40)):
            off = rng.randrange(size)
            n = min(rng.choice([1, REGION, 7 * REGION, 90 * REGION, 300 * REGION]) + rng.randrange(REGION), size - off)
            rs = set(range(off // REGION, (off + n - 1) // REGION + 1))
            before = b.to_bytes()
            op = rng.choice(["mark", "mark", "clear", "merge"])
            if op == "mark":
                span = b.mark(off, n)
                model |= rs
            elif op == "clear":
                span = b.clear(off, n)
                model -= rs
            else:
                other = dm.RegionBitmap(size)
                other.mark(off, n)
                assert b.merge(other.to_bytes() + b"\xff") == len(rs)  # bytes past the end never count
                span = None
                model |= rs
            after = b.to_bytes()
            changed = [i for i in range(len(after)) if after[i] != before[i]]
            if op != "merge":
                assert (span is None) == (not changed)
                if changed:
                    assert span[0] <= changed[0] and changed[-1] < span[1]
            want = bytearray(-(-nregions // 8))
            for r in model:
                want[r >> 3] |= 1 << (r & 7)
            assert after == bytes(want)
            assert b.count() == len(model)
            assert regions_of(b.runs()) == model
            last = nregions - 1
            assert b.dirty_bytes() == len(model) * REGION - (nregions * REGION - size if last in model else 0)
            assert b.chunks() == len({(r >> 3) // 3 for r in model})
        runs = b.runs()
        assert all(a[0] + a[1] < c[0] for a, c in zip(runs, runs[1:]))  # merged: no two runs touch


def test_a_4tib_bitmap_costs_what_is_marked(tmp_path: Path):
    """An empty bitmap of a 4 TiB vdisk holds no memory and costs no walk;
    marks cost their chunks only, and reopening reads only the file's data
    (the dense bitmap was 8 MiB, 1.6 s to open and 0.45 s per walk)."""
    import time
    import tracemalloc

    size = 4 << 40
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        m = DirtyMap(tmp_path / "big.bitmap", size)
        assert m.count() == 0 and m.runs() == [] and m.dirty_bytes() == 0
        took = time.perf_counter() - t0
        assert tracemalloc.get_traced_memory()[1] < 256 << 10 and m.chunks() == 0
    finally:
        tracemalloc.stop()
    assert took < 0.2, took
    marks = [(0, 1), (1 << 40, 3 * REGION), (size - 100, 100), (3 << 40, 1 << 30)]
    for off, n in marks:
        assert m.mark_and_write(off, n)
    want = 1 + 3 + 1 + (1 << 30) // REGION
    assert m.count() == want and m.dirty_bytes() == want * REGION and m.chunks() == 4
    assert m.runs() == [(0, REGION), (1 << 40, 3 * REGION), (3 << 40, 1 << 30), (size - REGION, REGION)]
    m.close()
    t0 = time.perf_counter()
    again = DirtyMap(tmp_path / "big.bitmap", size)
    assert again.count() == want and again.chunks() == 4 and again.runs() == m.runs()
    assert again.clear(0, size) == (0, size // REGION // 8) and again.count() == 0 and again.chunks() == 0
    assert time.perf_counter() - t0 < 0.5
    again.close()
