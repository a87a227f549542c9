"""`format.read_payloads_at` (a distribution step's journal read: sealed
payloads opened into one buffer) answers exactly what `read_payload_at`
answers record by record, and refuses every altered byte the same way.

Oracle: `read_payload_at` on the same bytes; a seeded workload of whole- and
partial-block writes, zeroes and trims, sealed and in clear.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from nicsplit.journal.format import JournalCorrupt, read_payload_at, read_payloads_at
from nicsplit.journal.reader import SegmentReader
from nicsplit.recovery.blockindex import BlockIndex
from nicsplit.core.records import Op
from nicsplit.storage import atrest
from nicsplit.testing.workload import BS, T0, Meta, V, Workload
from nicsplit.wire.frames import Record


def _workload(seed: int) -> Workload:
    """Batches of writes (whole blocks, partial, half zeros), zeroes and trims."""
    rng = random.Random(seed)
    w = Workload([V(7, "d", 64 * BS)])
    seq = 0
    for bid in range(1, 13):
        recs = []
        for _ in range(rng.randint(1, 12)):
            seq += 1
            off = rng.randrange(0, 60 * BS, rng.choice([512, BS]))
            ln = rng.choice([512, BS, 2 * BS, 3 * BS + 512])
            op = rng.choice([Op.WRITE, Op.WRITE, Op.WRITE, Op.ZERO, Op.TRIM])
            data = (rng.randbytes(ln // 2) + bytes(ln - ln // 2)) if op == Op.WRITE else None
            recs.append(Record(seq, seq, 7, op, 0, off, ln, T0 + seq, data if data is not None else b""))
            w.ledger.append((seq, 7, op, off, ln, data))
        w.batches.append((Meta(bid, recs[0].seq, seq, recs[0].time_ns, T0 + seq), recs))
    return w


def _journal(tmp_path: Path, seed: int, sealed: bool) -> tuple[Path, BlockIndex]:
    if sealed:
        atrest.Keyring.create(tmp_path / atrest.KEYRING_NAME)
    w = _workload(seed)
    jd = tmp_path / "journal" / "cg1"
    w.write_journal(jd)
    return jd, BlockIndex(jd)


def _segment_buf(jd: Path, ix: BlockIndex, seg: int):
    r = SegmentReader(jd)
    fd, cipher = r._segment(seg)
    pos = [ix.rec_pos[o] for o in range(len(ix.rec_seq)) if ix.rec_seg[o] == seg]
    size = os.fstat(fd).st_size
    return r, cipher, pos, memoryview(os.pread(fd, size - pos[0], pos[0]))


@pytest.mark.parametrize("sealed", [False, True], ids=["clear", "sealed"])
def test_batch_read_equals_the_record_by_record_read(tmp_path: Path, seed: int, sealed: bool):
    jd, ix = _journal(tmp_path, seed, sealed)
    rng = random.Random(seed)
    r, cipher, pos, buf = _segment_buf(jd, ix, ix.rec_seg[0])
    try:
        assert (cipher is not None) == sealed
        first_end = pos[1] - pos[0] if len(pos) > 1 else len(buf)  # the first entry's end in buf
        for _ in range(5):  # any subset in order, and a buffer cut short (those past its end: None)
            some = sorted({pos[0], *rng.sample(pos, rng.randint(1, len(pos)))})
            # The cut always keeps the first entry whole (it may be over half the segment).
            cut = buf[: rng.randint(max(len(buf) // 2, first_end), len(buf))]
            want = [read_payload_at(cut, pos[0], cipher, p, "w") for p in some]
            got = read_payloads_at(cut, pos[0], cipher, some, "w")
            assert [None if g is None else (g[0], bytes(g[1])) for g in got] == want
            assert any(g is not None for g in got)
    finally:
        r.close()


@pytest.mark.parametrize("sealed", [False, True], ids=["clear", "sealed"])
def test_an_altered_byte_fails_like_the_record_by_record_read(tmp_path: Path, seed: int, sealed: bool):
    jd, ix = _journal(tmp_path, seed, sealed)
    rng = random.Random(seed)
    r, cipher, pos, buf = _segment_buf(jd, ix, ix.rec_seg[0])
    try:
        for _ in range(40):
            i = rng.randrange(len(pos))
            end = pos[i + 1] - pos[0] if i + 1 < len(pos) else len(buf)
            at = rng.randrange(pos[i] - pos[0], end)  # a byte of record i's entry
            bad = bytearray(buf)
            bad[at] ^= 1 << rng.randrange(8)
            try:
                want = read_payload_at(memoryview(bad), pos[0], cipher, pos[i], "w")
            except JournalCorrupt as e:
                with pytest.raises(JournalCorrupt) as got:
                    read_payloads_at(memoryview(bad), pos[0], cipher, pos, "w")
                assert str(got.value).split(":")[-1] == str(e).split(":")[-1]
                continue
            # Not refused (the entry's size grew past the buffer, or a clear padding bit): the same answer.
            got_all = read_payloads_at(memoryview(bad), pos[0], cipher, [pos[i]], "w")
            assert [None if g is None else (g[0], bytes(g[1])) for g in got_all] == [want]
    finally:
        r.close()
