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
