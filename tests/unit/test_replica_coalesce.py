"""The coalesced distribution step (recovery/coalesce.py): steps whose
records all cover whole blocks read each touched block once, write only its
last content, and still keep one undo entry per record.

Oracle: a seeded workload of whole-block writes and zeroes that rewrite the
same few blocks many times within one step (plus, in some batches, an
unaligned write, which sends that step down the record-by-record path); the
replica after every step equals the straightforward replay of the ledger up
to ``applied_seq``, every earlier PIT comes back exactly through the undo
log, and a crash at any failpoint of a coalesced step is laid back at open.
The bulk block calls of the images are checked against pread/pwrite.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from nicsplit.core.records import Op
from nicsplit.journal.format import ENTRY, JournalCorrupt
from nicsplit.recovery.blockindex import BlockIndex
from nicsplit.recovery.coalesce import aligned
from nicsplit.recovery.replica import Distributor
from nicsplit.storage import atrest
from nicsplit.storage.image import open_image
from nicsplit.storage.sealing import ENTRY_SIZE, HEADER_SIZE, IOV_MAX, SealedError, pwritev_all
from nicsplit.testing.workload import BS, T0, Meta, V, Workload, golden_at
from nicsplit.wire.frames import RECORD_HEAD_SIZE, Record


class Crash(Exception):
    """The process 'dies' at a failpoint."""


def whole_block_workload(seed: int, nbatches: int = 30, unaligned: float = 0.02) -> Workload:
    """Batches of whole-block records over few hot blocks (so one step
    rewrites blocks often), on a vdisk whose size is a block multiple and
    one whose last block is short."""
    rng = random.Random(seed)
    w = Workload([V(21, "hot", 24 * BS), V(22, "short", 20 * BS + 1536)])
    seq = 0
    for bid in range(1, nbatches + 1):
        recs = []
        for _ in range(rng.randint(1, 12)):
            seq += 1
            v = rng.choice(w.vdisks)
            nb = -(-v.size // BS)
            t = T0 + seq * 10**6
            kind = rng.random()
            b0 = rng.randrange(nb)
            n = min(rng.choice([1, 1, 1, 2, 3, 5]), nb - b0)
            off, ln = b0 * BS, min(n * BS, v.size - b0 * BS)
            if kind < unaligned:  # a partial block: this batch's step goes record by record
                off = rng.randrange(v.size // 512 - 1) * 512 + 512 * rng.choice([0, 1])
                off = min(off, v.size - 512)
                ln = min(rng.choice([512, 1024, 5120]), v.size - off)
                data = rng.randbytes(ln)
                recs.append(Record(seq, seq, v.id, Op.WRITE, 0, off, ln, t, data))
                w.ledger.append((seq, v.id, Op.WRITE, off, ln, data))
            elif kind < 0.8:
                data = b"".join(rng.choice([rng.randbytes(BS), bytes(BS), bytes(BS // 2) + rng.randbytes(BS // 2)])
                                for _ in range(n))[:ln]
                recs.append(Record(seq, seq, v.id, Op.WRITE, 0, off, ln, t, data))
                w.ledger.append((seq, v.id, Op.WRITE, off, ln, data))
            else:
                op = Op.ZERO if kind < 0.9 else Op.TRIM
                recs.append(Record(seq, seq, v.id, op, 0, off, ln, t))
                w.ledger.append((seq, v.id, op, off, ln, None))
        w.batches.append((Meta(bid, recs[0].seq, seq, recs[0].time_ns, T0 + seq * 10**6), recs))
    return w


def _setup(tmp_path: Path, seed: int, sealed: bool, **kw) -> tuple[Workload, Path, Path]:
    if sealed:
        atrest.Keyring.create(tmp_path / atrest.KEYRING_NAME)
    w = whole_block_workload(seed, **kw)
    jd = tmp_path / "journal" / "cg1"
    w.write_journal(jd)
    return w, jd, tmp_path / "replicas" / "cg1"


def assert_at(d: Distributor, w: Workload, seq: int) -> None:
    want = golden_at(w, seq)
    for v in w.vdisks:
        assert d.read(v.id, 0, v.size) == want[v.id], f"replica of {v.name} differs from the ledger at seq {seq}"


@pytest.mark.parametrize("sealed", [False, True], ids=["plain", "sealed"])
def test_coalesced_steps_equal_the_ledger_and_undo_to_every_pit(tmp_path: Path, seed: int, sealed: bool):
    w, jd, rd = _setup(tmp_path, seed, sealed)
    rng = random.Random(seed)
    sizes = {v.id: v.size for v in w.vdisks}
    ix = BlockIndex(jd)
    whole_steps = 0
    with Distributor(jd, rd, w.vdisks, index=ix) as d:
        while True:
            first = ix.ordinal_upto(d.applied_seq) + 1
            n = rng.randint(2, 30)
            recs = range(first, min(first + n, len(ix.rec_seq)))
            whole_steps += all(aligned(ix.rec_off[o], ix.rec_len[o], sizes[ix.rec_vdisk[o]]) for o in recs) \
                and len({(ix.rec_vdisk[o], ix.rec_off[o]) for o in recs}) < len(recs)
            if not d.step(n):
                break
            assert_at(d, w, d.applied_seq)
        st = d.statistics()
        assert st.undo_entries == st.records_applied == len(w.ledger)  # one undo entry per record, coalesced or not
        # Undo: every PIT, including those inside a coalesced step (per record).
        seqs = sorted({s for s, *_ in w.ledger})
        for target in sorted(rng.sample(seqs, min(12, len(seqs))), reverse=True):
            d.undo_to(target)
            assert_at(d, w, target)
        d.undo_to(0)
        assert_at(d, w, 0)
        d.catch_up(64)  # forward again from the rolled-back replica: one big coalesced step at a time
        assert_at(d, w, w.batches[-1][0].last_seq)
    assert whole_steps > 0, "the workload never gave a coalesced step that rewrote a block"


@pytest.mark.parametrize("where", ["undo-written", "undo-synced", "image-written", "images-synced", "state-persisted"])
def test_crash_in_a_coalesced_step_is_laid_back(tmp_path: Path, seed: int, where: str):
    w, jd, rd = _setup(tmp_path, seed, True, unaligned=0.0)
    rng = random.Random(seed)
    with Distributor(jd, rd, w.vdisks) as d:
        d.step(5)
    for _ in range(3):
        hits = {"n": rng.randint(1, 3)}

        def fp(name: str) -> None:
            if name == where:
                hits["n"] -= 1
                if hits["n"] == 0:
                    raise Crash(name)

        d = Distributor(jd, rd, w.vdisks, failpoint=fp)
        try:
            with pytest.raises(Crash):
                while d.step(rng.randint(8, 30)):
                    pass
        finally:
            d.close()
        with Distributor(jd, rd, w.vdisks) as d:
            assert_at(d, w, d.applied_seq)  # laid back to the last persisted PIT, or the step had completed
    with Distributor(jd, rd, w.vdisks) as d:
        d.catch_up(50)
        assert_at(d, w, w.batches[-1][0].last_seq)


@pytest.mark.parametrize("sealed", [False, True], ids=["plain", "sealed"])
def test_bulk_block_calls_match_pread_and_pwrite(tmp_path: Path, rng: random.Random, sealed: bool):
    kr = atrest.Keyring.create(tmp_path / atrest.KEYRING_NAME) if sealed else None
    size = 300 * BS + 1000  # a short last block
    nb = -(-size // BS)
    model = bytearray(size)
    with open_image(tmp_path / "a.img", size, kr, writable=True, create=True) as img:
        for _ in range(30):
            blocks = sorted(rng.sample(range(nb), rng.randint(1, 40)))
            got = img.read_blocks(blocks)
            for b, g in zip(blocks, got):
                n = min(BS, size - b * BS)
                assert (bytes(n) if g is None else bytes(g)) == model[b * BS : b * BS + n]
            items = []
            for b in blocks:
                n = min(BS, size - b * BS)
                c = None if rng.random() < 0.2 else rng.randbytes(n)
                items.append((b, c))
                model[b * BS : b * BS + n] = bytes(n) if c is None else c
            calls = []
            img.write_blocks(items, lambda: calls.append(1))
            assert 1 <= len(calls) <= len(items)
            assert img.pread(0, size) == model
        with pytest.raises(ValueError, match="block 3 given 5 bytes"):
            img.write_blocks([(3, b"short")])
    if sealed:  # a torn block is not silently read as zeros or garbage
        b = next(b for b in range(nb - 1) if any(model[b * BS : (b + 1) * BS]))
        with open(tmp_path / "a.img.tags", "r+b") as f:
            f.seek(HEADER_SIZE + ENTRY_SIZE * b + 4)
            f.write(os.urandom(12))
        with open_image(tmp_path / "a.img", size, kr, writable=True) as img:
            with pytest.raises(SealedError, match="fails authentication"):
                img.read_blocks([b])


@pytest.mark.parametrize("sealed", [False, True], ids=["plain", "sealed"])
def test_a_record_altered_after_indexing_stops_the_step(tmp_path: Path, seed: int, sealed: bool):
    """The lean payload read (`format.read_payload_at`) checks what the
    Record path checked: the entry CRC in clear, GCM authentication sealed."""
    w, jd, rd = _setup(tmp_path, seed, sealed, unaligned=0.0)
    ix = BlockIndex(jd)
    o = next(o for o in range(len(ix.rec_seq)) if ix.rec_op[o] == Op.WRITE)
    seg = jd / f"{ix.rec_seg[o]:08d}.seg"
    raw = bytearray(seg.read_bytes())
    raw[ix.rec_pos[o] + ENTRY.size + RECORD_HEAD_SIZE + 40] ^= 0x10  # inside the payload
    seg.write_bytes(raw)
    with Distributor(jd, rd, w.vdisks, index=ix) as d:
        with pytest.raises(JournalCorrupt, match="fails authentication" if sealed else "fails its check"):
            d.catch_up(64)
        assert d.applied_seq < ix.rec_seq[o]
        assert_at(d, w, d.applied_seq)


def test_a_step_keeping_more_blocks_than_one_pwritev_takes(tmp_path: Path, seed: int):
    """An overwrite step's UNDO_IMAGE entries are written as iovecs (pieces
    of the entry buffer between kept ciphertexts): more than IOV_MAX of them
    go in several pwritev calls, and rolling the step back is exact."""
    atrest.Keyring.create(tmp_path / atrest.KEYRING_NAME)
    rng = random.Random(seed)
    nb = IOV_MAX // 2 + 100  # 2 iovecs per kept block: over IOV_MAX in one step
    w = Workload([V(31, "wide", nb * BS)])
    seq = 0
    for bid in (1, 2):
        recs = []
        for b in rng.sample(range(nb), nb):  # every block, in a random order
            seq += 1
            data = rng.randbytes(BS)
            recs.append(Record(seq, seq, 31, Op.WRITE, 0, b * BS, BS, T0 + seq, data))
            w.ledger.append((seq, 31, Op.WRITE, b * BS, BS, data))
        w.batches.append((Meta(bid, recs[0].seq, seq, T0, T0 + seq), recs))
    jd = tmp_path / "journal" / "cg1"
    w.write_journal(jd)
    with Distributor(jd, tmp_path / "replicas" / "cg1", w.vdisks) as d:
        assert d.step(nb) == nb and d.step(nb) == nb  # the second keeps every block as stored
        assert_at(d, w, 2 * nb)
        d.undo_to(nb)
        assert_at(d, w, nb)
        d.undo_to(0)
        assert_at(d, w, 0)


def test_pwritev_all_takes_more_buffers_than_iov_max(tmp_path: Path, rng: random.Random):
    parts = [rng.randbytes(rng.randint(0, 9)) for _ in range(2 * IOV_MAX + 7)]
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        pwritev_all(fd, parts, 5)
        assert os.pread(fd, 1 << 20, 5) == b"".join(parts)
    finally:
        os.close(fd)
