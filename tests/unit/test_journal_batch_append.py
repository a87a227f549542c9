"""The journal's batch-level append (`Journal.append_batch` with WireRecords
whose records are all one inline block: the appliance's common batch, whose
block locations and index rows are built with zip, not a loop per record)
indexes exactly what recovery rebuilds from the files at open, in clear and
sealed, with batches inside one segment and batches spanning several; the
same holds for batches that take the per-record path (refs, multi-block
writes, ZERO/BARRIER records) mixed in."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from nicsplit.core.records import Op
from nicsplit.journal.writer import Journal
from nicsplit.storage import atrest
from nicsplit.testing.workload import batch, write
from nicsplit.wire import frames as F
from nicsplit.wire.wirerecords import decode_wire_records

SEED = random.randrange(1 << 30)


def _index(j: Journal) -> tuple:
    return (list(j._recs), list(j._seqs), dict(j._blocks), dict(j._seg_maxrec), dict(j._ref_last),
            dict(j._seg_commit), j.last_seq, j.statistics().records, j.statistics().batches)


def _batches(rng: random.Random, n: int, per: int, mixed: bool) -> list[tuple[object, list[F.Record]]]:
    out, seq, pool = [], 1, [rng.randbytes(4096) for _ in range(6)]
    for bid in range(1, n + 1):
        recs = []
        for _ in range(per):
            kind = rng.random() if mixed else 0.0
            if kind < 0.8:  # one block inline: 4 KiB or a partial one; repeats of earlier data too
                data = rng.choice(pool) if rng.random() < 0.2 else rng.randbytes(rng.choice([512, 4096]))
                recs.append(write(seq, data, rng.randrange(64) * 4096, vdisk=rng.choice([1, 1, 2])))
            elif kind < 0.9:
                recs.append(write(seq, rng.randbytes(9000), rng.randrange(64) * 4096))
            else:
                recs.append(F.Record(seq, seq, 2, rng.choice([Op.ZERO, Op.BARRIER]), 0, 0, 0, seq * 10))
            seq += 1
        out.append((batch(bid, recs), recs))
    return out


@pytest.mark.parametrize("sealed", [False, True])
@pytest.mark.parametrize("segment_size", [1 << 20, 30000])
@pytest.mark.parametrize("mixed", [False, True])
def test_batch_append_indexes_what_recovery_rebuilds(tmp_path: Path, sealed: bool, segment_size: int, mixed: bool):
    print(f"seed {SEED}")
    rng = random.Random(SEED)
    data = tmp_path / "data"
    jdir = data / "appliance" / "journal" / "cg1"
    if sealed:
        atrest.Keyring.create(atrest.keyring_path(data))
    batches = _batches(rng, 12, rng.choice([3, 9, 17]), mixed)
    with Journal.open(jdir, segment_size=segment_size) as j:
        for meta, recs in batches:
            res = j.append_batch(meta, decode_wire_records(F.encode_records(recs)))
            assert res.applied and res.last_seq == recs[-1].seq
            fps = [F.fingerprint(r.data) for r in recs if r.op == Op.WRITE and len(r.data) <= 4096]
            assert set(fps) <= set(res.known)
        appended = _index(j)
        segments = j.statistics().segments
        got = [(r, p) for r, p in j.records()]
    if segment_size == 30000:
        assert segments > 1  # batches rolled over (and some spanned) segments
    with Journal.open(jdir, segment_size=segment_size) as j:
        assert _index(j) == appended
        assert [(r, p) for r, p in j.records()] == got
        assert [r for r, _ in got] == [r for _, recs in batches for r in recs]
        for r in (r for _, recs in batches for r in recs):
            if r.op == Op.WRITE and len(r.data) <= 4096:
                assert j.read_block(F.fingerprint(r.data)) == r.data
