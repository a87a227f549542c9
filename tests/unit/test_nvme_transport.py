"""nvme-pi transport in one process: NvmePiSplitter + NvmePiEndpoint over a
real hidden volume, the card polled by hand between submit and wait."""

from __future__ import annotations

import dataclasses
import os
import time

import pytest

from nicsplit.card.transports import base
from nicsplit.card.transports.base import CardEndpoint, SplitterTransport, TransportUnavailable
from nicsplit.card.transports.nvme_pi import NvmePiEndpoint, NvmePiSplitter
from nicsplit.card.transports.ring_endpoint import RingEndpoint
from nicsplit.card.transports.ring_splitter import RingSplitter
from nicsplit.core.records import AugmentedWrite, Op, Outcome, Status, WFlag
from nicsplit.testing.splitpair import WriteMaker, split_pairs
from nicsplit.wire import nvme as N
from nicsplit.wire import ring as R

FAR = 10 * 1_000_000_000  # a deadline we never mean to reach


def _check_gone(ep: NvmePiEndpoint) -> None:
    assert not os.path.exists(ep.volume_path)


@pytest.fixture
def make(tmp_path):
    """make(**endpoint options) -> (endpoint, splitter); both closed after the test."""

    def _make(**opts):
        opts.setdefault("data_size", 1 << 20)
        opts.setdefault("sq_entries", 8)
        return pair(opts, {"stale_after_ns": 60 * 1_000_000_000})

    with split_pairs(tmp_path, NvmePiEndpoint, NvmePiSplitter, _check_gone) as pair:
        yield _make


_records = WriteMaker()
write = _records.write


def roundtrip(ep, sp, w, release=True) -> list:
    assert sp.submit(w)
    recs = ep.poll()
    ok = sp.wait_ack(w.io_id, time.monotonic_ns() + FAR)
    if release:
        for r in recs:
            if isinstance(r, AugmentedWrite) and r.op == Op.WRITE and ok:
                ep.release(r.io_id)
    return [ok, *recs]


def test_registry_opens_both_halves_and_refuses_the_other_transport(make, tmp_path):
    ep, sp = make()
    assert isinstance(sp, SplitterTransport) and isinstance(ep, CardEndpoint)
    sp.close()
    sp2 = base.open_splitter("nvme-pi", str(ep.socket_path))
    assert isinstance(sp2, NvmePiSplitter)
    sp2.close()
    with pytest.raises(TransportUnavailable, match="card speaks 'nvme-pi'.*we speak 'ring'"):
        RingSplitter.connect(str(ep.socket_path))
    ring = RingEndpoint(tmp_path / "ring", data_size=R.MIN_DATA, sq_entries=8)
    try:
        with pytest.raises(TransportUnavailable, match="card speaks 'ring'.*we speak 'nvme-pi'"):
            base.open_splitter("nvme-pi", str(ring.socket_path))
    finally:
        ring.close()
    ep2 = base.open_endpoint("nvme-pi", str(tmp_path / "run9"), data_size=1 << 20, sq_entries=8)
    assert isinstance(ep2, NvmePiEndpoint)
    ep2.close()


