"""The acker works a round of SQ entries at a time (`RingAcker.pump`):
the descriptors are read in bulk, the round's acks are published with one
CQ_TAIL store *before* any of its entries is handed to the worker, and the
handed-off descriptors are copied a run at a time. Here: the order of the
two publications (seen from the ``card.acker.after-ack`` failpoint, once a
round), and the handoff's copies across the wrap of both queues with an
outcome and a bad entry (dropped, never handed off) inside a round."""

from __future__ import annotations

import time

import pytest

from nicsplit.card.handoff import H
from nicsplit.card.transports import ring_acker
from nicsplit.core.records import AugmentedWrite, Op, Outcome, Status, WFlag
from nicsplit.testing.cardrig import CardRig
from nicsplit.wire import ring as R

pytestmark = pytest.mark.unit

FAR = 10 * 1_000_000_000


class Pair(CardRig):
    def __init__(self, run: str, slots: int = 1024, sq: int = 64) -> None:
        super().__init__(run, slots=slots, sq=sq)


def w(io: int) -> AugmentedWrite:
    return AugmentedWrite(io, 1, io, 1, Op.WRITE, WFlag.NONE, io * 4096, 4096, time.time_ns(),
                          io.to_bytes(8, "little") * 512)


def test_a_round_is_acked_before_any_of_it_is_handed_off(tmp_path, monkeypatch):
    p = Pair(str(tmp_path / "run"))
    seen: list[tuple[str, int, int]] = []
    ctr = p.acker._ctr

    def hit(name: str) -> None:
        seen.append((name, ctr[R.Counter.CQ_TAIL], p.ho.get(H.PRODUCED)))

    monkeypatch.setattr(ring_acker, "_FP", {"armed": True})
    monkeypatch.setattr(ring_acker._fp, "hit", hit)
    try:
        for io in range(1, 6):
            assert p.sp.submit(w(io))
        assert p.acker.pump() == 5
        assert seen == [("card.acker.after-ack", 5, 0)], "one hit a round: all five acked, none handed off yet"
        assert p.ho.get(H.PRODUCED) == 5
        got = p.worker.poll()
        assert [e.io_id for e in got] == [1, 2, 3, 4, 5]
        for e in got:
            e.data = None
    finally:
        p.close()


def test_runs_are_copied_across_both_wraps_with_dropped_entries(tmp_path):
    """8 SQ slots and 8 handoff slots, rounds of 5 writes and their
    outcomes (a round crosses a wrap of each queue every few rounds), a
    malformed outcome in some rounds (dropped: it breaks a copy run): the
    worker gets exactly the writes and outcomes, in order, with their
    payloads, round after round."""
    p = Pair(str(tmp_path / "run"), slots=8, sq=8)
    io = 0
    try:
        for rnd in range(12):
            ios = []
            for _ in range(3):
                io += 1
                ios.append(io)
                assert p.sp.submit(w(io))
            p.acker.pump()
            for i in ios:
                assert p.sp.wait_ack(i, time.monotonic_ns() + FAR)
            # two outcomes, a malformed one between them on odd rounds (status 7: dropped by the acker)
            assert p.sp.post_outcome(ios[0], Status.COMMITTED)
            if rnd % 2:
                c = p.acker._ctr  # written as the host would: the next SQ slot, then the tail
                tail = c[R.Counter.SQ_TAIL]
                R.pack_descriptor(p.acker._sq, (tail % 8) * 64, R.Descriptor(
                    R.Kind.OUTCOME, 0, 0, 7, 0, 999_000 + rnd, 0, 0, 0, 0, 0, 0, 0, tail & 0xFFFFFFFF))
                c[R.Counter.SQ_TAIL] = tail + 1
                p.sp._sq_tail = tail + 1  # the splitter's own copy of its tail
            assert p.sp.post_outcome(ios[1], Status.COMMITTED)
            p.acker.pump()
            got = p.worker.poll()
            want = [(AugmentedWrite, i) for i in ios] + [(Outcome, ios[0]), (Outcome, ios[1])]
            assert [(type(e), e.io_id) for e in got] == want, f"round {rnd}"
            for e in got:
                if isinstance(e, AugmentedWrite):
                    assert bytes(e.data) == e.io_id.to_bytes(8, "little") * 512
                    e.data = None
            p.worker.release_many(ios)
            p.sp.reap()
    finally:
        p.close()
