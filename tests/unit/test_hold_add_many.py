"""`Hold.add_many` (a poll's writes in one call) against `Hold.add` one by
one: on seeded random workloads — several lanes, seqs in order, gaps,
repeats and late seqs, a bound that fills, outcomes before their writes,
skips and rejects between the batches — both holds lose, release and make
ready the same writes in the same order, with the same statistics and the
same gap clocks."""

from __future__ import annotations

import random

import pytest

from nicsplit.card.pipeline.hold import Hold
from nicsplit.card.pipeline.items import Resolved
from nicsplit.core.records import Outcome, Status
from nicsplit.testing.pipeline import write

pytestmark = pytest.mark.unit


class Side:
    def __init__(self, max_writes: int) -> None:
        self.lost: list[int] = []
        self.released: list[int] = []
        self.hold = Hold(on_lost=lambda w: self.lost.append(w.io_id), release=self.released.append,
                         max_writes=max_writes, max_bytes=1 << 30, outcome_timeout_ms=3)
        self.ready: list[int] = []

    def observed(self) -> tuple:
        h = self.hold
        while (r := h.pop_ready()) is not None:
            self.ready.append(r.write.io_id)
        lanes = {cg: (lane.next, sorted(lane.slots), lane.blocked_ns) for cg, lane in h._lanes.items()}
        return self.lost, self.released, self.ready, h.statistics(), lanes


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_add_many_matches_add_one_by_one(seed):
    print(f"seed {seed}")
    rng = random.Random(seed)
    max_writes = rng.choice([8, 40, 10_000])
    many, one = Side(max_writes), Side(max_writes)
    seqs = {1: 0, 2: 0, 3: 0}
    io = 0
    t = 0
    for step in range(300):
        t += rng.randrange(0, 2_000_000)
        batch: list[Resolved] = []
        for _ in range(rng.randrange(0, 20)):
            cg = rng.choice([1, 1, 1, 2, 3])
            r = rng.random()
            if r < 0.05:
                seq = max(1, seqs[cg] - rng.randrange(0, 4))  # late or repeated
            elif r < 0.1:
                seqs[cg] += 2  # a gap
                seq = seqs[cg]
            else:
                seqs[cg] += 1
                seq = seqs[cg]
            io += 1
            batch.append(Resolved(write(io, seq, cg_id=cg, data=b"x" * 100), f"cg{cg}", "v", 100))
        outs = [Outcome(rw.write.io_id, Status.COMMITTED if rng.random() < 0.9 else Status.FAILED)
                for rw in batch if rng.random() < 0.8]
        early = [o for o in outs if rng.random() < 0.1]  # outcomes that come before their writes
        rng.shuffle(outs)
        for side in (many, one):
            for o in early:
                side.hold.outcome(o, t)
            side.hold.add_many(batch, t) if side is many else [side.hold.add(r, t) for r in batch]
            for o in outs:
                if o not in early:
                    side.hold.outcome(o, t)
            if step % 7 == 0:
                side.hold.skip(2, seqs[2] + 1, t)
                side.hold.reject(3, seqs[3] + 1, t)
            side.hold.expire(t)
        if step % 7 == 0:
            seqs[2] += 1
            seqs[3] += 1
        assert many.observed() == one.observed(), f"seed {seed}: diverged at step {step}"
    st = many.hold.statistics()
    assert st.committed and st.lost_late and st.gaps_skipped and many.ready
    if max_writes < 100:
        assert st.refused_full
