"""Retention carried out (trimmer + base images + journal trim), checked with
the ledger of test_pits (TESTING.md D1/D3): after any trim, every PIT at or
after the base reads byte for byte as the ledger prefix, older ones are
refused, pinned PITs survive, and a crash in the middle loses nothing."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from nicsplit.testing.workload import BS, T0, Meta, V, Workload

from nicsplit.recovery.base import read_state
from nicsplit.journal.writer import Journal
from nicsplit.recovery.bookmarks import add_bookmark, list_bookmarks
from nicsplit.recovery.pits import PitIndex
from nicsplit.recovery.blockindex import BlockIndex, ReplicaError
from nicsplit.recovery.reader import PitReader
from nicsplit.recovery.retention import Policy
from nicsplit.recovery.trimmer import Trimmer

LATER = time.time_ns() + 30 * 86400 * 10**9  # every record time of the workload is older than any window
POLICY = Policy(keep_all_s=3600, keep_hourly_s=0)


def _setup(tmp_path: Path, seed: int, nbatches: int = 80):
    # References reach back at most 64 blocks (the card's dedup horizon), across many small segments.
    w = Workload.generate(seed, nbatches=nbatches, ref_window=64)
    data = tmp_path / "data"
    jd = data / "appliance" / "journal" / "cg1"
    w.write_journal(jd, segment_size=24 * 1024)
    goldens = {seq: {k: bytes(v) for k, v in imgs.items()} for seq, imgs in w.goldens()}
    return w, data, jd, goldens


def _check_pits(w: Workload, jd: Path, goldens: dict, base_seq: int) -> int:
    """Every journaled PIT >= the base equals the ledger; returns how many."""
    pits = PitIndex(jd).list_pits()
    assert pits and all(p.seq > base_seq for p in pits)
    for p in pits:
        with PitReader(jd, w.vdisks, p.seq) as r:
            for v in w.vdisks:
                assert r.pread(v.id, 0, v.size) == goldens[p.seq][v.id], f"PIT {p.seq} of {v.name} after trim"
    return len(pits)


def test_trim_keeps_every_later_pit_exact_and_pins_hold(tmp_path, seed):
    w, data, jd, goldens = _setup(tmp_path, seed)
    seqs = sorted(goldens)
    mid, early = seqs[len(seqs) // 2], seqs[0]
    add_bookmark(data, "cg1", "keep-me", mid, locked=True)
    add_bookmark(data, "cg1", "old", early)
    sizes = {v.id: v.size for v in w.vdisks}
    with Journal.open(jd, segment_size=24 * 1024) as j:
        nseg = len(j.segment_facts())
        rep = Trimmer(data, "cg1", j, POLICY, lambda: sizes).run_once(LATER)
        assert rep.trimmed > 0 and 0 < rep.base_seq < mid and rep.records > 0, rep
        assert len(j.segment_facts()) == nseg - rep.trimmed
        assert rep.pins == (mid,)
    assert read_state(data / "appliance" / "base" / "cg1").seq == rep.base_seq
    n = _check_pits(w, jd, goldens, rep.base_seq)
    print(f"\n{nseg} segments, {rep.trimmed} trimmed into the base at seq {rep.base_seq}; {n} PITs still exact")
    with pytest.raises(ReplicaError, match="older than the protection window"):
        PitReader(jd, w.vdisks, early)
    # the unlocked bookmark of a trimmed PIT is gone, the locked one stays
    assert [b.name for b in list_bookmarks(data, "cg1")] == ["keep-me"]
    # unpinned: the rest goes too, except the segment being written
    (data / "appliance" / "bookmarks" / "cg1.json").unlink()
    with Journal.open(jd, segment_size=24 * 1024) as j:  # the writer reopens a trimmed journal (refs resolve)
        rep2 = Trimmer(data, "cg1", j, POLICY, lambda: sizes).run_once(LATER)
        facts = j.segment_facts()
        # all that is left is the segment being written and those of the batch that ends in it
        assert rep2.base_seq > rep.base_seq and not any(f.last_seq and f.ends_batch for f in facts[:-1]), facts
        assert j.last_seq == w.batches[-1][0].last_seq
    _check_pits(w, jd, goldens, rep2.base_seq)
    with Journal.open(jd, readonly=True) as j:
        assert j.last_seq == w.batches[-1][0].last_seq


def test_a_crash_between_base_and_delete_is_finished_next_time(tmp_path, seed, monkeypatch):
    w, data, jd, goldens = _setup(tmp_path, seed, nbatches=50)
    sizes = {v.id: v.size for v in w.vdisks}
    with Journal.open(jd, segment_size=24 * 1024) as j:
        before = len(j.segment_facts())

        def crash(upto):  # the process dies after the base state was persisted
            raise KeyboardInterrupt("power cut")

        monkeypatch.setattr(j, "trim", crash)
        with pytest.raises(KeyboardInterrupt):
            Trimmer(data, "cg1", j, POLICY, lambda: sizes).run_once(LATER)
        assert len(j.segment_facts()) == before  # nothing deleted yet
    state = read_state(data / "appliance" / "base" / "cg1")
    assert state.seq > 0 and state.first_segment > 1
    # Readers meanwhile: PITs after the base are exact even with the old segments still there.
    _check_pits_from(w, jd, goldens, state.seq)
    with Journal.open(jd, segment_size=24 * 1024) as j:
        rep = Trimmer(data, "cg1", j, Policy(keep_all_s=1e9), lambda: sizes).run_once(LATER)  # keep everything now
        assert rep.trimmed > 0 and rep.records == 0  # only the interrupted deletion was finished
        assert j.segment_facts()[0].number == state.first_segment
    _check_pits(w, jd, goldens, state.seq)


def _check_pits_from(w: Workload, jd: Path, goldens: dict, base_seq: int) -> None:
    for p in PitIndex(jd).list_pits():
        if p.seq < base_seq:
            continue
        with PitReader(jd, w.vdisks, p.seq) as r:
            for v in w.vdisks:
                assert r.pread(v.id, 0, v.size) == goldens[p.seq][v.id]


def test_an_open_reader_survives_a_trim_under_it(tmp_path, seed):
    """An image server's reader at the newest PIT keeps reading right while
    retention moves the base past records it had indexed."""
    w, data, jd, goldens = _setup(tmp_path, seed, nbatches=60)
    last = w.batches[-1][0].last_seq
    sizes = {v.id: v.size for v in w.vdisks}
    with PitReader(jd, w.vdisks, last) as r:
        assert all(r.pread(v.id, 0, v.size) == goldens[last][v.id] for v in w.vdisks)
        r._cache.clear()  # so the next reads go back to the (now trimmed) segments
        with Journal.open(jd, segment_size=24 * 1024) as j:
            rep = Trimmer(data, "cg1", j, POLICY, lambda: sizes).run_once(LATER)
        assert rep.trimmed > 0
        for v in w.vdisks:
            assert r.pread(v.id, 0, v.size) == goldens[last][v.id]
            ext = r.extents(v.id, 0, v.size)
            assert sum(e.length for e in ext) == v.size


def test_status_file_of_an_open_image_pins_its_pit(tmp_path, seed):
    w, data, jd, goldens = _setup(tmp_path, seed, nbatches=60)
    seqs = sorted(goldens)
    pinned = seqs[len(seqs) // 3]
    (data / "run" / "images").mkdir(parents=True)
    (data / "run" / "images" / "abc.json").write_text(json.dumps({"cg": "cg1", "seq": pinned}))
    sizes = {v.id: v.size for v in w.vdisks}
    with Journal.open(jd, segment_size=24 * 1024) as j:
        rep = Trimmer(data, "cg1", j, POLICY, lambda: sizes).run_once(LATER)
    assert rep.base_seq < pinned and pinned in rep.pins
    with PitReader(jd, w.vdisks, pinned) as r:
        assert all(r.pread(v.id, 0, v.size) == goldens[pinned][v.id] for v in w.vdisks)


def test_a_reference_whose_block_was_stored_again_later_survives_the_trim(tmp_path):
    """Block X is stored in segment 1, referenced by a kept record R, then
    stored again after R (its home moves forward). Trimming segment 1 must
    keep X readable for R: a reader scanning the kept journal meets R
    before the later copy."""

    from nicsplit.core.records import Op
    from nicsplit.wire.frames import Record, fingerprint

    v = V(1, "d", 64 * BS)
    x = bytes([0x58]) * BS
    fp = fingerprint(x)
    data = tmp_path / "data"
    jd = data / "appliance" / "journal" / "cg1"
    batches = [
        [Record(1, 1, v.id, Op.WRITE, 0, 0, BS, T0, x)],  # X's first copy
        [Record(2, 2, v.id, Op.WRITE, 0, BS, BS, T0, bytes(BS))],  # filler: starts segment 2
        [Record(3, 3, v.id, Op.WRITE, 0, 8 * BS, BS, T0, b"", ((0, fp),))],  # R: a reference to X
        [Record(4, 4, v.id, Op.WRITE, 0, 16 * BS, BS, T0, x)],  # X again: its home moves here
    ]
    with Journal.open(jd, segment_size=5000) as j:
        for i, recs in enumerate(batches, 1):
            j.append_batch(Meta(i, recs[0].seq, recs[-1].seq, T0, T0), recs)
        facts = j.segment_facts()
        assert [f.last_seq for f in facts] == [1, 3, 4], facts  # X | filler, R | X again
        assert j.trim(facts[0].number) == 1  # X's first copy goes; R (seq 3) stays
    golden = bytearray(v.size)  # filler (seq 2) wrote zeros
    golden[0:BS] = x
    golden[8 * BS : 9 * BS] = x
    golden[16 * BS : 17 * BS] = x
    from nicsplit.recovery.base import BaseImages

    with BaseImages(data / "appliance" / "base" / "cg1", {v.id: v.size}, writable=True) as b:
        b.apply([(1, v.id, Op.WRITE, 0, BS, x)], seq=1, time_ns=T0, first_segment=2)
    for upto in (3, 4):
        want = bytearray(golden) if upto == 4 else bytearray(golden[: 16 * BS]) + bytes(v.size - 16 * BS)
        with PitReader(jd, [v], upto, index=BlockIndex(jd)) as r:
            assert r.pread(v.id, 0, v.size) == bytes(want), f"PIT {upto}"
    with Journal.open(jd, segment_size=5000) as j:  # the writer reopens it too
        assert j.read_block(fp) == x


def test_a_replica_created_after_a_trim_starts_from_the_base(tmp_path, seed):
    from nicsplit.recovery.replica import Distributor

    w, data, jd, goldens = _setup(tmp_path, seed, nbatches=50)
    sizes = {v.id: v.size for v in w.vdisks}
    with Journal.open(jd, segment_size=24 * 1024) as j:
        rep = Trimmer(data, "cg1", j, POLICY, lambda: sizes).run_once(LATER)
    assert rep.base_seq > 0
    last = w.batches[-1][0].last_seq
    with Distributor(jd, tmp_path / "replica", w.vdisks) as d:
        assert d.applied_seq == rep.base_seq and d.undo_floor == rep.base_seq
        d.catch_up(64)
        assert d.applied_seq == last
        for v in w.vdisks:
            assert d.read(v.id, 0, v.size) == goldens[last][v.id]
