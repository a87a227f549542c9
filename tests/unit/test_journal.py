"""The per-CG journal: append / reopen, recovery of torn tails, detection of
corrupt committed entries, the D5 power-cut double, duplicates, references."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from nicsplit.journal.format import encode_commit
from nicsplit.journal.scan import JournalScanner
from nicsplit.journal.writer import (
    BatchRejected, Journal, JournalCorrupt, JournalError,
)
from nicsplit.testing.appliance import CrashFilesystem
from nicsplit.testing.workload import Meta, batch, check_after_cut, rand_batches, write
from nicsplit.core.records import Op
from nicsplit.wire.frames import Record, fingerprint


def all_records(j: Journal) -> list[tuple[Record, bytes]]:
    return list(j.records())


def test_append_and_reopen(tmp_path: Path):
    d = tmp_path / "j"
    rng = random.Random(1)
    batches = rand_batches(rng, 5)
    with Journal.open(d) as j:
        assert j.last_seq == 0
        for meta, recs in batches:
            res = j.append_batch(meta, recs)
            assert res.applied and res.last_seq == meta.last_seq
        got = all_records(j)
    want = [r for _, recs in batches for r in recs]
    assert [r for r, _ in got] == want
    assert [p for _, p in got] == [r.data for r in want]
    with Journal.open(d) as j:
        assert j.last_seq == 15
        assert [r for r, _ in all_records(j)] == want
        st = j.statistics()
        assert (st.records, st.batches, st.last_seq, st.last_batch_id, st.segments) == (15, 5, 15, 5, 1)
        assert st.truncated_bytes == 0 and not st.failed
        assert [r.seq for r, _ in j.records(from_seq=7, upto_seq=9)] == [7, 8, 9]
        assert j.seq_at(0) == 0 and j.seq_at(60) == 6 and j.seq_at(10**9) == 15
    assert {p.name for p in d.iterdir()} == {"00000001.seg", "lock"}
    assert (d / "00000001.seg").stat().st_mode & 0o777 == 0o600


def test_segments_roll_over(tmp_path: Path):
    d = tmp_path / "j"
    rng = random.Random(2)
    batches = rand_batches(rng, 20)
    with Journal.open(d, segment_size=20000) as j:
        for meta, recs in batches:
            j.append_batch(meta, recs)
        assert j.statistics().segments > 3
    with Journal.open(d, segment_size=20000) as j:
        assert [r for r, _ in all_records(j)] == [r for _, recs in batches for r in recs]


def test_uncommitted_and_torn_tail_discarded(tmp_path: Path):
    d = tmp_path / "j"
    with Journal.open(d) as j:
        j.append_batch(batch(1, [write(1, b"a" * 4096)]), [write(1, b"a" * 4096)])
        committed = (d / "00000001.seg").stat().st_size
        j.append_batch(batch(2, [write(2, b"b" * 4096)]), [write(2, b"b" * 4096)])
    seg = d / "00000001.seg"
    raw = seg.read_bytes()
    # Cut the second batch's COMMIT in half: its RECORD is intact but uncommitted.
    seg.write_bytes(raw[: len(raw) - 30])
    with Journal.open(d) as j:
        assert j.last_seq == 1
        assert [r.seq for r, _ in all_records(j)] == [1]
        assert j.statistics().truncated_bytes == len(raw) - 30 - committed
        assert seg.stat().st_size == committed
        # the journal goes on from the cut
        j.append_batch(batch(3, [write(2, b"c" * 10)]), [write(2, b"c" * 10)])
    with Journal.open(d) as j:
        assert [(r.seq, p) for r, p in all_records(j)] == [(1, b"a" * 4096), (2, b"c" * 10)]
    # garbage appended after the last commit (a torn write) is cut too
    with open(seg, "ab") as f:
        f.write(os.urandom(1000))
    with Journal.open(d) as j:
        assert j.last_seq == 2 and j.statistics().truncated_bytes == 1000


def test_uncommitted_segment_after_last_commit_is_removed(tmp_path: Path):
    d = tmp_path / "j"
    with Journal.open(d, segment_size=5000) as j:
        j.append_batch(batch(1, [write(1, b"a" * 4096)]), [write(1, b"a" * 4096)])
    # a crash right after creating segment 2: header torn
    (d / "00000002.seg").write_bytes(b"NSJS\x00")
    with Journal.open(d, segment_size=5000) as j:
        assert j.last_seq == 1
    assert not (d / "00000002.seg").exists()


def test_corrupt_committed_entry_is_a_clear_error(tmp_path: Path):
    d = tmp_path / "j"
    with Journal.open(d) as j:
        for b in range(1, 4):
            j.append_batch(batch(b, [write(b, bytes([b]) * 4096)]), [write(b, bytes([b]) * 4096)])
    seg = d / "00000001.seg"
    raw = bytearray(seg.read_bytes())
    raw[24 + 12 + 100] ^= 0xFF  # inside the first RECORD's payload
    seg.write_bytes(raw)
    with pytest.raises(JournalCorrupt, match=r"00000001\.seg at offset 24 \(entry CRC mismatch\)"):
        Journal.open(d)
    assert seg.read_bytes() == raw  # nothing was truncated
    with pytest.raises(JournalCorrupt):
        Journal.open(d, readonly=True)


def test_torn_tail_holding_an_old_commit_image_is_cut(tmp_path: Path):
    """A torn last record whose data holds the bytes of an older COMMIT entry
    (a protected disk may hold a copy of a journal) is a torn tail, for the
    writer and the PIT scanner alike: the resync after a bad spot accepts only
    a COMMIT that can follow the last good one (`scan.find_commit`).  The
    writer used to accept any COMMIT-shaped bytes with a valid CRC there, and
    refused to open a journal that the scanner read as merely torn."""
    d = tmp_path / "j"
    stale = encode_commit(99, 1, 1, 10, 10, 1)  # what batch 1's COMMIT could look like
    data = bytes(100) + stale + bytes(4096 - 100 - len(stale))
    with Journal.open(d) as j:
        for b in range(1, 4):
            j.append_batch(batch(b, [write(b, bytes([b]) * 4096)]), [write(b, bytes([b]) * 4096)])
        j.append_batch(batch(4, [write(4, data)]), [write(4, data)])
    seg = d / "00000001.seg"
    raw = seg.read_bytes()
    at = raw.index(stale)
    seg.write_bytes(raw[: at + len(stale) + 5])  # a crash tore batch 4's record after the image
    sc = JournalScanner(d)
    assert [c.last_seq for c, _ in sc.scan()] == [1, 2, 3] and sc.damage == [] and sc.stalled is None
    with Journal.open(d) as j:
        assert j.last_seq == 3 and j.statistics().truncated_bytes > 0
        assert [(r.seq, p) for r, p in j.records()] == [(b, bytes([b]) * 4096) for b in range(1, 4)]


def test_readonly_open_can_stop_at_damage(tmp_path: Path):
    """Readers of a damaged journal (docs/recovery.md §9) keep the committed
    prefix before the damage; a writer never opens past it."""
    d = tmp_path / "j"
    with Journal.open(d) as j:
        for b in range(1, 4):
            j.append_batch(batch(b, [write(b, bytes([b]) * 4096)]), [write(b, bytes([b]) * 4096)])
    seg = d / "00000001.seg"
    raw = bytearray(seg.read_bytes())
    second = 24 + (12 + 58 + 4096) + (12 + 44)  # batch 2's RECORD entry
    raw[second + 12 + 100] ^= 0xFF
    seg.write_bytes(raw)
    with Journal.open(d, readonly=True, stop_at_damage=True) as j:
        assert j.last_seq == 1 and [(r.seq, p) for r, p in j.records()] == [(1, b"\x01" * 4096)]
        assert j.damage and f"00000001.seg at offset {second} (entry CRC mismatch)" in j.damage
        assert "refusing" not in j.damage
    with pytest.raises(ValueError, match="read-only"):
        Journal.open(d, stop_at_damage=True)
    assert seg.read_bytes() == raw


def test_corrupt_segment_header_before_committed_data(tmp_path: Path):
    d = tmp_path / "j"
    with Journal.open(d, segment_size=5000) as j:
        for b in range(1, 4):
            j.append_batch(batch(b, [write(b, b"x" * 4096)]), [write(b, b"x" * 4096)])
    seg = d / "00000001.seg"
    raw = bytearray(seg.read_bytes())
    raw[0] = ord("X")
    seg.write_bytes(raw)
    with pytest.raises(JournalCorrupt, match="00000001.seg at offset 0"):
        Journal.open(d, segment_size=5000)


def test_missing_segment_is_an_error(tmp_path: Path):
    d = tmp_path / "j"
    with Journal.open(d, segment_size=5000) as j:
        for b in range(1, 4):
            j.append_batch(batch(b, [write(b, b"x" * 4096)]), [write(b, b"x" * 4096)])
    (d / "00000002.seg").unlink()
    with pytest.raises(JournalCorrupt, match="00000002.seg is missing"):
        Journal.open(d)


def test_duplicates_not_applied_twice(tmp_path: Path):
    d = tmp_path / "j"
    recs = [write(1, b"a" * 100), write(2, b"b" * 100), write(3, b"c" * 100)]
    with Journal.open(d) as j:
        assert j.append_batch(batch(1, recs), recs).applied
        size = (d / "00000001.seg").stat().st_size
        again = j.append_batch(batch(1, recs), recs)
        assert not again.applied and again.last_seq == 3 and again.known == ()
        assert j.append_batch(batch(9, recs[:2]), recs[:2]).applied is False
        assert (d / "00000001.seg").stat().st_size == size
        # overlapping batch (re-batched after a reconnect): only seqs 4.. are new
        more = recs[1:] + [write(4, b"d" * 100)]
        assert j.append_batch(batch(2, more), more).applied
        assert [r.seq for r, _ in all_records(j)] == [1, 2, 3, 4]
        assert j.statistics().duplicates == 2
    with Journal.open(d) as j:
        assert [r.seq for r, _ in all_records(j)] == [1, 2, 3, 4]


def test_gap_is_accepted_and_counted(tmp_path: Path):
    with Journal.open(tmp_path / "j") as j:
        j.append_batch(batch(1, [write(1, b"a")]), [write(1, b"a")])
        j.append_batch(batch(2, [write(5, b"e")]), [write(5, b"e")])
        assert j.statistics().gaps == 1 and j.last_seq == 5
    with Journal.open(tmp_path / "j") as j:
        assert j.statistics().gaps == 1


@pytest.mark.parametrize("meta, recs, match", [
    (Meta(1, 2, 3), [write(1, b"a")], "outside"),
    (Meta(1, 1, 3), [write(2, b"a"), write(2, b"b")], "out of order"),
    (Meta(1, 3, 2), [], "bad seq range"),
])
def test_bad_batches_rejected_and_nothing_written(tmp_path: Path, meta, recs, match):
    with Journal.open(tmp_path / "j") as j:
        with pytest.raises(BatchRejected, match=match):
            j.append_batch(meta, recs)
        assert j.last_seq == 0
    assert not (tmp_path / "j" / "00000001.seg").exists()


def test_references_resolve_across_batches_and_reopen(tmp_path: Path):
    d = tmp_path / "j"
    a, b = os.urandom(4096), os.urandom(4096)
    first = Record(1, 1, 1, Op.WRITE, 0, 0, 8192, 0, a + b)
    with Journal.open(d) as j:
        res = j.append_batch(batch(1, [first]), [first])
        assert set(res.known) == {fingerprint(a), fingerprint(b)}
        # block 0 by reference, block 1 new data; then a record fully by reference in the same batch
        c = os.urandom(4096)
        second = Record(2, 2, 1, Op.WRITE, 0, 4096, 8192, 0, c, ((0, fingerprint(b)),))
        third = Record(3, 3, 2, Op.WRITE, 0, 0, 8192, 0, b"", ((0, fingerprint(c)), (1, fingerprint(a))))
        res = j.append_batch(Meta(2, 2, 3), [second, third])
        assert res.known == (fingerprint(c),)
        want = [(1, a + b), (2, b + c), (3, c + a)]
        assert [(r.seq, p) for r, p in j.records()] == want
        # a reference to a block the journal does not hold: rejected, nothing written
        size = (d / "00000001.seg").stat().st_size
        bad = Record(4, 4, 1, Op.WRITE, 0, 0, 4096, 0, b"", ((0, b"\x99" * 16),))
        with pytest.raises(BatchRejected, match="does not hold"):
            j.append_batch(batch(3, [bad]), [bad])
        assert (d / "00000001.seg").stat().st_size == size and j.last_seq == 3
        # the stored record keeps its references (dedup survives in the journal)
        assert [r.refs for r in j.iter_records(2)] == [second.refs, third.refs]
    with Journal.open(d, readonly=True) as j:
        assert [(r.seq, p) for r, p in j.records()] == want
        assert j.statistics().blocks_indexed == 3


def test_readonly_open_does_not_truncate_and_writer_lock(tmp_path: Path):
    d = tmp_path / "j"
    w = Journal.open(d)
    w.append_batch(batch(1, [write(1, b"a")]), [write(1, b"a")])
    with pytest.raises(JournalError, match=f"in use by pid {os.getpid()} "):  # the holder is named (issue 11 item 9)
        Journal.open(d)
    seg = d / "00000001.seg"
    with open(seg, "ab") as f:
        f.write(b"partial entry of a batch in progress")
    size = seg.stat().st_size
    with Journal.open(d, readonly=True) as r:
        assert r.last_seq == 1
        with pytest.raises(JournalError, match="read-only"):
            r.append_batch(batch(2, [write(2, b"b")]), [write(2, b"b")])
    assert seg.stat().st_size == size
    w.close()
    with pytest.raises(JournalError, match="no journal"):
        Journal.open(tmp_path / "missing", readonly=True)


# -- D5: power cuts ----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["drop", "tear", "keep"])
def test_power_cut_between_batches(mode: str, seed: int):
    rng = random.Random(seed)
    for _ in range(20):
        fs = CrashFilesystem()
        batches = rand_batches(rng, rng.randint(0, 12))
        acked = []
        with Journal.open(Path("/j"), fs=fs, segment_size=30000) as j:
            for meta, recs in batches:
                j.append_batch(meta, recs)
                acked.append((meta, recs))
        check_after_cut(fs.power_cut(mode, rng), acked, None)


@pytest.mark.parametrize("mode", ["drop", "tear", "keep"])
def test_power_cut_during_a_batch(mode: str, seed: int):
    """The k-th fsync fails (the batch in progress is not acked); the plug is
    pulled; every acked batch survives and the in-flight one is all or nothing."""
    rng = random.Random(seed)
    for _ in range(30):
        fs = CrashFilesystem(fail_sync_at=rng.randint(1, 25))
        batches = rand_batches(rng, 12)
        acked: list = []
        inflight = None
        j = Journal.open(Path("/j"), fs=fs, segment_size=30000) if fs.fail_sync_at > 1 else None
        if j is None:
            with pytest.raises(OSError):
                Journal.open(Path("/j"), fs=fs, segment_size=30000)
            continue
        for meta, recs in batches:
            try:
                j.append_batch(meta, recs)
            except JournalError as e:
                assert "nothing acknowledged" in str(e)
                inflight = recs
                # fatal: never retried, every later call refused
                with pytest.raises(JournalError, match="failed earlier"):
                    j.append_batch(meta, recs)
                assert j.statistics().failed
                break
            acked.append((meta, recs))
        j.close()
        fs.fail_sync_at = None
        check_after_cut(fs.power_cut(mode, rng), acked, inflight)


def test_failed_write_is_fatal(tmp_path: Path):
    fs = CrashFilesystem()
    j = Journal.open(Path("/j"), fs=fs)
    j.append_batch(batch(1, [write(1, b"a")]), [write(1, b"a")])
    fs.fail_write_at = fs.writes + 1
    with pytest.raises(JournalError, match="ENOSPC|injected"):
        j.append_batch(batch(2, [write(2, b"b")]), [write(2, b"b")])
    fs.fail_write_at = None
    with pytest.raises(JournalError, match="failed earlier"):
        j.append_batch(batch(2, [write(2, b"b")]), [write(2, b"b")])


@pytest.mark.parametrize("mode", ["drop", "tear", "keep"])
def test_group_commit_power_cut(mode: str, seed: int):
    """Batches appended with sync=False are durable only after sync(): a cut
    before it may lose them (whole, never partly); every batch covered by a
    sync survives, and durable_seq never claims more than that."""
    rng = random.Random(seed)
    for _ in range(20):
        fs = CrashFilesystem()
        batches = rand_batches(rng, rng.randint(1, 12))
        acked: list = []
        with Journal.open(Path("/j"), fs=fs, segment_size=30000) as j:
            group: list = []
            for meta, recs in batches:
                j.append_batch(meta, recs, sync=False)
                group.append((meta, recs))
                assert j.durable_seq <= (acked[-1][1][-1].seq if acked else 0)
                if rng.random() < 0.5:
                    j.sync()
                    acked += group
                    group = []
                    assert j.durable_seq == j.last_seq
        cut = fs.power_cut(mode, rng)
        with Journal.open(Path("/j"), fs=cut, segment_size=30000) as j2:
            got = [r for r, _ in j2.records()]
            want = [r for _, recs in acked for r in recs]
            assert got[: len(want)] == want, "a synced batch is missing or damaged"
            rest = got[len(want):]
            unsynced = [r for _, recs in group for r in recs]
            assert rest == unsynced[: len(rest)], "an unsynced batch survived out of order"
            # whole batches only
            ends = {sum(len(r) for _, r in group[:k]) for k in range(len(group) + 1)}
            assert len(rest) in ends, "a partial batch survived"


def test_journal_layouts_are_defined_once():
    """The entry, COMMIT, segment header and carried-block layouts are
    struct.Structs of nicsplit.journal.format and of no other module (a second
    copy would let a reader silently disagree with the writer)."""
    import ast

    from nicsplit.journal import format as fmt

    src = Path(fmt.__file__).resolve().parents[1]
    wanted = {s.format.replace("x", "s") for s in (fmt.ENTRY, fmt.COMMIT, fmt.SEGMENT_HEAD, fmt.CARRY)}
    where: dict[str, list[str]] = {}
    for path in sorted(src.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "Struct" and node.args
                    and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                if node.args[0].value.replace("x", "s") in wanted:
                    where.setdefault(node.args[0].value, []).append(str(path.relative_to(src)))
    assert len(where) == len(wanted) and all(v == ["journal/format.py"] for v in where.values()), where
