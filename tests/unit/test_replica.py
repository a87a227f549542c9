"""Distribution to replica images with undo data (RecoverPoint do/undo), its
crash recovery, and the block index's build cost on a large journal.

The oracle is the ledger of the seeded workload of test_pits (TESTING.md D1):
after any number of steps the replica equals the ledger prefix up to
``applied_seq``; rolled back with the undo log to any earlier PIT it equals
that PIT's golden image (D3), byte for byte.
"""

from __future__ import annotations

import os
import random
import resource
import time
from pathlib import Path

import pytest

from nicsplit.testing.workload import BS, T0, Meta, V, Workload, golden_at

from nicsplit.storage import atrest
from nicsplit.journal.writer import Journal
from nicsplit.recovery.blockindex import BlockIndex, ReplicaError
from nicsplit.recovery.reader import PitReader
from nicsplit.recovery.replica import Distributor, undo_key_usage
from nicsplit.storage.image import open_image
from nicsplit.storage.sealing import ENTRY_SIZE, HEADER_SIZE, SealedError
from nicsplit.core.layout import vdisk_file
from nicsplit.core.records import Op
from nicsplit.wire.frames import Record


class Crash(Exception):
    """The process 'dies' at a failpoint."""


def images(d: Distributor, w: Workload) -> dict[int, bytes]:
    return {v.id: d.read(v.id, 0, v.size) for v in w.vdisks}


def assert_replica_at(d: Distributor, w: Workload, seq: int) -> None:
    got, want = images(d, w), golden_at(w, seq)
    for v in w.vdisks:
        assert got[v.id] == want[v.id], f"replica of {v.name} differs from the ledger prefix up to seq {seq}"


def _make(tmp_path: Path, seed: int, sealed: bool) -> tuple[Workload, Path, Path]:
    """A journaled workload; ``sealed``: with an at-rest keyring beside it (as
    `DATA/appliance/at-rest.key`), so journal, replica images and undo entries
    are all sealed, as the appliance's default configuration has them."""
    if sealed:
        atrest.Keyring.create(tmp_path / atrest.KEYRING_NAME)
    w = Workload.generate(seed, nbatches=40)
    jd = tmp_path / "journal" / "cg1"
    w.write_journal(jd)
    return w, jd, tmp_path / "replicas" / "cg1"


@pytest.fixture(params=["plain", "sealed"])
def setup(request, tmp_path: Path, seed: int):
    return _make(tmp_path, seed, request.param == "sealed")


def _sealed(rd: Path) -> bool:
    return (rd.parent.parent / atrest.KEYRING_NAME).exists()


def test_distributor_applies_in_seq_order(setup, rng: random.Random):
    w, jd, rd = setup
    with Distributor(jd, rd, w.vdisks, index=BlockIndex(jd)) as d:
        assert d.applied_seq == 0 and d.pending() > 0
        assert_replica_at(d, w, 0)
        while d.step(rng.randint(1, 9)):
            assert_replica_at(d, w, d.applied_seq)
        last = w.batches[-1][0].last_seq  # the newest PIT, even when its batch ends in barriers or gaps
        assert d.applied_seq == last and d.pending() == 0
        st = d.statistics()
        assert st.undo_entries == st.records_applied == sum(1 for e in w.ledger if e[2] != Op.BARRIER)
    imgs = [vdisk_file(rd, v.id, ".img").name for v in w.vdisks]  # keyed by id (issue 11 item 4)
    tags = [f"{i}.tags" for i in imgs] if _sealed(rd) else []
    assert sorted(p.name for p in rd.iterdir()) == sorted([*imgs, "state.json", "undo.log", *tags])
    assert vdisk_file(rd, w.vdisks[0].id, ".img").stat().st_size == w.vdisks[0].size
    # the replica equals what the PIT reader serves at the latest PIT
    with PitReader(jd, w.vdisks, w.batches[-1][0].last_seq) as r, Distributor(jd, rd, w.vdisks) as d:
        for v in w.vdisks:
            assert r.pread(v.id, 0, v.size) == d.read(v.id, 0, v.size)


