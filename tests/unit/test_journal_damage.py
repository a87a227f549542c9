"""A damaged journal on the read side (docs/recovery.md §9): the scanner
resynchronises at the next valid COMMIT and goes on; every PIT before the
damage is usable and byte-exact (its image equals the ledger's golden image,
TESTING.md D1/D3), every PIT from the first damaged seq on is listed as
unusable, and the commands refuse those with one line naming the damaged
segment and the lost seqs.  Clear and sealed (at-rest encrypted) journals."""

from __future__ import annotations

import json
import random
import struct
import subprocess
from pathlib import Path

import pytest

from nicsplit.testing.workload import Workload, golden_at

from nicsplit.storage import atrest
from nicsplit.journal.writer import Journal, JournalCorrupt
from nicsplit.recovery.pits import Commit, JournalScanner, Pit, PitIndex, RecordHead, UnusablePit, known_damage
from nicsplit.recovery.replica import BlockIndex, Distributor, PitReader
from nicsplit.core.records import Op
from nicsplit.testing.procs import run_cli
from nicsplit.wire.frames import RECORD_HEAD_SIZE

MODES = ["record-data", "record-head", "entry-size", "commit", "segment-header"]


def journal_layout(jd: Path) -> tuple[list[Commit], list[RecordHead]]:
    commits, heads = [], []
    for c, recs in JournalScanner(jd).scan():
        commits.append(c)
        heads.extend(recs)
    return commits, heads


