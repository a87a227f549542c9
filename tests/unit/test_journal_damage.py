"""A damaged journal on the read side (docs/recovery.md §9): the scanner
resynchronises at the next valid COMMIT and goes on; every PIT before the
damage is usable and byte-exact (its image equals the ledger's golden image,
TESTING.md D1/D3), every PIT from the first damaged seq on is listed as
unusable, and the commands refuse those with one line naming the damaged
segment and the lost seqs.  Clear and sealed (at-rest encrypted) journals."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from nicsplit.testing.damage import corrupt, expected, journal_layout, make_journal
from nicsplit.testing.workload import Workload, golden_at

from nicsplit.journal.writer import Journal, JournalCorrupt
from nicsplit.journal.scan import JournalScanner
from nicsplit.recovery.pits import PitIndex, UnusablePit, known_damage
from nicsplit.recovery.blockindex import BlockIndex
from nicsplit.recovery.reader import PitReader
from nicsplit.recovery.replica import Distributor

MODES = ["record-data", "record-head", "entry-size", "commit", "segment-header"]


@pytest.mark.parametrize("sealed", [False, True], ids=["clear", "sealed"])
@pytest.mark.parametrize("mode", MODES)
def test_damaged_middle_segment(tmp_path: Path, seed: int, mode: str, sealed: bool):
    rng = random.Random(seed)
    jd = tmp_path / "data" / "appliance" / "journal" / "cg1"
    w = make_journal(jd, seed, sealed)
    commits, _ = journal_layout(jd)
    seg, off, hit = corrupt(jd, mode, rng)
    pits, first, resync = expected(w, commits, (seg, off), hit)

    idx = BlockIndex(jd)
    assert idx.pits.list_pits() == pits, "PITs after the damaged stretch must still be listed"
    [d] = idx.pits.damage
    assert (d.segment, d.offset, d.first_seq, d.last_seq, d.end_segment, d.end_offset) == (
        seg, off, first, resync.last_seq, resync.segment, resync.pos)
    assert idx.pits.stalled is None
    assert known_damage(jd.resolve()) == d
    assert sum(p.usable for p in pits) >= 1 and not all(p.usable for p in pits)

    # usable PITs: byte-exact images (D3), whatever the damage after them
    usable = [p for p in pits if p.usable]
    for p in usable:
        want = golden_at(w, p.seq)
        with PitReader(jd, w.vdisks, p.seq, index=idx) as r:
            for v in w.vdisks:
                assert r.pread(v.id, 0, v.size) == want[v.id], f"usable PIT {p.seq}: {v.name} differs"
    newest = [p for p in usable if p.consistent]
    assert idx.pits.newest_usable() == (newest[-1] if newest else None)

    # unusable PITs: one line naming the damaged segment and the lost seqs
    for p in pits:
        if p.usable:
            idx.pits.check_usable(p)
            continue
        with pytest.raises(UnusablePit) as ei:
            idx.pits.check_usable(p)
        msg = str(ei.value)
        assert "\n" not in msg and f"at seq {p.seq} is unusable" in msg
        assert f"segment {seg:08d}.seg of journal {jd}" in msg and f"seqs {first}..{resync.last_seq} are unreadable" in msg
        if newest:
            assert f"the newest usable point in time is seq {newest[-1].seq}" in msg

    # the writer still refuses to open; a read-only open can stop at the damage
    with pytest.raises(JournalCorrupt, match=f"{seg:08d}.seg at offset {off}"):
        Journal.open(jd)
    with Journal.open(jd, readonly=True, stop_at_damage=True) as j:
        assert j.last_seq == first - 1 and j.damage

    # distribution applies up to the damage and stops there with the same line
    later = [o for o in range(len(idx.rec_seq)) if idx.rec_seq[o] >= first]
    if later:
        with Distributor(jd, tmp_path / "replica", w.vdisks, index=idx) as dist:
            with pytest.raises(JournalCorrupt, match=f"seqs {first}..{resync.last_seq} are unreadable"):
                dist.catch_up(7)
            assert dist.applied_seq < first
            want = golden_at(w, dist.applied_seq)
            for v in w.vdisks:
                assert dist.read(v.id, 0, v.size) == want[v.id]


def test_damage_in_the_last_segment_is_the_tail_until_a_commit_follows(tmp_path: Path, seed: int):
    """A bad spot with no valid COMMIT after it is the tail (being written, or
    torn): the scan waits there; once a COMMIT follows, it is damage."""
    jd = tmp_path / "j"
    w = Workload.generate(seed, nbatches=12)
    w.write_journal(jd, segment_size=1 << 20, upto_batch=10)
    seg = jd / "00000001.seg"
    good = seg.stat().st_size
    w.write_journal(jd, segment_size=1 << 20, start_batch=10, upto_batch=11)
    raw = bytearray(seg.read_bytes())
    raw[good + 12 + 20] ^= 0x01  # the first record of batch 11
    seg.write_bytes(raw[:-1])  # ... and its COMMIT torn
    idx = PitIndex(jd)
    assert [p.seq for p in idx.list_pits()] == [p.seq for p in w.expected_pits()[:10]]
    assert idx.damage == [] and idx.stalled and f"offset {good}" in idx.stalled
    assert all(p.usable for p in idx.list_pits())
    # batch 12 appended after the torn one (as if the writer had not cut it): a valid COMMIT follows
    seg.write_bytes(raw)
    assert idx.refresh() == 1  # batch 11's COMMIT closes the damaged stretch
    [d] = idx.damage
    assert (d.offset, d.first_seq, d.last_seq) == (good, w.batches[9][0].last_seq + 1, w.batches[10][0].last_seq)
    assert [p.usable for p in idx.list_pits()] == [True] * 10 + [False]


def test_a_segment_that_grows_and_rolls_over_during_a_scan_is_read_whole(tmp_path, seed):
    """The scanner paused mid-segment (a generator between two commits) while
    the writer fills that segment and starts the next: on resuming it must
    read the rest of the first segment, not jump to the second and report
    the skipped records as damage."""
    w = Workload.generate(seed, nbatches=60)  # ~3 MiB: the first two batches are < 512 KiB, the rest spill over
    jd = tmp_path / "j"
    with Journal.open(jd, segment_size=512 << 10) as j:
        for meta, recs in w.batches[:2]:
            j.append_batch(meta, recs)
        sc = JournalScanner(jd)
        gen = sc.scan()
        first = next(gen)  # holds segment 1 open at the size it saw
        for meta, recs in w.batches[2:]:
            j.append_batch(meta, recs)
        facts = j.segment_facts()
        assert len(facts) >= 2 and facts[0].last_seq > w.batches[1][0].last_seq  # segment 1 grew, then rolled
    commits = [first[0]] + [c for c, _ in gen] + [c for c, _ in sc.scan()]
    assert [c.last_seq for c in commits] == [m.last_seq for m, _ in w.batches]
    assert all(c.damage is None for c in commits) and sc.damage == []
