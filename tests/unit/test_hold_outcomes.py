"""`Hold.outcomes` (a run of a poll's outcomes in one call) against
`Hold.outcome` one by one: on seeded random workloads — several lanes,
outcomes in and out of seq order, FAILED ones, outcomes before their writes
or for no write, repeated outcomes, skips, rejects and an open gap between
the runs — both holds lose, release and make ready the same writes in the
same order (the same entries, GAP flags included), with the same statistics
and the same gap clocks."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from nicsplit.card.pipeline.hold import Hold
from nicsplit.core.records import Outcome, Status
from nicsplit.testing.pipeline import write

pytestmark = pytest.mark.unit


class Side:
    def __init__(self, max_writes: int) -> None:
        self.lost: list[int] = []
        self.released: list[int] = []
        self.hold = Hold(on_lost=lambda w: self.lost.append(w.io_id), release=self.released.append,
                         max_writes=max_writes, max_bytes=1 << 30, outcome_timeout_ms=3)
        self.ready: list[tuple[int, int]] = []

    def observed(self) -> tuple:
        h = self.hold
        while (r := h.pop_ready()) is not None:
            self.ready.append((r.write.io_id, int(r.write.flags)))
        lanes = {cg: (lane.next, sorted(lane.slots), lane.blocked_ns) for cg, lane in h._lanes.items()}
        return self.lost, self.released, self.ready, h.statistics(), lanes


@pytest.mark.parametrize("seed", [11, 12, 13, 14, 15, 16])
def test_outcomes_match_outcome_one_by_one(seed):
    print(f"seed {seed}")
    rng = random.Random(seed)
    max_writes = rng.choice([8, 40, 10_000])
    runs, one = Side(max_writes), Side(max_writes)
    seqs = {1: 0, 2: 0, 3: 0}
    io = 0
    t = 0
    for step in range(300):
        t += rng.randrange(0, 2_000_000)
        writes = []
        for _ in range(rng.randrange(0, 20)):
            cg = rng.choice([1, 1, 1, 2, 3])
            seqs[cg] += 2 if rng.random() < 0.05 else 1
            io += 1
            writes.append(write(io, seqs[cg], cg_id=cg, offset=rng.randrange(0, 8) * 100, data=b"x" * 100))
        outs = [Outcome(w.io_id, Status.COMMITTED if rng.random() < 0.9 else Status.FAILED)
                for w in writes if rng.random() < 0.85]
        if rng.random() < 0.5:
            rng.shuffle(outs)
        outs += [Outcome(io + 1000 + i, Status.COMMITTED) for i in range(rng.randrange(0, 2))]  # for no write (yet)
        if outs and rng.random() < 0.1:
            outs.append(outs[0])  # repeated
        early = [o for o in outs if rng.random() < 0.1]  # before their writes
        late = [o for o in outs if o not in early]
        gap = (1, seqs[1], 1, rng.randrange(0, 8) * 100, 200) if step % 37 == 5 else None
        for side in (runs, one):
            h = side.hold
            h.outcomes(early, t) if side is runs else [h.outcome(o, t) for o in early]
            # each side its own copies: `_gap` sets a write's flags
            h.add_entries([(replace(w), f"cg{w.cg_id}", "v", 100) for w in writes], t)
            if gap is not None:
                h.open_gap(*gap)
            h.outcomes(late, t) if side is runs else [h.outcome(o, t) for o in late]
            if step % 7 == 0:
                h.skip(2, seqs[2] + 1, t)
                h.reject(3, seqs[3] + 1, t)
            h.expire(t)
        if step % 7 == 0:
            seqs[2] += 1
            seqs[3] += 1
        assert runs.observed() == one.observed(), f"seed {seed}: diverged at step {step}"
    st = runs.hold.statistics()
    assert st.committed and st.failed and st.gap_flagged and st.stray_outcomes and runs.ready