def test_identity_order_and_payload_through_many_queue_and_namespace_laps(make, rng):
    """Unaligned, multi-block and one-byte writes; the SQ/CQ (8 entries) and
    the 255-block namespace wrap many times; every AugmentedWrite carries
    the virtual offset, vdisk, seq, flags and bytes the host wrote."""
    ep, sp = make()
    seen = []
    for i in range(300):
        length = rng.choice([1, 512, 4096, 4097, 5000, 12288, 70000])
        voffset = rng.choice([0, 3, 4095, 4096 * rng.randrange(1 << 20), rng.randrange(1 << 40)])
        flags = rng.choice([WFlag.NONE, WFlag.FUA, WFlag.GAP])
        w = write(rng.randbytes(length), vdisk=rng.randrange(N.MAX_VDISK_ID + 1), voffset=voffset, cg=2, seq=i + 1,
                  flags=flags)
        assert sp.submit(w)
        recs = ep.poll()
        assert sp.wait_ack(w.io_id, time.monotonic_ns() + FAR)
        (r,) = recs
        assert (r.io_id, r.cg_id, r.cg_seq, r.vdisk_id, r.op, r.flags, r.voffset, r.length, r.timestamp_ns) == (
            w.io_id, 2, i + 1, w.vdisk_id, Op.WRITE, flags, voffset, length, w.timestamp_ns)
        assert bytes(r.data) == w.data
        seen.append(r.cg_seq)
        del r, recs
        ep.release(w.io_id)
        assert sp.post_outcome(w.io_id, Status.COMMITTED)
        (o,) = ep.poll()
        assert o == Outcome(w.io_id, Status.COMMITTED)
    assert seen == list(range(1, 301))
    st, es = sp.statistics(), ep.statistics()
    assert st.acked == 300 and st.rejected == 0 and st.outcomes == 300
    assert es.writes == 300 and es.outcomes == 300 and es.held == 0 and es.bad == 0
    assert es.released >= 300 * N.EXT > (1 << 20)  # a block a write at least: the 1 MiB area wrapped


def test_pipelined_writes_outcomes_and_non_data_ops_in_order(make, rng):
    ep, sp = make(sq_entries=16)
    ws = [write(rng.randbytes(4096), voffset=4096 * k, seq=k + 1) for k in range(4)]
    z = AugmentedWrite(_records.next_id(), 1, 5, 9, Op.ZERO, WFlag.FUA, 12345, 1 << 30, 11, None)
    t = AugmentedWrite(_records.next_id(), 1, 6, 9, Op.TRIM, WFlag.NONE, 1 << 40, 4096, 12, None)
    b = AugmentedWrite(_records.next_id(), 1, 7, 9, Op.BARRIER, WFlag.NONE, 0, 0, 13, None)
    for w in ws[:2]:
        assert sp.submit(w)
    assert sp.post_outcome(ws[0].io_id, Status.FAILED)
    for w in (*ws[2:], z, t, b):
        assert sp.submit(w)
    recs = ep.poll()
    kinds = [(type(r).__name__, r.io_id) for r in recs]
    assert kinds == [("AugmentedWrite", ws[0].io_id), ("AugmentedWrite", ws[1].io_id), ("Outcome", ws[0].io_id),
                     *[("AugmentedWrite", w.io_id) for w in (*ws[2:], z, t, b)]]
    assert recs[2].status == Status.FAILED
    assert recs[-3:] == [z, t, b]  # the command carries their identity whole
    for w in reversed((*ws, z, t, b)):  # verdicts in any order, matched by CID -> io_id
        assert sp.wait_ack(w.io_id, time.monotonic_ns() + FAR)
    assert sp.take_ack(ws[0].io_id) is None


def corrupt_data(data, off, nb):
    data[off + 1234] ^= 0x40  # a data byte the guard already covers


def test_guard_corruption_is_caught_completed_282h_reported_and_counted(make, rng):
    ep, sp = make()
    refused = []
    ep.on_refused = lambda *a: refused.append(a)
    good = write(rng.randbytes(4096), seq=1)
    assert roundtrip(ep, sp, good)[0]
    head_before = sp.released_position()
    sp.fault_after_pi = corrupt_data
    bad = write(rng.randbytes(8192), vdisk=5, voffset=4096 * 10, cg=3, seq=2)
    ok, *recs = roundtrip(ep, sp, bad)
    assert ok is False and recs == []  # never handed to the pipeline
    sp.fault_after_pi = None
    assert sp.statistics().guard_errors == 1 and sp.statistics().rejected == 1
    assert sp.statistics().refused_status == N.Status.GUARD_CHECK == 0x282
    assert ep.statistics().guard_errors == 1 and ep.statistics().bad == 1
    assert refused == [(bad.io_id, 5, 4096 * 10, 8192, "GUARD_CHECK")]  # the lost log learns it
    assert ep.skipped == [(3, 2)]  # hold skips its seq
    assert sp.released_position() > head_before  # its blocks were freed in order
    # the next write goes through: nothing is stuck
    after = write(rng.randbytes(100), seq=3)
    ok, r = roundtrip(ep, sp, after, release=False)
    assert ok and bytes(r.data) == after.data
    assert ep.statistics().guard_errors == 1


