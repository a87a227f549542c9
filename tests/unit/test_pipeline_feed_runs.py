"""`CardPipeline.feed`'s runs (a vdisk's writes checked against the entry
resolve used, their bytes counted once a run) against ``resolve_runs =
False`` (`Resolver.resolve` for every write, bytes counted a write): on
seeded polls mixing CGs, vdisks, empty and ZERO writes, outcomes and a CG
the appliance refuses, both lose, release and hold the same writes and
count the same bytes per CG."""

from __future__ import annotations

import random
from dataclasses import asdict

import pytest

from nicsplit.card.pipeline import CardPipeline
from nicsplit.core.records import Op, Outcome, Status
from nicsplit.testing.pipeline import FakeCatalog, FakeEndpoint, write

pytestmark = pytest.mark.unit

VDISKS = {1: ("cgA", "a1", 1 << 20), 2: ("cgA", "a2", 1 << 20), 3: ("cgB", "b1", 1 << 20),
          4: ("cgR", "r1", 1 << 20)}
CG_ID = {1: 1, 2: 1, 3: 2, 4: 3}


class Side:
    def __init__(self, runs: bool, from_log: bool) -> None:
        self.ep = FakeEndpoint()
        self.lost: list[int] = []
        self.from_log = from_log
        self.p = CardPipeline(FakeCatalog(VDISKS), release=self.ep.release,
                              on_lost=lambda w: self.lost.append(w.io_id), key=bytes(32))
        self.p.resolve_runs = runs
        self.p.window.connected({}, lambda b: None, ["cgA", "cgB"], {"cgR": "refused by the appliance"})

    def feed(self, entries: list, t: int) -> None:
        self.ep.push(*entries)
        self.p.feed(self.ep.poll(1 << 20), t, from_log=self.from_log)

    def observed(self) -> tuple:
        return (self.lost, self.ep.released, sorted(self.ep.held), asdict(self.p.statistics()),
                self.p.cg_report(wall_ns=10**18), self.p.in_bytes(), dict(self.p._payload_ios))


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5, 6])
def test_feed_runs_match_resolve_per_write(seed):
    print(f"seed {seed}")
    rng = random.Random(seed)
    from_log = seed % 2 == 0
    runs, ref = Side(True, from_log), Side(False, from_log)
    seq = {1: 0, 2: 0, 3: 0}
    io = 0
    for step in range(150):
        entries: list = []
        vdisk = rng.choice([1, 2, 3, 4])
        for _ in range(rng.randrange(0, 30)):
            if rng.random() < 0.2:
                vdisk = rng.choice([1, 2, 3, 4])  # runs of one vdisk, broken now and then
            io += 1
            cg_id = CG_ID[vdisk]
            seq[cg_id] += 1
            k = rng.random()
            off = rng.randrange(0, 200) * 4096
            if k < 0.75:
                w = write(io, seq[cg_id], cg_id=cg_id, vdisk_id=vdisk, offset=off, data=rng.randbytes(
                    rng.choice([4096, 4096, 512, 8192])))
            elif k < 0.8:
                w = write(io, seq[cg_id], cg_id=cg_id, vdisk_id=vdisk, offset=off, data=b"")  # an empty WRITE
            elif k < 0.85:
                w = write(io, seq[cg_id], cg_id=cg_id, vdisk_id=vdisk, offset=(1 << 20) - 2048, data=bytes(4096))
            else:
                w = write(io, seq[cg_id], cg_id=cg_id, vdisk_id=vdisk, offset=off, op=Op.ZERO, length=4096)
            entries.append(w)
            if rng.random() < 0.5:
                entries.append(Outcome(io, Status.COMMITTED if rng.random() < 0.95 else Status.FAILED))
        runs.feed(entries, step * 1000)
        ref.feed(list(entries), step * 1000)
        assert runs.observed() == ref.observed(), f"seed {seed}: diverged at step {step}"
    st = runs.p.statistics()
    assert st.lost and st.released and st.resolve.resolved and st.resolve.dropped_out_of_range
