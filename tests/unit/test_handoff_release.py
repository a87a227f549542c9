"""`HandoffEndpoint.release_many` (a durable batch's writes in one call)
against `release` one by one: the same handoff floor, the same ring
DATA_HEAD, the same held set after every step, on seeded random release
orders; an io id not held raises like `release` and leaves the rest done."""

from __future__ import annotations

import random
import time

import pytest

from nicsplit.core.records import AugmentedWrite, Op, Outcome, Status, WFlag
from nicsplit.testing.cardrig import CardRig

pytestmark = pytest.mark.unit

FAR = 10 * 1_000_000_000


class Pair(CardRig):
    """An acker and a pipeline-worker endpoint on one ring, with a splitter."""

    def send(self, writes: list[AugmentedWrite]) -> list[int]:
        for w in writes:
            if isinstance(w, Outcome):
                assert self.sp.post_outcome(w.io_id, w.status)
                continue
            assert self.sp.submit(w)
            self.acker.pump()
            assert self.sp.wait_ack(w.io_id, time.monotonic_ns() + FAR)
        self.acker.pump()
        got = self.worker.poll()
        for e in got:
            if isinstance(e, AugmentedWrite):
                e.data = None  # the views must go before the mapping closes
        return [e.io_id for e in got if isinstance(e, AugmentedWrite) and e.op == Op.WRITE]

    def state(self) -> tuple:
        s = self.worker.statistics()
        return s["released"], s["held"], s["handoff"]["floor"], s["handoff"]["unfinished"]



@pytest.mark.parametrize("seed", [11, 12, 13])
def test_release_many_matches_release_one_by_one(tmp_path, seed):
    print(f"seed {seed}")
    rng = random.Random(seed)
    one, many = Pair(str(tmp_path / "one")), Pair(str(tmp_path / "many"))
    try:
        io = 0
        held: list[int] = []
        for _ in range(40):
            writes = []
            for _ in range(rng.randrange(0, 6)):
                io += 1
                if rng.random() < 0.15:  # no payload: never held, never released
                    writes.append(AugmentedWrite(io, 1, io, 1, Op.ZERO, WFlag.NONE, 0, 4096, time.time_ns(), None))
                else:
                    n = rng.choice([512, 4096, 6000])
                    writes.append(AugmentedWrite(io, 1, io, 1, Op.WRITE, WFlag.NONE, 0, n, time.time_ns(),
                                                 rng.randbytes(n)))
                if rng.random() < 0.3:
                    writes.append(Outcome(io, Status.COMMITTED))  # outcomes share the handoff queue
            assert one.send(writes) == many.send(writes)
            held += [w.io_id for w in writes if isinstance(w, AugmentedWrite) and w.op == Op.WRITE]
            rng.shuffle(held)
            k = rng.randrange(max(0, len(held) - 6), len(held) + 1)  # the data area stays below its bound
            batch, held = held[:k], held[k:]
            for io_id in batch:
                one.worker.release(io_id)
            many.worker.release_many(batch)
            assert one.state() == many.state()
        one.worker.release_many(held)
        many.worker.release_many(held)
        assert one.state() == many.state()
        released, n_held, floor, unfinished = many.state()
        assert n_held == 0 and unfinished == 0 and released > 0
    finally:
        one.close()
        many.close()


def test_release_many_of_an_io_not_held_raises_and_keeps_the_others(tmp_path):
    p = Pair(str(tmp_path / "run"))
    try:
        ids = p.send([AugmentedWrite(i, 1, i, 1, Op.WRITE, WFlag.NONE, 0, 4096, time.time_ns(), bytes(4096))
                      for i in (1, 2, 3)])
        assert ids == [1, 2, 3]
        with pytest.raises(KeyError, match="io 99 is not held"):
            p.worker.release_many([1, 99, 2])
        assert p.state()[1:] == (2, 1, 2)  # io 1 released and the floor moved over it; 2 and 3 still held
        with pytest.raises(KeyError, match="io 1 is not held"):
            p.worker.release_many([1])
        p.worker.release_many([3, 2])
        assert p.state()[1:] == (0, 3, 0)
    finally:
        p.close()


def test_poll_hands_over_outcomes_equal_to_outcome_objects(tmp_path):
    """`poll` builds each Outcome without its dataclass __init__: the same
    frozen, hashable object, with the status the host posted."""
    p = Pair(str(tmp_path / "run"))
    try:
        ws = [AugmentedWrite(i, 1, i, 1, Op.WRITE, WFlag.NONE, 0, 4096, time.time_ns(), bytes(4096)) for i in (1, 2)]
        for w in ws:
            assert p.sp.submit(w)
            p.acker.pump()
            assert p.sp.wait_ack(w.io_id, time.monotonic_ns() + FAR)
        assert p.sp.post_outcome(1, Status.COMMITTED) and p.sp.post_outcome(2, Status.FAILED)
        p.acker.pump()
        got = p.worker.poll()
        outs = [e for e in got if isinstance(e, Outcome)]
        assert outs == [Outcome(1, Status.COMMITTED), Outcome(2, Status.FAILED)]
        assert all(type(o) is Outcome and type(o.status) is Status for o in outs)
        assert hash(outs[0]) == hash(Outcome(1, Status.COMMITTED))
        with pytest.raises(AttributeError):
            outs[0].io_id = 7  # still frozen
        for e in got:
            if isinstance(e, AugmentedWrite):
                e.data = None  # the views must go before the mapping closes
    finally:
        p.close()