def test_split_reports_the_guard_error_as_a_failure(make, rng):
    """split() itself (submit + spin) with a card polled from the spin's
    point of view: the card runs first here, so the completion waits."""
    ep, sp = make()
    sp.fault_after_pi = corrupt_data
    w = write(rng.randbytes(4096))
    assert sp.submit(w)
    ep.poll()
    assert sp.wait_ack(w.io_id, time.monotonic_ns() + FAR) is False
    assert sp.statistics().guard_errors == 1


@pytest.mark.parametrize("where, status", [
    (N.EXT + N.BLOCK + 3, N.Status.APP_TAG_CHECK),  # block 1's Application Tag (low byte)
    (N.EXT + N.BLOCK + 7, N.Status.REF_TAG_CHECK),  # block 1's Reference Tag (low byte)
])
def test_tags_that_disagree_between_blocks_are_refused(make, rng, where, status):
    ep, sp = make()
    sp.fault_after_pi = lambda data, off, nb: data.__setitem__(off + where, 0xEE)
    w = write(rng.randbytes(3 * 4096))
    ok, *recs = roundtrip(ep, sp, w)
    assert ok is False and recs == []
    assert sp.statistics().refused_status == status and sp.statistics().pi_errors == 1


def test_records_pi_cannot_express_are_refused_without_publishing(make):
    ep, sp = make()
    assert not sp.submit(write(b"x", vdisk=0xFFFF))  # the Application Tag escape
    assert not sp.submit(write(b"x" * 8192, voffset=((1 << 32) - 1) * 4096))  # reference tag past 32 bits
    assert sp.statistics().invalid == 2 and sp.statistics().submitted == 0
    assert ep.poll() == []
    assert roundtrip(ep, sp, write(b"x", voffset=((1 << 32) - 1) * 4096))[0]  # the last LBA fits


def test_timeout_then_late_completion_is_recognised(make):
    ep, sp = make()
    w = write(b"a" * 4096)
    assert sp.submit(w)
    t0 = time.monotonic_ns()
    assert sp.wait_ack(w.io_id, t0 + 2_000_000) is False  # the card did not poll
    assert time.monotonic_ns() - t0 < 1_000_000_000
    ep.poll()
    w2 = write(b"b" * 10)
    ok, r = roundtrip(ep, sp, w2, release=False)
    assert ok and r.io_id == w2.io_id
    assert sp.statistics().late_acks == 1 and sp.statistics().timeouts == 1


def test_detached_write_keeps_its_late_verdict(make):
    ep, sp = make()
    w = write(b"a" * 4096)
    assert sp.submit(w)
    assert sp.detach(w.io_id) is None
    ep.poll()
    assert sp.take_late() == [(w.io_id, True)]


def test_full_sq_refuses_at_once(make):
    ep, sp = make(sq_entries=4)  # NVMe: a queue of 4 holds 3 commands
    ws = [write(b"q" * 10) for _ in range(4)]
    assert all(sp.submit(w) for w in ws[:3])
    assert not sp.submit(ws[3]) and sp.statistics().full_sq == 1
    assert len(ep.poll()) == 3
    assert sp.submit(ws[3])  # the completions told the host the card's SQ head (SQHD)


def test_the_card_stops_consuming_while_the_cq_is_full(make):
    ep, sp = make(sq_entries=8, cq_entries=4)  # a CQ of 4 holds 3 completions
    ws = [write(b"q" * 10) for _ in range(5)]
    assert all(sp.submit(w) for w in ws)
    assert [r.io_id for r in ep.poll()] == [w.io_id for w in ws[:3]]
    assert ep.statistics().cq_full == 1 and ep.poll() == []
    for w in ws[:3]:
        assert sp.wait_ack(w.io_id, time.monotonic_ns() + FAR)  # moves the CQ Head doorbell
    assert [r.io_id for r in ep.poll()] == [w.io_id for w in ws[3:]]
    assert all(sp.wait_ack(w.io_id, time.monotonic_ns() + FAR) for w in ws[3:])


