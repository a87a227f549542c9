"""The payload checksum is checked off the ack path (issue 9): the acker
acks a write on its descriptor alone, and the pipeline worker's endpoint
(`HandoffEndpoint.poll`) verifies the payload before the pipeline sees it.
A corrupted payload is acked but never handed to the pipeline: it goes to the
lost log (``on_refused``) before its space is freed, its seq is skipped, and
the next write goes through intact. A bad descriptor is still refused on the
ack path."""

from __future__ import annotations

import os
import time

import pytest

from nicsplit.card.handoff import Handoff
from nicsplit.card.transports.ring_acker import RingAcker
from nicsplit.card.transports.ring_handoff import HandoffEndpoint
from nicsplit.core.records import AugmentedWrite, Op, WFlag
from nicsplit.testing.cardrig import CardRig
from nicsplit.wire import ring as R

pytestmark = pytest.mark.unit

FAR = 10 * 1_000_000_000
MIB = 1 << 20
CG = 3


def write(io: int, payload: bytes) -> AugmentedWrite:
    return AugmentedWrite(io, CG, io, 7, Op.WRITE, WFlag.NONE, io * MIB, len(payload), time.time_ns(), payload)


def pattern(io: int) -> bytes:
    return bytes((io + i) & 0xFF for i in range(256)) * (MIB // 256)


class Pair(CardRig):
    def __init__(self, run: str, verify: bool = True) -> None:
        self.lost: list[tuple] = []
        super().__init__(run, slots=256, data_size=8 * MIB, on_refused=lambda *a: self.lost.append(a), verify=verify)

    def submit(self, w: AugmentedWrite, corrupt_at: int | None = None) -> bool:
        """Publish, corrupt one payload byte in the ring before the card looks, ack."""
        assert self.sp.submit(w)
        if corrupt_at is not None:
            data = self.sp._data
            off = (self.sp.last_position - w.length) % len(data) + corrupt_at
            data[off] ^= 0x40
        self.acker.pump()
        return self.sp.wait_ack(w.io_id, time.monotonic_ns() + FAR)



def test_a_corrupted_1mib_payload_is_acked_then_caught_by_the_worker_and_reported_lost(tmp_path):
    p = Pair(str(tmp_path))
    try:
        assert p.submit(write(1, pattern(1)), corrupt_at=MIB - 1) is True  # the ack checks the descriptor only
        assert p.worker.poll() == []  # never reaches the pipeline
        assert p.lost == [(1, 7, MIB, MIB, "BAD_CHECKSUM")]  # the host marks and resyncs this region
        assert p.worker.skipped == [(CG, 1)]  # hold does not wait for its seq
        assert p.worker.gaps == [(CG, 1, 7, MIB, MIB)]  # later writes of its CG carry GAP until it is covered
        s = p.worker.statistics()
        assert s["handoff"]["bad_checksum"] == 1
        assert s["held"] == 0 and s["handoff"]["unfinished"] == 0
        assert p.sp.released_position() == MIB  # its space is freed (after the lost log has it)
        assert p.submit(write(2, pattern(2))) is True  # the next one is intact
        (got,) = p.worker.poll()
        assert (got.io_id, got.cg_seq, got.length) == (2, 2, MIB) and bytes(got.data) == pattern(2)
        got.data = None  # the view must go before the mapping closes
        assert p.lost == [(1, 7, MIB, MIB, "BAD_CHECKSUM")]
    finally:
        p.close()


def test_without_verification_the_worker_hands_the_payload_over(tmp_path):
    p = Pair(str(tmp_path), verify=False)  # transport_options verify_checksums = false
    try:
        assert p.submit(write(1, pattern(1)), corrupt_at=0) is True
        (got,) = p.worker.poll()
        assert got.io_id == 1 and bytes(got.data) != pattern(1)
        got.data = None
        assert p.lost == []
    finally:
        p.close()


def test_a_bad_descriptor_is_still_refused_on_the_ack_path(tmp_path, caplog):
    p = Pair(str(tmp_path))
    try:
        assert p.submit(write(1, pattern(1))) is True
        # a descriptor whose payload range lies beyond what the host published
        sq, tail = p.sp._sq, p.sp._sq_tail
        R.pack_descriptor(sq, (tail % 64) * 64, R.Descriptor(
            1, 0, 0, 0, MIB, 9, 9, CG, 7, 0, 0, 64 * MIB, 0, tail & 0xFFFFFFFF))
        p.sp._inflight[9] = 0  # waited for, as `submit` would have registered it
        p.sp._publish(tail + 1)
        p.acker.pump()
        assert p.sp.wait_ack(9, time.monotonic_ns() + FAR) is False
        assert "BAD_RANGE" in caplog.text
        (got,) = p.worker.poll()
        assert got.io_id == 1 and bytes(got.data) == pattern(1)
        got.data = None
    finally:
        p.close()


def test_a_verifying_worker_endpoint_without_a_lost_log_refuses_to_exist(tmp_path):
    """A payload found bad after its ack must be reported (P1): an endpoint
    that verifies checksums and has nowhere to report one fails at once,
    and its lost log cannot be taken away later; without verification it
    needs none."""
    ho = Handoff.create(slots=256)
    acker = RingAcker(str(tmp_path), handoff=ho, data_size=8 * MIB, sq_entries=64, cq_entries=64)
    worker_ho = Handoff(os.dup(ho.fd))
    try:
        with pytest.raises(ValueError, match="no on_refused"):
            HandoffEndpoint(worker_ho, acker.volume_path, acker.fake_uid, acker.wake_fd)
        lost: list[tuple] = []
        ep = HandoffEndpoint(worker_ho, acker.volume_path, acker.fake_uid, acker.wake_fd, on_refused=lost.append)
        with pytest.raises(ValueError, match="no on_refused"):
            ep.on_refused = None
        assert ep.on_refused == lost.append  # still reporting
        ep.close()
        ep = HandoffEndpoint(worker_ho, acker.volume_path, acker.fake_uid, acker.wake_fd, verify_checksums=False)
        ep.on_refused = None  # nothing is found bad without verification
        ep.close()
    finally:
        worker_ho.close()
        os.close(worker_ho.fd)
        acker.close()
        ho.close()
        os.close(ho.fd)


def test_the_bad_checksum_count_outlives_the_worker_endpoint_that_found_it(tmp_path):
    """A restarted worker builds a new endpoint on the same handoff queue:
    the count is the card's, kept in the queue's shared header."""
    p = Pair(str(tmp_path))
    try:
        assert p.submit(write(1, pattern(1)), corrupt_at=5) is True
        assert p.worker.poll() == [] and p.worker.statistics()["handoff"]["bad_checksum"] == 1
        p.worker.close()  # the worker is gone; a new one maps the same queue
        p.worker = HandoffEndpoint(p.worker_ho, p.acker.volume_path, p.acker.fake_uid, p.acker.wake_fd,
                                   on_refused=lambda *a: p.lost.append(a))
        assert p.worker.statistics()["handoff"]["bad_checksum"] == 1
        assert p.submit(write(2, pattern(2)), corrupt_at=MIB // 2) is True
        assert p.worker.poll() == [] and p.worker.statistics()["handoff"]["bad_checksum"] == 2
        assert [x[0] for x in p.lost] == [1, 2]
    finally:
        p.close()
