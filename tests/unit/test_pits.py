"""PIT index, bookmarks and the PIT reader over a CG journal.

TESTING.md D1/D2/D3: a seeded workload of self-describing blocks over two
vdisks of one CG (overlapping and unaligned writes, zero, trim, barriers,
deduplicated blocks, merge windows) is journaled batch by batch while a ledger
records every op; for *every* PIT, the PitReader's image of both vdisks must
equal the golden image obtained by replaying the ledger prefix up to that seq.
"""

from __future__ import annotations

import argparse
import json
import random
import struct
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from nicsplit.journal.writer import Journal
from nicsplit.recovery.pits import (
    RFLAG_IN_WINDOW, BookmarkError, JournalScanner, NoSuchPit, Pit, PitIndex, add_bookmark, bookmarks_path,
    get_bookmark, list_bookmarks, list_pits,
)
from nicsplit.recovery.replica import BlockIndex, PitReader, ReplicaError
from nicsplit.core.records import Op
from nicsplit.wire.frames import BLOCK_SIZE, Record, fingerprint

BS = BLOCK_SIZE
T0 = 1_700_000_000 * 10**9  # ns; record times are T0 + seq * 1 ms


# -- workload: ledger + self-describing blocks (D1, D2) ----------------------------------------

_BLOCK_HEAD = struct.Struct(">4sQQQ")  # magic b"NSTB", vdisk, block, seq; crc32 of the rest in the last 4 bytes


def sd_block(vdisk: int, block: int, seq: int) -> bytes:
    """A self-describing 4 KiB block (D2): who/where/when, filler, CRC."""
    head = _BLOCK_HEAD.pack(b"NSTB", vdisk, block, seq)
    filler = random.Random(hash((vdisk, block, seq))).randbytes(BS - len(head) - 4)
    body = head + filler
    return body + struct.pack(">I", zlib.crc32(body))


def check_sd(block: bytes, upto: int) -> bool:
    """D2 check of one block read back: zeros, or a self-describing block with
    a valid CRC and a seq not after the PIT (unaligned writes break the CRC:
    the golden image is the oracle for those)."""
    if block.count(0) == len(block):
        return True
    if block[:4] != b"NSTB" or zlib.crc32(block[:-4]) != struct.unpack(">I", block[-4:])[0]:
        return False
    return _BLOCK_HEAD.unpack_from(block)[3] <= upto


@dataclass
class V:
    id: int
    name: str
    size: int
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Meta:
    batch_id: int
    first_seq: int
    last_seq: int
    t_first_ns: int
    t_last_ns: int