def test_full_namespace_returns_false_and_release_order_frees_the_prefix(make):
    ep, sp = make(data_size=64 * 1024)  # 15 blocks of 4104 bytes
    ws = [write(b"z" * 4096 * 5) for _ in range(4)]
    for w in ws[:3]:
        assert roundtrip(ep, sp, w, release=False)[0]
    assert not sp.submit(ws[3]) and sp.statistics().full_data == 1
    ep.release(ws[1].io_id)  # out of order: nothing freed yet
    assert sp.released_position() == 0
    ep.release(ws[0].io_id)
    assert sp.released_position() == 10 * N.EXT
    assert roundtrip(ep, sp, ws[3], release=False)[0]


def test_a_full_card_refuses_writes_with_namespace_not_ready(make):
    ep, sp = make()
    ep.set_full(True)
    ok, *recs = roundtrip(ep, sp, write(b"f" * 4096, seq=4))
    assert ok is False and recs == [] and ep.statistics().refused_full == 1
    assert sp.statistics().refused_status == N.Status.NS_NOT_READY
    assert ep.skipped == [(1, 4)]
    ep.set_full(False)
    assert roundtrip(ep, sp, write(b"g" * 4096))[0]


def test_a_host_attaching_later_resumes_the_phase_and_positions(make, tmp_path):
    ep, sp = make(sq_entries=4)
    for _ in range(5):  # 5 completions into a CQ of 4: the phase flipped
        assert roundtrip(ep, sp, write(b"r" * 5000))[0]
    sp.close()
    sp2 = NvmePiSplitter.connect(str(ep.socket_path))
    try:
        for _ in range(6):
            assert roundtrip(ep, sp2, write(b"s" * 5000))[0]
        assert sp2.statistics().unknown_acks == 0
    finally:
        sp2.close()


def test_bad_commands_get_error_completions(make, caplog):
    ep, sp = make()
    w = write(b"x" * 4096)
    assert sp.submit(w)
    slot = 0
    sq = ep._sq  # white box: rewrite the command the host published
    c = N.unpack_command(sq, slot)
    for field, value, status in [("cdw12", c.cdw12 | N.PRACT, N.Status.INVALID_FIELD),
                                 ("opc", 0x7F, N.Status.INVALID_OPCODE),
                                 ("slba", 255, N.Status.LBA_OUT_OF_RANGE)]:
        N.pack_command(sq, slot, dataclasses.replace(c, **{field: value}))
        ep._sq_head = slot  # let the card read it again
        ep._ctr[R.Counter.SQ_TAIL] = slot + 1
        assert ep.poll() == []
        got = N.unpack_completion(ep._cq, ((ep._cq_tail - 1) % 8) * 16)
        assert got.status == status, field


def test_a_host_armed_for_acks_is_woken_by_the_completion_eventfd(make):
    """The host sleeps for acks (HOST_WAITING, `arm_wake`): the card writes
    the completion eventfd after posting; the host's look after arming sees a
    completion by its phase tag, not only by CQ_TAIL."""
    ep, sp = make()
    w = write(b"a" * 4096)
    assert sp.submit(w)
    assert sp.arm_wake() is False  # nothing posted: the host may sleep
    with pytest.raises(BlockingIOError):
        os.eventfd_read(sp.wake_fd)
    ep.poll()
    assert os.eventfd_read(sp.wake_fd) == 1  # the card woke the sleeping host
    assert sp.arm_wake() is True  # ... and the completion is there to reap
    sp.disarm_wake()
    sp.reap()
    assert sp.take_ack(w.io_id) is True
    w2 = write(b"b" * 4096)
    assert sp.submit(w2)
    ep.poll()  # nobody waits: no eventfd write
    with pytest.raises(BlockingIOError):
        os.eventfd_read(sp.wake_fd)
    assert sp.arm_wake() is True  # posted before the flag was set: the look after arming finds it
