"""The appliance's block index fed from the journal writer's own record heads
(`AppendResult.batch` → `BlockIndex.feed`) equals the index the keyless
scanner builds from the segment files: in clear and sealed, across segment
roll-overs, batches spanning segments, gaps and duplicates; and a batch the
scanner is not positioned for is left to `refresh`."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from nicsplit.journal.writer import Journal
from nicsplit.recovery.blockindex import BlockIndex
from nicsplit.storage import atrest
from nicsplit.testing.workload import batch, rand_batches, write

COLUMNS = ("rec_seq", "rec_seg", "rec_pos", "rec_off", "rec_len", "rec_vdisk", "rec_op")


def snapshot(ix: BlockIndex) -> tuple:
    p = ix.pits
    vd = {k: (bytes(v.single), {b: list(a) for b, a in v.multi.items()}, v.blocks, v.versions)
          for k, v in ix._vd.items()}
    return (tuple(list(getattr(ix, c)) for c in COLUMNS), list(p._seq), list(p._time), list(p._batch),
            bytes(p._consistent), vd, (p._scanner.segment, p._scanner.offset, p._scanner.last_seq))


@pytest.mark.parametrize("sealed", [False, True])
@pytest.mark.parametrize("segment_size", [1 << 20, 30000])
def test_fed_index_equals_scanned_index(tmp_path: Path, sealed: bool, segment_size: int):
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    rng = random.Random(seed)
    data = tmp_path / "data"
    jdir = data / "appliance" / "journal" / "cg1"
    if sealed:
        atrest.Keyring.create(atrest.keyring_path(data))
    batches = rand_batches(rng, 30, per=4)
    big = [write(200 + i, rng.randbytes(9000), i * 16384) for i in range(6)]  # spans segments at 30000
    with Journal.open(jdir, segment_size=segment_size) as j:
        fed = BlockIndex(jdir)
        taken = 0
        for i, (meta, recs) in enumerate(batches):
            res = j.append_batch(meta, recs, sync=False)
            if fed.feed(res.batch):
                taken += 1
            else:  # what the appliance does then: read it back
                fed.refresh()
            if i == 10:  # a duplicate: nothing to feed
                assert j.append_batch(meta, recs).batch is None
        res = j.append_batch(batch(99, big), big)  # a gap (seq 121 -> 200), one batch over several segments
        taken += fed.feed(res.batch)
        j.sync()
        fed.refresh()  # picks up whatever was not taken; no-op otherwise
        scanned = BlockIndex(jdir)
        assert snapshot(fed) == snapshot(scanned)
        rolls = j.statistics().segments - 1
        assert taken >= len(batches) + 1 - rolls  # only the first batch after a roll is read back


def test_feed_refuses_a_batch_it_is_not_positioned_for(tmp_path: Path):
    jdir = tmp_path / "j"
    rng = random.Random(7)
    (m1, r1), (m2, r2) = rand_batches(rng, 2)
    with Journal.open(jdir) as j:
        ix = BlockIndex(jdir)
        j.append_batch(m1, r1)  # not fed: the index does not know it
        res = j.append_batch(m2, r2)
        assert ix.feed(res.batch) is False
        assert len(ix.pits) == 0
        ix.refresh()
        assert snapshot(ix) == snapshot(BlockIndex(jdir))
        assert ix.feed(res.batch) is False  # already indexed: not twice
        assert len(ix.pits) == 2