def test_undo_rolls_back_to_every_earlier_pit(setup):
    w, jd, rd = setup
    with Distributor(jd, rd, w.vdisks) as d:
        d.catch_up(50)
        pits = [m.last_seq for m, _ in w.batches]
        for seq in reversed(pits[:-1]):
            d.undo_to(seq)
            assert d.applied_seq == seq
            assert_replica_at(d, w, seq)
        d.undo_to(0)
        assert_replica_at(d, w, 0)
        assert d.statistics().undo_entries == 0 and (rd / "undo.log").stat().st_size == 0
        with pytest.raises(ReplicaError, match="the replica is at seq 0"):
            d.undo_to(5)
        # distribution goes on forward from the rolled-back point
        d.catch_up(13)
        assert_replica_at(d, w, pits[-1])
        mid = pits[len(pits) // 2]
        d.undo_to(mid)
    with Distributor(jd, rd, w.vdisks) as d:  # persisted across reopen
        assert d.applied_seq == mid
        assert_replica_at(d, w, mid)


FAILPOINTS = ["undo-written", "undo-synced", "image-written", "images-synced", "state-persisted"]


@pytest.mark.parametrize("where", FAILPOINTS)
def test_crash_in_a_step_recovers_idempotently(setup, where: str, rng: random.Random):
    w, jd, rd = setup
    with Distributor(jd, rd, w.vdisks) as d:
        d.step(10)
    for attempt in range(4):
        hits = {"n": rng.randint(1, 3)}

        def fp(name: str) -> None:
            if name == where:
                hits["n"] -= 1
                if hits["n"] == 0:
                    raise Crash(name)

        d = Distributor(jd, rd, w.vdisks, failpoint=fp)
        before = d.applied_seq
        try:
            with pytest.raises(Crash):
                while d.step(rng.randint(1, 8)):
                    pass
        finally:
            d.close()  # the process is gone; what reached the files stays
        with Distributor(jd, rd, w.vdisks) as d:
            # recovery laid back the interrupted step (or it had completed)
            assert d.applied_seq >= before
            assert_replica_at(d, w, d.applied_seq)
            assert os.path.getsize(rd / "undo.log") == d.statistics().undo_bytes
    with Distributor(jd, rd, w.vdisks) as d:
        d.catch_up(7)
        assert_replica_at(d, w, w.batches[-1][1][-1].seq)
        # and the undo log is still exact after all those crashes
        first = w.batches[3][0].last_seq
        d.undo_to(first)
        assert_replica_at(d, w, first)


def test_crash_between_image_write_and_state_persist_then_reapply(setup):
    """The case of the brief: images written and synced, applied_seq not
    persisted.  Reopen lays the step back; re-applying it is harmless."""
    w, jd, rd = setup

    def fp(name: str) -> None:
        if name == "images-synced":
            raise Crash(name)

    with Distributor(jd, rd, w.vdisks) as d:
        d.step(5)
        at = d.applied_seq
    d = Distributor(jd, rd, w.vdisks, failpoint=fp)
    with pytest.raises(Crash):
        d.step(20)
    d.close()
    with Distributor(jd, rd, w.vdisks) as d:
        assert d.applied_seq == at and d.statistics().recovered_entries > 0
        assert_replica_at(d, w, at)
        d.step(20)
        assert_replica_at(d, w, d.applied_seq)
        d.undo_to(at)
        assert_replica_at(d, w, at)


def test_torn_undo_tail_is_cut(setup):
    w, jd, rd = setup
    with Distributor(jd, rd, w.vdisks) as d:
        d.step(12)
        at, size = d.applied_seq, d.statistics().undo_bytes
    with open(rd / "undo.log", "ab") as f:
        f.write(b"NSUN" + os.urandom(30))
    with Distributor(jd, rd, w.vdisks) as d:
        assert d.applied_seq == at and os.path.getsize(rd / "undo.log") == size
        assert_replica_at(d, w, at)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_crash_during_rollback_is_finished_at_open(setup, k: int):
    w, jd, rd = setup
    target = w.batches[5][0].last_seq
    hits = {"n": k}

    def fp(name: str) -> None:
        if name == "undo-entry-applied":
            hits["n"] -= 1
            if hits["n"] == 0:
                raise Crash(name)

    with Distributor(jd, rd, w.vdisks) as d:
        d.catch_up()
    d = Distributor(jd, rd, w.vdisks, failpoint=fp)
    with pytest.raises(Crash):
        d.undo_to(target)
    d.close()
    with Distributor(jd, rd, w.vdisks) as d:
        assert d.applied_seq == target
        assert_replica_at(d, w, target)


def test_sealed_replica_holds_no_plaintext_and_rekeys_after_rotation(setup):
    """At rest, neither images, sidecars nor undo entries hold written bytes
    in clear (the plain variant shows the search would find them); after a
    rotation `rekey` moves every block and undo entry to the new key."""
    w, jd, rd = setup
    with Distributor(jd, rd, w.vdisks) as d:
        d.catch_up(9)
        pits = [m.last_seq for m, _ in w.batches]
        d.undo_to(pits[len(pits) // 2])  # undo entries laid back: the replica still reads right
        assert_replica_at(d, w, d.applied_seq)
        d.catch_up(9)
    blob = b"".join(p.read_bytes() for p in sorted(rd.iterdir()))
    probes = [data[:32] for _, _, op, _, ln, data in w.ledger if op == Op.WRITE and ln >= 64 and any(data[:32])]
    found = sum(1 for p in probes[-50:] if p in blob)
    if not _sealed(rd):
        assert found > 0  # the search works
        return
    assert found == 0, f"{found} written blocks found in clear under {rd}"
    new, old = atrest.rotate(rd.parent.parent / atrest.KEYRING_NAME)
    with Distributor(jd, rd, w.vdisks) as d:
        use = d.key_usage()
        assert set(use["image_blocks"]) == {old} and set(use["undo_entries"]) == {old}, use
        blocks, entries = d.rekey()
        assert blocks == use["image_blocks"][old] and entries == use["undo_entries"][old]
        assert d.key_usage() == {"image_blocks": {new: blocks}, "undo_entries": {new: entries}}
        assert_replica_at(d, w, d.applied_seq)
        d.undo_to(pits[3])  # the re-sealed undo log still rolls back exactly
        assert_replica_at(d, w, pits[3])
    # Rolling back to pits[3] may consume every undo entry (the log can be
    # empty); what must hold is that none is left under the old key.
    assert set(undo_key_usage(rd / "undo.log")) <= {new}
    atrest.retire(rd.parent.parent / atrest.KEYRING_NAME, old, {})  # nothing needs the old key any more
    with Distributor(jd, rd, w.vdisks) as d:
        assert_replica_at(d, w, pits[3])


def test_sealed_block_torn_by_a_crash_mid_step_is_repaired_at_open(tmp_path: Path, seed: int):
    """A crash between a sealed block's data and its tag entry leaves the
    block unreadable; the step's undo pre-images cover whole blocks, so the
    recovery at open rewrites it and the replica is exact again."""
    w, jd, rd = _make(tmp_path, seed, sealed=True)
    with Distributor(jd, rd, w.vdisks) as d:
        d.step(6)
        at = d.applied_seq
    ix = BlockIndex(jd)
    first = ix.ordinal_upto(at) + 1
    # An unaligned write: its block is partly rewritten, the case that needs whole-block undo.
    o = next(o for o in range(first, len(ix.rec_seq))
             if ix.rec_op[o] == Op.WRITE and (ix.rec_off[o] % BS or ix.rec_len[o] % BS))
    hits = {"n": o - first + 1}  # crash right after the image write of record o

    def fp(name: str) -> None:
        if name == "image-written":
            hits["n"] -= 1
            if hits["n"] == 0:
                raise Crash(name)

    d = Distributor(jd, rd, w.vdisks, failpoint=fp, index=ix)
    with pytest.raises(Crash):
        d.step(o - first + 5)
    d.close()
    v = next(v for v in w.vdisks if v.id == ix.rec_vdisk[o])
    img_path = vdisk_file(rd, v.id, ".img")
    b = ix.rec_off[o] // BS if ix.rec_off[o] % BS else (ix.rec_off[o] + ix.rec_len[o]) // BS
    # Tear it: the entry of the block goes back to another write's (as if its pwrite never landed).
    with open(str(img_path) + ".tags", "r+b") as f:
        f.seek(HEADER_SIZE + ENTRY_SIZE * b + 4)
        f.write(os.urandom(12))
    with open_image(img_path, v.size, atrest.keyring_in(rd.parent.parent), writable=False) as img:
        with pytest.raises(SealedError, match="fails authentication"):
            img.pread(b * BS, BS)
    with Distributor(jd, rd, w.vdisks) as d:
        assert d.applied_seq == at and d.statistics().recovered_entries > 0
        assert_replica_at(d, w, at)
        d.catch_up(11)
        assert_replica_at(d, w, d.applied_seq)


def test_trim_undo_frees_the_prefix_and_keeps_later_pits(setup):
    """Retention's base makes undo entries of older records useless: the
    floor rises, the log's prefix becomes a hole (its space freed, even when
    a crash came between the persisted trim and the punch), later PITs still
    roll back exactly, and all of it survives a reopen."""
    w, jd, rd = setup
    pits = [m.last_seq for m, _ in w.batches]
    mid = pits[len(pits) // 2]

    def crash_at_punch(name: str) -> None:
        if name == "undo-trim-persisted":
            raise Crash(name)

    with Distributor(jd, rd, w.vdisks, failpoint=crash_at_punch) as d:
        d.catch_up(9)
        entries = d.statistics().undo_entries
        blocks = os.stat(rd / "undo.log").st_blocks
        with pytest.raises(Crash):
            d.trim_undo(mid)
    with Distributor(jd, rd, w.vdisks) as d:  # the trim was persisted; the open punches what it did not
        kept = d.statistics().undo_entries
        assert d.undo_floor == mid and 0 < kept < entries
        assert os.stat(rd / "undo.log").st_blocks < blocks
        sealed_entries = sum(undo_key_usage(rd / "undo.log").values())  # entries of zeros carry no key
        assert (0 < sealed_entries <= kept) if _sealed(rd) else sealed_entries == 0
        assert d.trim_undo(mid) == 0
        with pytest.raises(ReplicaError, match="undo data starts after"):
            d.undo_to(pits[len(pits) // 2 - 1])
        d.undo_to(pits[-3])
        assert_replica_at(d, w, pits[-3])
        d.undo_to(mid)
        assert_replica_at(d, w, mid)
        assert d.statistics().undo_entries == 0
        d.catch_up(5)
        assert_replica_at(d, w, pits[-1])
        n = d.trim_undo(pits[-2])
        assert n > 0 and d.undo_floor == pits[-2]
    with Distributor(jd, rd, w.vdisks) as d:
        assert d.undo_floor == pits[-2]
        d.undo_to(pits[-2])
        assert_replica_at(d, w, pits[-2])


def test_records_of_other_vdisks_are_skipped(setup):
    w, jd, rd = setup
    only = [w.vdisks[0]]
    with Distributor(jd, rd, only) as d:
        d.catch_up()
        assert d.statistics().records_skipped > 0
        assert d.read(only[0].id, 0, only[0].size) == golden_at(w, d.applied_seq)[only[0].id]


# -- the block index on a large journal ---------------------------------------------------------------


def _big_journal(jd: Path, total: int, vdisk: V, rec_size: int, rng: random.Random) -> int:
    """``total`` bytes of writes of ``rec_size`` at random aligned offsets of
    ``vdisk``, in batches of 4 MiB; returns the last seq."""
    pool = rng.randbytes(8 << 20)
    per_batch = (4 << 20) // rec_size
    nblocks = vdisk.size // rec_size
    seq = 0
    with Journal.open(jd) as j:
        for b in range(total // (4 << 20)):
            recs = []
            for _ in range(per_batch):
                seq += 1
                start = rng.randrange(len(pool) - rec_size)
                recs.append(Record(seq, seq, vdisk.id, Op.WRITE, 0, rng.randrange(nblocks) * rec_size, rec_size,
                                   T0 + seq * 1000, seq.to_bytes(8, "big") + pool[start + 8 : start + rec_size]))
            j.append_batch(Meta(b + 1, recs[0].seq, seq, recs[0].time_ns, recs[-1].time_ns), recs)
    return seq


def test_index_build_time_and_memory_256mib_journal(tmp_path: Path, seed: int):
    """Printed, not asserted (TESTING.md: tests never assert on speed)."""
    rng = random.Random(seed)
    v = V(1, "big", 1 << 30)
    jd = tmp_path / "j"
    t = time.perf_counter()
    last = _big_journal(jd, 256 << 20, v, BS, rng)
    t_write = time.perf_counter() - t
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    idx = BlockIndex(jd)
    t_build = time.perf_counter() - t
    st = idx.statistics()
    t = time.perf_counter()
    mid = idx.pits.list_pits()[len(idx.pits) // 2]
    r = PitReader(jd, [v], mid.seq, index=idx)
    t_ready = time.perf_counter() - t
    t = time.perf_counter()
    ext = r.extents(v.id, 0, 64 << 20)
    data = [r.pread(v.id, e.offset, e.length) for e in ext if e.kind == "data"]
    t_read = time.perf_counter() - t
    r.close()
    print(f"\n256 MiB journal ({last} records of 4 KiB on a 1 GiB vdisk, written in {t_write:.2f}s): "
          f"index built in {t_build:.3f}s, {st.memory_bytes / 2**20:.2f} MiB "
          f"({st.memory_bytes / st.records:.0f} B/record; {st.blocks} blocks, {st.multi_blocks} rewritten), "
          f"peak RSS {rss0 / 1024:.0f} MiB; reader ready in {t_ready * 1e3:.2f} ms; "
          f"first 64 MiB at a middle PIT read in {t_read:.2f}s ({sum(map(len, data)) >> 20} MiB of data)")
    assert st.records == last and st.pits == 64


@pytest.mark.parametrize("sealed", [False, True])
def test_a_step_moves_a_sequential_stream_in_runs(tmp_path: Path, sealed: bool, rng: random.Random):
    """Records that continue each other on one vdisk are read (pre-images)
    and written as one run each; an overlapping record, a zeroing in the
    middle and another vdisk cut runs but never reorder anything: the
    replica equals the writes applied in order, and undo returns to empty."""
    if sealed:
        atrest.Keyring.create(tmp_path / atrest.KEYRING_NAME)
    vds = [V(11, "alpha", 256 * BS), V(12, "beta", 64 * BS)]
    jd = tmp_path / "journal" / "cg1"
    recs, seq = [], 0

    def rec(vid: int, off: int, data: bytes | None, length: int = 0) -> None:
        nonlocal seq
        seq += 1
        if data is None:
            recs.append(Record(seq, seq, vid, Op.ZERO, 0, off, length, T0 + seq))
        else:
            recs.append(Record(seq, seq, vid, Op.WRITE, 0, off, len(data), T0 + seq, data))

    for i in range(40):  # a sequential stream of 4 KiB writes
        rec(11, i * BS, rng.randbytes(BS))
    rec(11, 10 * BS + 512, rng.randbytes(3 * BS))  # overlaps the stream, unaligned
    rec(11, 40 * BS, None, 8 * BS)  # zeroing continues the stream: cuts the run
    for i in range(48, 60):
        rec(11, i * BS, rng.randbytes(BS))
    rec(12, 0, rng.randbytes(2 * BS))  # another vdisk
    rec(11, 60 * BS, rng.randbytes(BS))
    with Journal.open(jd) as j:
        j.append_batch(Meta(1, 1, seq, T0 + 1, T0 + seq), recs)
    want = {v.id: bytearray(v.size) for v in vds}
    for r in recs:
        want[r.vdisk_id][r.offset : r.offset + r.length] = r.data if r.op == Op.WRITE else bytes(r.length)
    with Distributor(jd, tmp_path / "replicas" / "cg1", vds, index=BlockIndex(jd)) as d:
        writes: list[tuple[int, int]] = []
        reads: list[tuple[int, int]] = []
        for vid, img in d.images().items():
            ow, orr = img.pwrite, img.pread
            img.pwrite = lambda data, off, _o=ow, _v=vid: (writes.append((_v, len(data))), _o(data, off))[1]
            img.pread = lambda off, n, _o=orr, _v=vid: (reads.append((_v, n)), _o(off, n))[1]
        assert d.step(1000) == len(recs)
        assert reads == [(11, 60 * BS), (12, 2 * BS), (11, BS)], reads  # pre-images: one read per run
        assert {v.id: d.read(v.id, 0, v.size) for v in vds} == {k: bytes(b) for k, b in want.items()}
        # the 40-write stream as one; the overlap; (the zeroing); the 12 after it; beta; the last one
        assert writes == [(11, 40 * BS), (11, 3 * BS), (11, 12 * BS), (12, 2 * BS), (11, BS)], writes
        d.undo_to(0)
        assert all(d.read(v.id, 0, v.size) == bytes(v.size) for v in vds)