def corrupt(jd: Path, mode: str, rng: random.Random) -> tuple[int, int, Commit | None]:
    """Flip one byte of a seeded entry (or header) in a middle segment;
    returns (segment, offset of the damaged entry, the COMMIT hit if any)."""
    commits, heads = journal_layout(jd)
    segs = sorted(int(p.stem) for p in jd.glob("*.seg"))
    middle = segs[len(segs) // 3 : 2 * len(segs) // 3]
    rng.shuffle(middle)
    for s in middle:
        path = jd / f"{s:08d}.seg"
        raw = bytearray(path.read_bytes())
        hit = None
        if mode == "segment-header":
            at, where = 10, 0  # inside the segment number: the header CRC fails
        elif mode == "commit":
            cs = [c for c in commits if c.segment == s]
            if not cs:
                continue
            hit = rng.choice(cs)
            at, where = hit.pos + 12 + rng.randrange(44), hit.pos
        else:
            hs = [h for h in heads if h.segment == s and (mode != "record-data" or h.op == Op.WRITE)]
            if not hs:
                continue
            h = rng.choice(hs)
            esize = struct.unpack_from(">I", raw, h.pos)[0]
            where = h.pos
            if mode == "record-data":
                at = h.pos + 12 + RECORD_HEAD_SIZE + rng.randrange(esize - RECORD_HEAD_SIZE)
            elif mode == "record-head":
                at = h.pos + 12 + rng.randrange(RECORD_HEAD_SIZE)
            else:  # entry-size: the size now runs far past the end of the segment
                at = h.pos + 1
                assert raw[at] & 0x80 == 0
        raw[at] ^= 0x80
        path.write_bytes(raw)
        return s, where, hit
    raise AssertionError(f"no middle segment has an entry for mode {mode}")


def expected(w: Workload, jd_commits: list[Commit], bad: tuple[int, int], hit: Commit | None):
    """(PIT list, first damaged seq, the COMMIT the scanner resynchronises at)."""
    before = [c for c in jd_commits if (c.segment, c.pos) < bad]
    first = (before[-1].last_seq if before else 0) + 1
    resync = [c for c in jd_commits if (c.segment, c.pos) > bad][0]
    pits = [Pit(p.seq, p.time_ns, p.batch_id, p.consistent and p.seq != resync.last_seq, p.seq < first)
            for p in w.expected_pits() if hit is None or p.seq != hit.last_seq]
    return pits, first, resync


def make_journal(jd: Path, seed: int, sealed: bool, nbatches: int = 60, vdisks=None) -> Workload:
    if sealed:
        atrest.ensure(atrest.keyring_path(jd.parent.parent.parent), True)
    w = Workload.generate(seed, nbatches=nbatches, vdisks=vdisks)
    w.write_journal(jd, segment_size=16 << 10)
    assert len(list(jd.glob("*.seg"))) >= 6
    return w


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


# -- the commands --------------------------------------------------------------------------------


@pytest.fixture
def damaged_data(tmp_path: Path, seed: int):
    """A data directory (two vdisks in CG cg1), a sealed journal of a seeded
    workload, one record in a middle segment damaged."""
    from nicsplit.host.datastore import Datastore
    from nicsplit.testing.datadir import init_data

    data = init_data(tmp_path / "data")
    run_cli(data, "cg", "create", "cg1")
    run_cli(data, "vdisk", "create", "alpha", "--size", "256K", "--cg", "cg1")
    run_cli(data, "vdisk", "create", "beta", "--size", "192K", "--cg", "cg1")
    vds = {v.name: v for v in Datastore.open(data / "datastore").list_vdisks()}
    jd = data / "appliance" / "journal" / "cg1"
    w = make_journal(jd, seed, True, nbatches=40, vdisks=[vds["alpha"], vds["beta"]])
    commits, _ = journal_layout(jd)
    seg, off, hit = corrupt(jd, "record-data", random.Random(seed))
    pits, first, resync = expected(w, commits, (seg, off), hit)
    return data, w, vds, pits, first, resync, seg


def _one_line_error(p: subprocess.CompletedProcess, *parts: str) -> str:
    err = p.stderr.strip()
    assert p.returncode == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in err, (part, err)
    return err


def test_cli_on_a_damaged_journal(damaged_data, tmp_path: Path):
    data, w, vds, pits, first, resync, seg = damaged_data
    lost = f"seqs {first}..{resync.last_seq}"
    name = f"{seg:08d}.seg"

    out = json.loads(run_cli(data, "pits", "cg1", "--json", "--all").stdout)
    assert [(p["seq"], p["usable"]) for p in out["pits"]] == [(p.seq, p.usable) for p in pits]
    assert all(name in p["reason"] and lost in p["reason"] for p in out["pits"] if not p["usable"])
    assert all("reason" not in p for p in out["pits"] if p["usable"])
    assert [(d["segment"], d["first_seq"], d["last_seq"]) for d in out["damage"]] == [(name, first, resync.last_seq)]
    text = run_cli(data, "pits", "cg1", "--all")
    assert sum("UNUSABLE" in line for line in text.stdout.splitlines()) == sum(not p.usable for p in pits)
    assert name in text.stderr

    good = [p for p in pits if p.usable and p.consistent][-1]
    bad = [p for p in pits if not p.usable]
    f = tmp_path / "alpha.raw"
    run_cli(data, "restore", "alpha", "--seq", str(good.seq), "--to", str(f))
    assert f.read_bytes() == golden_at(w, good.seq)[vds["alpha"].id]
    for argv in (("restore", "alpha", "--seq", str(bad[-1].seq), "--to", str(f)),
                 ("restore", "beta", "--latest", "--to", str(f)),
                 ("image", "export", "cg1", "--seq", str(bad[0].seq))):
        err = _one_line_error(run_cli(data, *argv, check=False), name, lost)
        assert f"the newest usable point in time is seq {good.seq}" in err
    assert json.loads(run_cli(data, "image", "list", "--json").stdout)["images"] == []

    # an image of a usable PIT serves the exact bytes
    img = json.loads(run_cli(data, "image", "export", "cg1", "--seq", str(good.seq), "--json").stdout)
    try:
        got = subprocess.run(["nbdcopy", img["exports"]["beta"], "-"], capture_output=True, check=True).stdout
        assert got == golden_at(w, good.seq)[vds["beta"].id]
    finally:
        run_cli(data, "image", "close", img["id"])

    # journal dump lists what precedes the damage, then fails with the damage
    p = run_cli(data, "journal", "dump", "cg1", "--json", check=False)
    _one_line_error(p, name)
    assert [r["seq"] for r in json.loads(p.stdout)["records"]] == [s for s, *_ in w.ledger if s < first]
    _one_line_error(run_cli(data, "journal", "replay", "cg1", "--out", str(tmp_path / "r"), check=False),
                    name, f"replay can reach seq {first - 1} at most")
    run_cli(data, "journal", "replay", "cg1", "--out", str(tmp_path / "r"), "--upto", str(first - 1))
    assert (tmp_path / "r" / "alpha.raw").read_bytes() == golden_at(w, first - 1)[vds["alpha"].id]


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