@dataclass
class Workload:
    """A seeded stream of batches plus the ledger of what each seq did."""

    vdisks: list[V]
    batches: list[tuple[Meta, list[Record]]] = field(default_factory=list)
    ledger: list[tuple[int, int, int, int, int, bytes | None]] = field(default_factory=list)  # seq, vdisk, op, off, len, data
    unaligned: set[tuple[int, int]] = field(default_factory=set)  # (vdisk, block) ever written unaligned

    @classmethod
    def generate(cls, seed: int, nbatches: int = 60, vdisks: list[V] | None = None,
                 windows: bool = True, refs: bool = True, ref_window: int | None = None) -> "Workload":
        """``ref_window``: references pick among the last N blocks stored (the
        card's dedup horizon; None: any block stored so far)."""
        rng = random.Random(seed)
        w = cls(vdisks or [V(11, "alpha", 64 * BS), V(12, "beta", 48 * BS + 2048)])
        seq, bid = 0, 0
        held: list[bytes] = []  # inline blocks written so far (candidates for references)
        for _ in range(nbatches):
            bid += 1
            recs = []
            for _ in range(rng.randint(1, 6)):
                seq += rng.choice([1, 1, 1, 1, 2])  # merged writes leave seq gaps
                v = rng.choice(w.vdisks)
                nblocks = v.size // BS
                kind = rng.random()
                t = T0 + seq * 10**6
                if kind < 0.55:
                    n = rng.randint(1, 8)
                    b0 = rng.randrange(max(1, nblocks - n + 1))
                    n = min(n, nblocks - b0)
                    blocks = [sd_block(v.id, b, seq) for b in range(b0, b0 + n)]
                    data = b"".join(blocks)
                    rrefs: tuple = ()
                    if refs and held and rng.random() < 0.3:
                        i = rng.randrange(n)
                        reused = rng.choice(held[-ref_window:] if ref_window else held)
                        blocks[i] = reused
                        data = b"".join(blocks)
                        rrefs = ((i, fingerprint(reused)),)
                    inline = b"".join(b for i, b in enumerate(blocks) if not rrefs or i != rrefs[0][0])
                    held.extend(b for i, b in enumerate(blocks) if not rrefs or i != rrefs[0][0])
                    recs.append(Record(seq, seq, v.id, Op.WRITE, 0, b0 * BS, n * BS, t, inline, rrefs))
                    w.ledger.append((seq, v.id, Op.WRITE, b0 * BS, n * BS, data))
                elif kind < 0.7:  # unaligned (512-byte sectors), possibly across a block boundary
                    off = rng.randrange(v.size // 512 - 1) * 512
                    ln = min(rng.choice([512, 1024, 3584, 4608, 6144]), v.size - off)
                    data = rng.randbytes(ln)
                    recs.append(Record(seq, seq, v.id, Op.WRITE, 0, off, ln, t, data))
                    w.ledger.append((seq, v.id, Op.WRITE, off, ln, data))
                    w.unaligned.update((v.id, b) for b in range(off // BS, (off + ln - 1) // BS + 1))
                elif kind < 0.93:
                    op = Op.ZERO if kind < 0.82 else Op.TRIM
                    off = rng.randrange(v.size // 512) * 512
                    ln = min(rng.randint(1, 24) * 512, v.size - off)
                    recs.append(Record(seq, seq, v.id, op, 0, off, ln, t))
                    w.ledger.append((seq, v.id, op, off, ln, None))
                    w.unaligned.update((v.id, b) for b in (off // BS, (off + ln - 1) // BS))  # partly zeroed
                else:
                    recs.append(Record(seq, seq, v.id, Op.BARRIER, 1, 0, 0, t))
                    w.ledger.append((seq, v.id, Op.BARRIER, 0, 0, None))
            if windows and rng.random() < 0.15:  # the batch ends inside a merge window
                last = recs[-1]
                recs[-1] = Record(last.seq, last.io_id, last.vdisk_id, last.op, last.flags | RFLAG_IN_WINDOW,
                                  last.offset, last.length, last.time_ns, last.data, last.refs)
            last_seq = recs[-1].seq + rng.choice([0, 0, 0, 1])  # a commit may cover seqs after its last record
            seq = last_seq
            w.batches.append((Meta(bid, recs[0].seq, last_seq, recs[0].time_ns, T0 + last_seq * 10**6), recs))
        return w

    def write_journal(self, d: Path, *, segment_size: int = 64 * 1024, upto_batch: int | None = None,
                      start_batch: int = 0) -> None:
        with Journal.open(d, segment_size=segment_size) as j:
            for meta, recs in self.batches[start_batch:upto_batch]:
                assert j.append_batch(meta, recs).applied

    def expected_pits(self) -> list[Pit]:
        return [Pit(m.last_seq, m.t_last_ns, m.batch_id, not (recs[-1].flags & RFLAG_IN_WINDOW))
                for m, recs in self.batches]

    def goldens(self):
        """(seq, {vdisk id: image}) at every batch boundary, replaying the ledger (D3)."""
        imgs = {v.id: bytearray(v.size) for v in self.vdisks}
        i = 0
        for meta, _ in self.batches:
            while i < len(self.ledger) and self.ledger[i][0] <= meta.last_seq:
                _, vid, op, off, ln, data = self.ledger[i]
                if op == Op.WRITE:
                    imgs[vid][off : off + ln] = data
                elif op in (Op.ZERO, Op.TRIM):
                    imgs[vid][off : off + ln] = bytes(ln)
                i += 1
            yield meta.last_seq, imgs

    def written_blocks(self, upto: int) -> dict[int, set[int]]:
        out: dict[int, set[int]] = {v.id: set() for v in self.vdisks}
        for seq, vid, op, off, ln, _ in self.ledger:
            if seq <= upto and op != Op.BARRIER:
                out[vid].update(range(off // BS, (off + ln - 1) // BS + 1))
        return out


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


# -- command functions (the lead wires them into the CLI) ---------------------------------------------


@pytest.fixture
def cli_data(tmp_path: Path):
    """A data directory with two vdisks in CG cg1 and a journal for them."""
    from nicsplit.testing.datadir import init_data
    from nicsplit.testing.procs import run_cli

    data = init_data(tmp_path / "data")
    run_cli(data, "vdisk", "create", "alpha", "--size", "256K")
    run_cli(data, "vdisk", "create", "beta", "--size", "192K")
    run_cli(data, "cg", "create", "cg1")
    run_cli(data, "cg", "add", "cg1", "alpha")
    run_cli(data, "cg", "add", "cg1", "beta")
    from nicsplit.host.datastore import Datastore

    vds = {v.name: v for v in Datastore.open(data / "datastore").list_vdisks()}
    w = Workload.generate(7, nbatches=20, vdisks=[vds["alpha"], vds["beta"]])
    w.write_journal(data / "appliance" / "journal" / "cg1")
    return data, w, vds


def _parser():
    from nicsplit.cli.pit import add_parsers

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data", default=argparse.SUPPRESS)
    p = argparse.ArgumentParser(prog="nicsplit", parents=[common])
    add_parsers(p.add_subparsers(dest="command", required=True), common)
    return p


def _run(data: Path, *argv: str) -> int:
    args = _parser().parse_args(["--data", str(data), *argv])
    return args.func(args)


def test_cli_pits_bookmark_restore(cli_data, capsys, tmp_path: Path):
    from nicsplit.cli.common import USER_ERRORS as CliError  # every one-line error main() maps

    data, w, vds = cli_data
    assert _run(data, "pits", "cg1", "--json", "--all") == 0
    pits = json.loads(capsys.readouterr().out)["pits"]
    exp = w.expected_pits()
    assert [(p["seq"], p["consistent"], p["bookmarks"]) for p in pits] == [(p.seq, p.consistent, []) for p in exp]
    assert pits[0]["time"] == pytest.approx(exp[0].time_ns / 1e9)
    # Without --all, retention's thinning: the workload's PITs are days old and
    # all in one clock hour, so only the newest is offered (it is still there
    # until the next trim).
    assert _run(data, "pits", "cg1", "--json") == 0
    assert [p["seq"] for p in json.loads(capsys.readouterr().out)["pits"]] == [exp[-1].seq]

    good = [p for p in exp if p.consistent]
    mid = good[len(good) // 2]
    assert _run(data, "bookmark", "cg1", "mid", "--seq", str(mid.seq), "--json", "--lock") == 0
    assert json.loads(capsys.readouterr().out) == {"name": "mid", "seq": mid.seq, "time": mid.time_ns / 1e9,
                                                   "locked": True}
    assert _run(data, "bookmark", "cg1", "last", "--json") == 0
    assert json.loads(capsys.readouterr().out)["seq"] == good[-1].seq
    _run(data, "pits", "cg1", "--json")
    marks = {p["seq"]: p["bookmarks"] for p in json.loads(capsys.readouterr().out)["pits"] if p["bookmarks"]}
    assert mid.seq != good[-1].seq and marks == {mid.seq: ["mid"], good[-1].seq: ["last"]}
    _run(data, "pits", "cg1")
    assert "[mid]" in capsys.readouterr().out

    goldens = {s: {k: bytes(v) for k, v in g.items()} for s, g in w.goldens()}
    out = tmp_path / "alpha.raw"
    assert _run(data, "restore", "alpha", "--bookmark", "mid", "--to", str(out), "--json") == 0
    res = json.loads(capsys.readouterr().out)
    assert (res["seq"], res["vdisk"], res["format"]) == (mid.seq, "alpha", "raw")
    assert out.read_bytes() == goldens[mid.seq][vds["alpha"].id]
    assert not list(tmp_path.glob("*.partial"))
    _run(data, "restore", "beta", "--latest", "--to", str(out))
    assert out.read_bytes() == goldens[good[-1].seq][vds["beta"].id]
    _run(data, "restore", "beta", "--seq", str(good[0].seq), "--to", str(out))
    assert out.read_bytes() == goldens[good[0].seq][vds["beta"].id]
    _run(data, "restore", "alpha", "--at", f"{(mid.time_ns + 500_000) / 1e9:.6f}", "--to", str(out))  # PITs are >= 1 ms apart
    assert out.read_bytes() == goldens[mid.seq][vds["alpha"].id]

    errors = [
        (("pits", "nope"), "unknown consistency group 'nope'"),
        (("bookmark", "cg1", "mid"), "already exists"),
        (("bookmark", "cg1", "x", "--seq", str(exp[-1].seq + 5)), "no point in time at seq"),
        (("restore", "gamma", "--latest", "--to", str(out)), "no vdisk 'gamma'"),
        (("restore", "alpha", "--bookmark", "zz", "--to", str(out)), "unknown bookmark 'zz'"),
        (("restore", "alpha", "--seq", str(exp[-1].seq + 5), "--to", str(out)), "no point in time at seq"),
        (("restore", "alpha", "--at", "1000", "--to", str(out)), "before the oldest point in time"),
        (("restore", "alpha", "--at", "yesterday-ish", "--to", str(out)), "bad time"),
        (("restore", "alpha", "--latest", "--to", str(tmp_path)), "is a directory"),
    ]
    bad = [p for p in exp if not p.consistent]
    if bad:
        errors.append((("restore", "alpha", "--seq", str(bad[0].seq), "--to", str(out)), "inside a merge window"))
    for argv, msg in errors:
        with pytest.raises(CliError, match=msg) as ei:
            _run(data, *argv)
        assert "\n" not in str(ei.value)


def test_cli_restore_qcow2(cli_data, capsys, tmp_path: Path):
    import subprocess

    data, w, vds = cli_data
    out = tmp_path / "alpha.qcow2"
    _run(data, "restore", "alpha", "--latest", "--to", str(out), "--format", "qcow2", "--json")
    assert json.loads(capsys.readouterr().out)["format"] == "qcow2"
    raw = tmp_path / "alpha.raw"
    _run(data, "restore", "alpha", "--latest", "--to", str(raw))
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(out)], capture_output=True,
                                     text=True, check=True).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == vds["alpha"].size
    subprocess.run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", str(out), str(raw)], check=True)


def test_parse_time():
    from nicsplit.recovery.select import parse_time

    now = 1_700_000_000 * 10**9
    assert parse_time("now", now) == now
    assert parse_time("-90s", now) == now - 90 * 10**9
    assert parse_time("-2h", now) == now - 7200 * 10**9
    assert parse_time("1700000000.5", now) == 1_700_000_000_500_000_000
    assert parse_time("2023-11-14T22:13:20+00:00", now) == now
