"""The acker's QD1 path (`RingAcker._pump_one`: a lone WRITE or OUTCOME
without the round's set-up) leaves exactly what `pump`'s round of one
leaves: the same completions, handoff slots, payload ends, flags, shared
counters and statistics, step by step, for accepted writes, outcomes and
the entries it must hand back to the round (a duplicate io_id, a full card)."""

from __future__ import annotations

import random
import time

import pytest

from nicsplit.card.handoff import H
from nicsplit.core.records import AugmentedWrite, Op, Status, WFlag
from nicsplit.testing.cardrig import CardRig

pytestmark = pytest.mark.unit

FAR = 10 * 1_000_000_000
SEED = 20261203


def write(io: int, rng: random.Random, length: int = 4096) -> AugmentedWrite:
    return AugmentedWrite(io, 1, io, 1, Op.WRITE, WFlag.NONE, io * 4096, length, 1_000_000 + io, rng.randbytes(length))


def snapshot(rig: CardRig) -> tuple:
    a, ho = rig.acker, rig.ho
    n = int(ho.get(H.PRODUCED))
    return (bytes(a._cq), bytes(ho.slots[: n << 6]), [ho.ends[i] for i in range(n)], [ho.flags[i] for i in range(n)],
            [ho.get(k) for k in (H.PRODUCED, H.ACKED, H.REFUSED, H.DATA_EXPECT)],
            a._sq_head, a._cq_tail, a._data_expect, dict(a._live), list(a._live_order),
            a._n_entries, a._n_writes, a._n_bytes, a._n_outcomes, a._n_bad, a._n_refused_full)


def test_the_qd1_path_matches_the_round(tmp_path, monkeypatch):
    print(f"seed {SEED}")
    fast, slow = CardRig(str(tmp_path / "f"), on_refused=lambda *a: None), CardRig(str(tmp_path / "s"), on_refused=lambda *a: None)
    monkeypatch.setattr(slow.acker, "_pump_one", lambda c, head: 0)  # the round only
    used = []
    real = fast.acker._pump_one

    def counted(c, head):
        n = real(c, head)
        used.append(n)
        return n

    monkeypatch.setattr(fast.acker, "_pump_one", counted)
    try:
        rf, rs = random.Random(SEED), random.Random(SEED)
        steps = 0
        for io in range(1, 40):
            for rig, rng in ((fast, rf), (slow, rs)):
                length = 4096 * rng.randint(1, 4)
                assert rig.sp.submit(write(io, rng, length))
                assert rig.acker.pump() == 1
                assert rig.sp.wait_ack(io, time.monotonic_ns() + FAR)
                assert rig.sp.post_outcome(io, Status.COMMITTED)
                assert rig.acker.pump() == 1
            assert snapshot(fast) == snapshot(slow), f"after io {io}"
            steps += 1
        # A live io_id again (the worker has not released it): refused DUPLICATE by the round.
        for rig, rng in ((fast, rf), (slow, rs)):
            assert rig.sp.submit(write(5, rng))
            assert rig.acker.pump() == 1
            assert rig.sp.wait_ack(5, time.monotonic_ns() + FAR) is False
        assert snapshot(fast) == snapshot(slow)
        # The card full: refused FULL by the round, handed off for its payload space.
        for rig, rng in ((fast, rf), (slow, rs)):
            rig.ho.set(H.FULL, 1)
            assert rig.sp.submit(write(100, rng))
            assert rig.acker.pump() == 1
            assert rig.sp.wait_ack(100, time.monotonic_ns() + FAR) is False
        assert snapshot(fast) == snapshot(slow)
        assert used.count(1) == 2 * steps, "every plain write and outcome took the QD1 path"
        assert used[-2:] == [0, 0], "the duplicate and the full card went to the round"
    finally:
        fast.close()
        slow.close()
