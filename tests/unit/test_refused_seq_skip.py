"""A write the card refuses (acked FAILED, e.g. FULL) still took a CG seq on
the host. Hold must skip that seq at once: waiting out the outcome timeout
for it held every later seq of the CG, so a full card stayed full and every
resync filled it again (issue 11: a full hidden volume never recovered).

Hold's `skip`, with a lane and before one; then both ring consumers (the
inline `RingEndpoint` and the acker → handoff → `HandoffEndpoint` pair)
report the refused writes' (cg_id, cg_seq) in ``skipped``."""

from __future__ import annotations

import os
import time

import pytest

from nicsplit.card.handoff import Handoff
from nicsplit.card.pipeline.hold import Hold
from nicsplit.card.pipeline.items import Resolved
from nicsplit.card.transports.ring_acker import RingAcker
from nicsplit.card.transports.ring_endpoint import RingEndpoint
from nicsplit.card.transports.ring_handoff import HandoffEndpoint
from nicsplit.card.transports.ring_splitter import RingSplitter
from nicsplit.core.records import AugmentedWrite, Op, Outcome, Status, WFlag

pytestmark = pytest.mark.unit

CG = 7
T0 = 1_000_000_000
FAR = 10 * 1_000_000_000


def _no_refusal(*refused) -> None:
    """The worker's lost log here: every payload is intact, so nothing may reach it."""
    raise AssertionError(f"an intact payload was reported bad: {refused}")


def write(io: int, seq: int, op: Op = Op.WRITE) -> AugmentedWrite:
    data = bytes(4096) if op == Op.WRITE else None
    return AugmentedWrite(io, CG, seq, 1, op, WFlag.NONE, 0, 4096, time.time_ns(), data)


def held(h: Hold, w: AugmentedWrite) -> None:
    h.add(Resolved(w, "cg", "a", 4096 if w.data is not None else 0), T0)


def ready_seqs(h: Hold) -> list[int]:
    out = []
    while (r := h.pop_ready()) is not None:
        out.append(r.write.cg_seq)
    return out


def test_a_skipped_seq_lets_later_seqs_go_at_once():
    lost: list = []
    h = Hold(on_lost=lost.append, release=lambda io: None, outcome_timeout_ms=5000)
    for io, seq in ((1, 10), (3, 12), (4, 13)):
        held(h, write(io, seq))
        h.outcome(Outcome(io, Status.COMMITTED), T0)
    assert ready_seqs(h) == [10]  # 11 is missing: 12 and 13 wait
    h.skip(CG, 11, T0)  # refused by the card: it never comes
    assert ready_seqs(h) == [12, 13]  # at once, not after the 5 s timeout
    h.skip(CG, 11, T0)  # below the lane's next: nothing happens
    held(h, write(5, 14))
    h.outcome(Outcome(5, Status.COMMITTED), T0)
    assert ready_seqs(h) == [14]
    assert lost == [] and h.statistics().gaps_skipped == 1


def test_a_seq_skipped_before_the_cgs_first_write_is_placed_when_its_lane_starts():
    h = Hold(on_lost=lambda w: None, release=lambda io: None)
    h.skip(CG, 21, T0)
    held(h, write(1, 20))
    held(h, write(2, 22))
    for io in (1, 2):
        h.outcome(Outcome(io, Status.COMMITTED), T0)
    assert ready_seqs(h) == [20, 22]
    # an early skip below the lane's first seq is dropped, not placed
    h2 = Hold(on_lost=lambda w: None, release=lambda io: None)
    h2.skip(CG, 3, T0)
    held(h2, write(1, 5))
    h2.outcome(Outcome(1, Status.COMMITTED), T0)
    assert ready_seqs(h2) == [5]


def test_early_skips_expire_with_the_outcome_timeout():
    h = Hold(on_lost=lambda w: None, release=lambda io: None, outcome_timeout_ms=10)
    h.skip(CG, 21, T0)
    h.expire(T0 + 20_000_000)
    held(h, write(1, 20))
    held(h, write(2, 22))
    for io in (1, 2):
        h.outcome(Outcome(io, Status.COMMITTED), T0 + 20_000_000)
    assert ready_seqs(h) == [20]  # 21 was forgotten: 22 waits for the gap timeout again


def submit_refused(sp: RingSplitter, pump, writes: list[AugmentedWrite]) -> None:
    for w in writes:
        assert sp.submit(w)
        pump()
        assert sp.wait_ack(w.io_id, time.monotonic_ns() + FAR) is False  # refused


def test_the_inline_endpoint_reports_refused_seqs(tmp_path):
    ep = RingEndpoint(str(tmp_path), data_size=1 << 20, sq_entries=64, cq_entries=64)
    sp = RingSplitter.connect(str(ep.socket_path))
    try:
        ep.set_full(True)
        submit_refused(sp, lambda: ep.poll(), [write(1, 30), write(2, 31, Op.ZERO)])
        assert ep.skipped == [(CG, 30), (CG, 31)]
        assert ep.statistics().refused_full == 2
    finally:
        sp.close()
        ep.close()


def test_the_acker_hands_refused_seqs_to_the_worker(tmp_path):
    ho = Handoff.create(slots=256)
    acker = RingAcker(str(tmp_path), handoff=ho, data_size=1 << 20, sq_entries=64, cq_entries=64)
    worker_ho = Handoff(os.dup(ho.fd))
    worker = HandoffEndpoint(worker_ho, acker.volume_path, acker.fake_uid, acker.wake_fd, on_refused=_no_refusal)
    sp = RingSplitter.connect(str(acker.socket_path))
    try:
        worker.set_full(True)  # the worker asks the acker to refuse
        submit_refused(sp, acker.pump, [write(1, 40), write(2, 41, Op.ZERO), write(3, 42)])
        assert worker.poll() == []  # nothing to pipeline ...
        assert worker.skipped == [(CG, 40), (CG, 41), (CG, 42)]  # ... but three seqs to skip
        s = worker.statistics()
        assert s["handoff"]["unfinished"] == 0 and s["held"] == 0  # their payload space is free again
        worker.set_full(False)
        assert sp.submit(write(4, 43))
        acker.pump()
        assert sp.wait_ack(4, time.monotonic_ns() + FAR) is True
        (got,) = worker.poll()
        assert got.cg_seq == 43
        got.data = None  # the view must go before the mapping closes
    finally:
        sp.close()
        worker.close()
        worker_ho.close()
        os.close(worker_ho.fd)
        acker.close()
        ho.close()
        os.close(ho.fd)
