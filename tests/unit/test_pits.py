"""PIT index, bookmarks and the PIT reader over a CG journal.

TESTING.md D1/D2/D3: a seeded workload of self-describing blocks over two
vdisks of one CG (overlapping and unaligned writes, zero, trim, barriers,
deduplicated blocks, merge windows) is journaled batch by batch while a ledger
records every op; for *every* PIT, the PitReader's image of both vdisks must
equal the golden image obtained by replaying the ledger prefix up to that seq.
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from nicsplit.core.records import RFLAG_IN_WINDOW, WFlag
from nicsplit.journal.scan import JournalScanner
from nicsplit.journal.writer import Journal
from nicsplit.recovery.bookmarks import BookmarkError, add_bookmark, bookmarks_path, get_bookmark, list_bookmarks
from nicsplit.recovery.pits import NoSuchPit, Pit, PitIndex, list_pits
from nicsplit.recovery.blockindex import BlockIndex, ReplicaError
from nicsplit.recovery.reader import PitReader
from nicsplit.core.records import Op
from nicsplit.wire.frames import Record
from nicsplit.testing.workload import BS, T0, Meta, V, Workload, check_sd, sd_block


def check_every_pit(jd: Path, w: Workload, **reader_kw) -> int:
    """D3: every PIT's image equals the golden image of its ledger prefix, on
    every vdisk; D2 on the aligned blocks; extents agree with the ledger."""
    idx = BlockIndex(jd)
    assert idx.pits.list_pits() == w.expected_pits()
    n = 0
    for seq, golden in w.goldens():
        with PitReader(jd, w.vdisks, seq, index=idx, **reader_kw) as r:
            written = w.written_blocks(seq)
            for v in w.vdisks:
                img = r.pread(v.id, 0, v.size)
                assert img == golden[v.id], f"PIT seq {seq}: vdisk {v.name} differs from the ledger prefix"
                for b in range(v.size // BS):
                    if (v.id, b) not in w.unaligned:
                        assert check_sd(img[b * BS : (b + 1) * BS], seq), (seq, v.name, b)
                # block status: never written = hole; data only where the ledger wrote
                for e in r.extents(v.id, 0, v.size):
                    for b in range(e.offset // BS, (e.offset + e.length - 1) // BS + 1):
                        if e.kind == "hole":
                            assert b not in written[v.id]
                            assert golden[v.id][b * BS : (b + 1) * BS].count(0) == len(golden[v.id][b * BS : (b + 1) * BS])
                        else:
                            assert b in written[v.id]
                        if e.kind == "zero":
                            blk = golden[v.id][b * BS : min((b + 1) * BS, v.size)]
                            assert blk.count(0) == len(blk)
                # random sub-ranges (unaligned reads)
                rng = random.Random(seq)
                for _ in range(5):
                    off = rng.randrange(v.size)
                    ln = rng.randrange(v.size - off + 1)
                    assert r.pread(v.id, off, ln) == bytes(golden[v.id][off : off + ln])
        n += 1
    return n


# -- D3 ---------------------------------------------------------------------------------------------


def test_every_pit_equals_its_ledger_prefix(tmp_path: Path, seed: int):
    w = Workload.generate(seed)
    jd = tmp_path / "j"
    w.write_journal(jd)
    assert sum(1 for _ in jd.glob("*.seg")) > 2  # batches span segments
    assert check_every_pit(jd, w) == len(w.batches)


def test_every_pit_with_a_reader_that_uses_the_live_journal(tmp_path: Path, seed: int):
    """The appliance passes its own (writer) Journal for reference resolution."""
    w = Workload.generate(seed + 1, nbatches=25)
    jd = tmp_path / "j"
    w.write_journal(jd)
    with Journal.open(jd) as j:
        check_every_pit(jd, w, journal=j)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), nbatches=st.integers(1, 12), segment=st.sampled_from([200, 4096, 1 << 20]))
def test_every_pit_hypothesis(seed: int, nbatches: int, segment: int):
    w = Workload.generate(seed, nbatches=nbatches, vdisks=[V(1, "a", 8 * BS), V(2, "b", 5 * BS + 512)])
    with tempfile.TemporaryDirectory() as tmp:
        jd = Path(tmp) / "j"
        w.write_journal(jd, segment_size=segment)
        check_every_pit(jd, w)


# -- incremental refresh ------------------------------------------------------------------------


def test_index_refreshes_incrementally_while_the_journal_grows(tmp_path: Path, seed: int):
    w = Workload.generate(seed, nbatches=40)
    jd = tmp_path / "j"
    w.write_journal(jd, upto_batch=15)
    idx = BlockIndex(jd)
    assert len(idx.pits) == 15
    scanner = idx.pits._scanner
    where = (scanner.segment, scanner.offset)
    w.write_journal(jd, start_batch=15)
    assert idx.refresh() == 25
    assert (scanner.segment, scanner.offset) > where
    assert idx.refresh() == 0
    assert idx.pits.list_pits() == w.expected_pits()
    goldens = list((s, {k: bytes(v) for k, v in g.items()}) for s, g in w.goldens())
    for seq, golden in goldens[10:]:
        with PitReader(jd, w.vdisks, seq, index=idx) as r:
            for v in w.vdisks:
                assert r.pread(v.id, 0, v.size) == golden[v.id]


def test_uncommitted_and_torn_tails_are_invisible(tmp_path: Path):
    w = Workload.generate(5, nbatches=6)
    jd = tmp_path / "j"
    w.write_journal(jd, segment_size=1 << 20)
    seg = jd / "00000001.seg"
    before = list_pits(jd)
    committed = seg.stat().st_size
    # a RECORD entry without its COMMIT (a batch in progress), then garbage
    with Journal.open(jd) as j:
        meta, recs = w.batches[-1]
        nxt = Record(meta.last_seq + 1, 1, 11, Op.WRITE, 0, 0, BS, T0, sd_block(11, 0, meta.last_seq + 1))
        j.append_batch(Meta(99, nxt.seq, nxt.seq, T0, T0), [nxt])
    raw = seg.read_bytes()
    seg.write_bytes(raw[: len(raw) - 20])  # cut the new COMMIT in half
    idx = PitIndex(jd)
    assert idx.list_pits() == before
    with open(seg, "ab") as f:
        f.write(b"\xff" * 100)
    assert idx.refresh() == 0 and idx.list_pits() == before
    assert idx.stalled and "00000001.seg" in idx.stalled
    seg.write_bytes(raw[:committed])  # what the writer's recovery would leave
    assert PitIndex(jd).list_pits() == before


def test_scanner_finds_batches_spanning_segments(tmp_path: Path):
    jd = tmp_path / "j"
    recs = [Record(s, s, 1, Op.WRITE, 0, s * BS, BS, T0 + s, sd_block(1, s, s)) for s in range(1, 40)]
    with Journal.open(jd, segment_size=3 * BS) as j:
        j.append_batch(Meta(1, 1, 39, T0, T0 + 39), recs)
    assert len(list(jd.glob("*.seg"))) > 5
    sc = JournalScanner(jd)
    [(commit, heads)] = list(sc.scan())
    assert commit.last_seq == 39 and [h.seq for h in heads] == list(range(1, 40))
    with Journal.open(jd, readonly=True) as j:
        for h in heads:
            assert j.read_entry(h.segment, h.pos).seq == h.seq
    assert list(sc.scan()) == []


# -- PIT resolution ---------------------------------------------------------------------------------


def _journal_of(d: Path, commits: list[tuple[int, int, bool]]) -> None:
    """Batches of one record each: (last_seq, t_last_ns, in_window)."""
    with Journal.open(d) as j:
        for i, (seq, t, inwin) in enumerate(commits, 1):
            rec = Record(seq, seq, 1, Op.WRITE, RFLAG_IN_WINDOW if inwin else 0, 0, 512, t, b"x" * 512)
            j.append_batch(Meta(i, seq, seq, t, t), [rec])


def test_resolution_and_errors(tmp_path: Path):
    jd = tmp_path / "j"
    _journal_of(jd, [(3, 100, False), (5, 200, True), (9, 300, False), (12, 300, False)])
    idx = PitIndex(jd)
    assert [p.seq for p in idx.list_pits()] == [3, 5, 9, 12]
    assert [p.consistent for p in idx.list_pits()] == [True, False, True, True]
    assert idx.pit_for_seq(5) == Pit(5, 200, 2, False)
    with pytest.raises(NoSuchPit, match=r"^no point in time at seq 7; nearest are 5 and 9$"):
        idx.pit_for_seq(7)
    with pytest.raises(NoSuchPit, match="the oldest is 3"):
        idx.pit_for_seq(1)
    with pytest.raises(NoSuchPit, match="the latest is 12"):
        idx.pit_for_seq(13)
    assert idx.pit_at(100).seq == 3
    assert idx.pit_at(250).seq == 3  # seq 5 is inside a merge window
    assert idx.pit_at(250, consistent=False).seq == 5
    assert idx.pit_at(300).seq == 12 and idx.pit_at(10**12).seq == 12
    with pytest.raises(NoSuchPit, match="before the oldest point in time"):
        idx.pit_at(99)
    assert idx.latest().seq == 12 and idx.oldest().seq == 3


def test_pits_inside_a_protection_gap_are_not_consistent(tmp_path: Path):
    """A PIT whose last record carries WFlag.GAP (a vdisk of the CG was marking
    or resyncing) is listed consistent=False, gap=True; the one before the gap
    stays consistent, and so is the first after it."""
    jd = tmp_path / "j"
    flags = [(3, 0), (5, WFlag.GAP), (7, WFlag.GAP | WFlag.FUA), (9, RFLAG_IN_WINDOW | WFlag.GAP), (11, 0)]
    with Journal.open(jd) as j:
        for i, (seq, f) in enumerate(flags, 1):
            j.append_batch(Meta(i, seq, seq, seq * 10, seq * 10), [Record(seq, seq, 1, Op.WRITE, int(f), 0, 512, seq * 10, b"x" * 512)])
    idx = PitIndex(jd)
    pits = idx.list_pits()
    assert [(p.seq, p.consistent, p.gap) for p in pits] == [
        (3, True, False), (5, False, True), (7, False, True), (9, False, False), (11, True, False)]
    assert idx.pit_at(95).seq == 3 and idx.pit_at(95, consistent=False).seq == 9
    assert idx.first_at_or_after(4).seq == 11
    jd2 = tmp_path / "j2"
    with Journal.open(jd2) as j:
        for i, (seq, f) in enumerate(flags[:3], 1):
            j.append_batch(Meta(i, seq, seq, seq * 10, seq * 10), [Record(seq, seq, 1, Op.WRITE, int(f), 0, 512, seq * 10, b"x" * 512)])
    assert PitIndex(jd2).latest().seq == 3  # the last consistent PIT before the gap


def test_latest_skips_an_open_merge_window(tmp_path: Path):
    jd = tmp_path / "j"
    _journal_of(jd, [(1, 10, False), (2, 20, True)])
    idx = PitIndex(jd)
    assert idx.latest().seq == 1 and idx.latest(consistent=False).seq == 2


def test_empty_journal(tmp_path: Path):
    jd = tmp_path / "j"
    Journal.open(jd).close()
    idx = PitIndex(jd)
    assert idx.list_pits() == []
    for call in (idx.latest, idx.oldest, lambda: idx.pit_at(5), lambda: idx.pit_for_seq(1)):
        with pytest.raises(NoSuchPit, match="point in time"):
            call()
    with pytest.raises(ReplicaError, match="beyond"):
        PitReader(jd, [V(1, "a", BS)], 1)
    with PitReader(jd, [V(1, "a", BS)], 0) as r:  # the empty image
        assert r.pread(1, 0, BS) == bytes(BS)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 3), st.integers(0, 50), st.booleans()), min_size=1, max_size=15),
       st.integers(0, 1000), st.integers(0, 200))
def test_resolution_matches_a_model(steps, probe_time, probe_seq):
    commits, seq, t = [], 0, 1000
    for dseq, dt, inwin in steps:
        seq += dseq
        t += dt
        commits.append((seq, t, inwin))
    with tempfile.TemporaryDirectory() as tmp:
        jd = Path(tmp) / "j"
        _journal_of(jd, commits)
        idx = PitIndex(jd)
        tq = 1000 + probe_time
        ok = [c for c in commits if c[1] <= tq and not c[2]]
        if commits[0][1] > tq:
            with pytest.raises(NoSuchPit, match="before the oldest"):
                idx.pit_at(tq)
        elif not ok:
            with pytest.raises(NoSuchPit):
                idx.pit_at(tq)
        else:
            assert idx.pit_at(tq).seq == ok[-1][0]
        exact = [c for c in commits if c[0] == probe_seq]
        if exact:
            assert idx.pit_for_seq(probe_seq).seq == probe_seq
        else:
            with pytest.raises(NoSuchPit, match=f"no point in time at seq {probe_seq}"):
                idx.pit_for_seq(probe_seq)


# -- bookmarks ----------------------------------------------------------------------------------------


def test_bookmarks(tmp_path: Path):
    data = tmp_path / "data"
    jd = data / "appliance" / "journal" / "cg1"
    _journal_of(jd, [(3, 100, False), (5, 200, False)])
    b = add_bookmark(data, "cg1", "before-upgrade", 3, locked=True)
    assert (b.name, b.seq, b.time_ns, b.locked) == ("before-upgrade", 3, 100, True)
    add_bookmark(data, "cg1", "after", 5)
    assert [x.name for x in list_bookmarks(data, "cg1")] == ["before-upgrade", "after"]
    assert get_bookmark(data, "cg1", "after").seq == 5
    raw = json.loads(bookmarks_path(data, "cg1").read_text())
    assert raw["version"] == 1 and raw["cg"] == "cg1" and len(raw["bookmarks"]) == 2
    assert not list(bookmarks_path(data, "cg1").parent.glob("*.tmp"))
    with pytest.raises(BookmarkError, match="already exists in CG cg1 .seq 3."):
        add_bookmark(data, "cg1", "before-upgrade", 5)
    with pytest.raises(BookmarkError, match=r"unknown bookmark 'nope' in CG cg1 \(known: before-upgrade, after\)"):
        get_bookmark(data, "cg1", "nope")
    with pytest.raises(BookmarkError, match="bad bookmark name"):
        add_bookmark(data, "cg1", "a/b", 5)
    with pytest.raises(NoSuchPit, match="nearest are 3 and 5"):
        add_bookmark(data, "cg1", "x", 4)
    assert list_bookmarks(data, "other") == []
    bookmarks_path(data, "cg1").write_text("{not json")
    with pytest.raises(BookmarkError, match="unreadable bookmark file"):
        list_bookmarks(data, "cg1")


# -- times on the command line ---------------------------------------------------------------------


def test_parse_time():
    from nicsplit.recovery.select import parse_time

    now = 1_700_000_000 * 10**9
    assert parse_time("now", now) == now
    assert parse_time("-90s", now) == now - 90 * 10**9
    assert parse_time("-2h", now) == now - 7200 * 10**9
    assert parse_time("1700000000.5", now) == 1_700_000_000_500_000_000
    assert parse_time("2023-11-14T22:13:20+00:00", now) == now
