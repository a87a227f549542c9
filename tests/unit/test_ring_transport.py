"""Ring transport in one process: RingSplitter + RingEndpoint, the card polled
manually between submit and wait (or from a thread)."""

from __future__ import annotations

import os
import random
import sys
import threading
import time

import pytest

from nicsplit.card.hidden import HiddenVolume
from nicsplit.core.records import AugmentedWrite, Op, Outcome, Status, WFlag
from nicsplit.card.transports import base
from nicsplit.card.transports.base import CardEndpoint, SplitterTransport, TransportUnavailable
from nicsplit.card.transports.ring_endpoint import RingEndpoint
from nicsplit.card.transports.ring_splitter import RingSplitter
from nicsplit.testing.procs import call_within, wait_for
from nicsplit.testing.splitpair import WriteMaker, split_pairs
from nicsplit.wire import ring as R

MS = 1_000_000
FAR = 10 * 1_000_000_000  # a deadline we never mean to reach
AT_ONCE = FAR / 2e9  # s: a call that waited for FAR would miss it


def _check_gone(ep: RingEndpoint) -> None:
    assert not os.path.exists(ep.volume_path), "card close must unlink the hidden volume"
    assert not ep.socket_path.exists()


@pytest.fixture
def make(tmp_path):
    """make(**endpoint options) -> (endpoint, splitter); both closed after the test."""
    with split_pairs(tmp_path, RingEndpoint, RingSplitter, _check_gone) as pair:
        yield lambda stale_after_ns=60 * 1_000_000_000, checksum=True, **opts: pair(
            opts, {"stale_after_ns": stale_after_ns, "checksum": checksum})


_records = WriteMaker()
write, other = _records.write, _records.other


def roundtrip(ep: RingEndpoint, sp: RingSplitter, w: AugmentedWrite, release=True) -> list:
    assert sp.submit(w)
    recs = ep.poll()
    assert sp.wait_ack(w.io_id, time.monotonic_ns() + FAR)
    if release:
        for r in recs:
            if isinstance(r, AugmentedWrite) and r.op == Op.WRITE:
                ep.release(r.io_id)
    return recs


def test_protocols_and_registry(make):
    ep, sp = make(data_size=R.MIN_DATA, sq_entries=8)
    assert isinstance(sp, SplitterTransport) and isinstance(ep, CardEndpoint)
    with pytest.raises(ValueError, match="unknown transport 'carrier-pigeon'"):
        base.open_splitter("carrier-pigeon", "x")
    sp.close()  # one host at a time: make room for the next
    sp2 = base.open_splitter("ring", str(ep.socket_path))
    assert isinstance(sp2, RingSplitter)
    sp2.close()


def test_order_fields_and_payload_preserved(make, rng):
    ep, sp = make(data_size=1 << 20, sq_entries=64)
    sent = []
    for i in range(40):
        k = rng.randrange(5)
        if k == 0:
            w = other(Op.ZERO, 4096 * rng.randrange(1, 9), voffset=4096 * i, seq=i + 1, vdisk=2)
        elif k == 1:
            w = other(Op.TRIM, 512, voffset=512 * i, seq=i + 1, flags=WFlag.FUA)
        elif k == 2:
            w = other(Op.BARRIER, 0, seq=i + 1)
        else:
            w = write(rng.randbytes(rng.randrange(1, 20000)), voffset=rng.randrange(1 << 40), seq=i + 1,
                      cg=7, vdisk=2**32 - 1, flags=WFlag(rng.randrange(2)))
        assert sp.submit(w)
        sent.append(w)
    got = ep.poll(max_entries=1000)
    assert [r.io_id for r in got] == [w.io_id for w in sent]
    for w, r in zip(sent, got):
        assert (r.cg_id, r.cg_seq, r.vdisk_id, r.op, r.flags, r.voffset, r.length, r.timestamp_ns) == \
               (w.cg_id, w.cg_seq, w.vdisk_id, w.op, w.flags, w.voffset, w.length, w.timestamp_ns)
        assert type(r.op) is Op and type(r.flags) is WFlag
        if w.op == Op.WRITE:
            assert isinstance(r.data, memoryview) and bytes(r.data) == w.data
        else:
            assert r.data is None
    for w in sent:  # acks matched by io_id
        assert sp.wait_ack(w.io_id, time.monotonic_ns() + FAR)
    st = sp.statistics()
    assert st.submitted == st.acked == 40 and st.timeouts == 0
    est = ep.statistics()
    assert est.entries == est.writes == 40 and est.bad == 0


def test_acks_matched_by_io_id_in_any_order(make):
    ep, sp = make(data_size=R.MIN_DATA, sq_entries=8)
    ws = [write(b"x" * 100) for _ in range(3)]
    for w in ws:
        assert sp.submit(w)
    ep.poll()
    for w in reversed(ws):  # wait for the last one first: the others' verdicts are parked
        assert sp.wait_ack(w.io_id, time.monotonic_ns() + FAR)
    assert sp.statistics().acked == 3 and sp.statistics().unknown_acks == 0


def test_wraparound_of_sq_and_data_area_many_times(make, rng):
    ep, sp = make(data_size=R.MIN_DATA, sq_entries=4, cq_entries=2)
    total = 0
    for i in range(3000):
        data = rng.randbytes(rng.choice([1, 511, 4096, 10000, 30000, R.MIN_DATA // 2]))
        w = write(data, seq=i + 1)
        recs = roundtrip(ep, sp, w, release=False)
        assert len(recs) == 1 and bytes(recs[0].data) == data
        recs[0].data = None
        ep.release(w.io_id)
        total += len(data)
        if i % 7 == 0:
            assert sp.post_outcome(w.io_id, Status.COMMITTED)
            assert ep.poll() == [Outcome(w.io_id, Status.COMMITTED)]
    st = sp.statistics()
    assert st.acked == 3000 and st.bytes == total
    assert total > 100 * R.MIN_DATA  # the data area wrapped >100 times
    assert sp._ctr[R.Counter.SQ_TAIL] > 500 * 4  # and the SQ many hundred times
    est = ep.statistics()
    assert est.held == 0 and est.held_bytes == 0 and est.released >= total


def test_full_sq_returns_false_at_once(make):
    ep, sp = make(data_size=R.MIN_DATA, sq_entries=4)
    for i in range(4):
        assert sp.post_outcome(1000 + i, Status.COMMITTED)
    assert call_within(AT_ONCE, "split on a full SQ", sp.split, write(b"a" * 10), FAR) is False  # no waiting for room
    assert call_within(AT_ONCE, "post_outcome on a full SQ", sp.post_outcome, 2000, Status.FAILED) is False
    st = sp.statistics()
    assert st.full_sq == 2 and st.timeouts == 0
    assert [r.io_id for r in ep.poll()] == [1000, 1001, 1002, 1003]
    roundtrip(ep, sp, write(b"b" * 10))  # room again


def test_full_data_area_returns_false_at_once_and_out_of_order_release(make):
    ep, sp = make(data_size=R.MIN_DATA, sq_entries=64)
    chunk = R.MIN_DATA // 4
    held = [roundtrip(ep, sp, write(bytes([i]) * chunk), release=False)[0] for i in range(4)]
    assert call_within(AT_ONCE, "split on a full data area", sp.split, write(b"z" * 100), FAR) is False
    assert sp.statistics().full_data == 1
    data_head = lambda: ep._ctr[R.Counter.DATA_HEAD]  # noqa: E731
    # release out of order: nothing frees until the oldest goes
    for i in (2, 1, 3):
        held[i].data = None
        ep.release(held[i].io_id)
        assert data_head() == 0
    assert sp.split(write(b"z" * 100), timeout_ns=FAR) is False
    held[0].data = None
    ep.release(held[0].io_id)
    assert data_head() == R.MIN_DATA  # all four freed at once
    roundtrip(ep, sp, write(b"z" * chunk))
    with pytest.raises(KeyError, match="not held"):
        ep.release(held[0].io_id)


def test_out_of_order_release_advances_over_contiguous_prefix_only(make, rng):
    ep, sp = make(data_size=R.MIN_DATA, sq_entries=64)
    recs = [roundtrip(ep, sp, write(b"q" * 1000), release=False)[0] for _ in range(10)]
    ends = [(i + 1) * 1000 for i in range(10)]
    order = list(range(10))
    rng.shuffle(order)
    released = set()
    for i in order:
        recs[i].data = None
        ep.release(recs[i].io_id)
        released.add(i)
        prefix = 0
        while prefix in released:
            prefix += 1
        assert ep._ctr[R.Counter.DATA_HEAD] == (ends[prefix - 1] if prefix else 0)


def test_outcomes_arrive_after_their_writes(make):
    ep, sp = make(data_size=R.MIN_DATA, sq_entries=16)
    w1, w2 = write(b"1" * 100), write(b"2" * 100)
    assert sp.submit(w1)
    assert sp.post_outcome(w1.io_id, Status.COMMITTED)
    assert sp.submit(w2)
    assert sp.post_outcome(w2.io_id, Status.FAILED)
    got = ep.poll()
    assert [(type(r).__name__, r.io_id) for r in got] == [
        ("AugmentedWrite", w1.io_id), ("Outcome", w1.io_id), ("AugmentedWrite", w2.io_id), ("Outcome", w2.io_id)]
    assert got[1].status is Status.COMMITTED and got[3].status is Status.FAILED
    assert sp.wait_ack(w1.io_id, time.monotonic_ns() + FAR) and sp.wait_ack(w2.io_id, time.monotonic_ns() + FAR)
    assert ep.statistics().outcomes == 2
    assert sp._ctr[R.Counter.CQ_TAIL] == 2  # outcomes get no completion


def test_timeout_then_late_ack_is_recognised(make):
    ep, sp = make(data_size=R.MIN_DATA, sq_entries=8)
    w = write(b"late" * 10)
    t0 = time.monotonic_ns()
    assert sp.split(w, timeout_ns=1 * MS) is False  # nobody polls
    assert time.monotonic_ns() - t0 < 50 * MS  # generous: the point is that it returns
    st = sp.statistics()
    assert st.timeouts == 1 and st.abandoned == 1
    ep.poll()  # the card gets to it late and acks
    roundtrip(ep, sp, write(b"next"))
    st = sp.statistics()
    assert st.late_acks == 1 and st.abandoned == 0 and st.acked == 1


def test_doorbell_only_when_card_sleeps(make):
    ep, sp = make(data_size=R.MIN_DATA, sq_entries=8)
    roundtrip(ep, sp, write(b"a"))
    assert sp.statistics().doorbells == 0
    ep.set_sleeping(True)
    assert sp.submit(w := write(b"b"))
    assert sp.statistics().doorbells == 1
    assert os.eventfd_read(ep.doorbell_fd()) == 1
    ep.set_sleeping(False)
    ep.poll()
    assert sp.wait_ack(w.io_id, time.monotonic_ns() + FAR)
    assert sp.post_outcome(w.io_id, Status.COMMITTED)
    assert sp.statistics().doorbells == 1


def test_wait_doorbell_rechecks_the_sq_before_sleeping(make):
    """No lost wake-up: work published while the card was deciding to sleep
    (so the host saw POLLING and did not ring) is found by the re-check."""
    ep, sp = make(data_size=R.MIN_DATA, sq_entries=8)
    assert sp.submit(w := write(b"x"))
    assert sp.statistics().doorbells == 0
    assert call_within(2.5, "wait_doorbell with work already in the SQ", ep.wait_doorbell, 5.0) is True
    assert ep._ctr[R.Counter.CARD_STATE] == R.CardState.POLLING
    ep.poll()
    assert sp.wait_ack(w.io_id, time.monotonic_ns() + FAR)
    # idle: sleeps the whole timeout, heartbeats, returns False
    hb = ep._ctr[R.Counter.CARD_HEARTBEAT]
    assert ep.wait_doorbell(0.01) is False
    assert ep._ctr[R.Counter.CARD_HEARTBEAT] > hb
    assert ep.statistics().sleeps == 1


def test_card_thread_sleeping_and_woken_by_doorbell(make):
    ep, sp = make(data_size=256 * 1024, sq_entries=16)
    stop = threading.Event()
    payloads: dict[int, bytes] = {}

    def card():
        while not stop.is_set():
            recs = ep.poll()
            for r in recs:
                if isinstance(r, AugmentedWrite):
                    payloads[r.io_id] = bytes(r.data)
                    r.data = None
                    ep.release(r.io_id)
            if not recs:
                ep.wait_doorbell(0.005)
            ep.heartbeat()

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # the host spins holding the GIL; let the card thread in
    t = threading.Thread(target=card)
    t.start()
    try:
        rng = random.Random(5)
        sent = {}
        for i in range(300):
            w = write(rng.randbytes(rng.randrange(1, 8000)))
            sent[w.io_id] = w.data
            assert sp.split(w, timeout_ns=5 * 1_000_000_000)
            if i % 50 == 0:  # wait for the card to fall asleep so the doorbell path runs
                wait_for(lambda: ep._ctr[R.Counter.CARD_STATE] == R.CardState.SLEEPING, 5, "the card asleep",
                         interval=0.001)
    finally:
        stop.set()
        t.join()
        sys.setswitchinterval(old)
    assert payloads == sent
    assert sp.statistics().doorbells >= 1 and ep.statistics().wakeups >= 1


def test_stale_heartbeat_and_recovery(make):
    ep, sp = make(stale_after_ns=20 * MS, data_size=R.MIN_DATA, sq_entries=8)
    ep.heartbeat()
    assert sp.healthy()
    wait_for(lambda: not sp.healthy(), 5, "the heartbeat to go stale", interval=0.005)
    assert sp.split(write(b"x"), timeout_ns=FAR) is False
    assert sp.statistics().unhealthy == 1 and sp.statistics().submitted == 0
    ep.heartbeat()
    assert sp.healthy()
    roundtrip(ep, sp, write(b"y"))


def test_card_close_makes_host_unhealthy(make, tmp_path):
    ep, sp = make(data_size=R.MIN_DATA, sq_entries=8)
    ep.close()
    assert not os.path.exists(ep.volume_path)
    assert not sp.healthy()
    assert sp.split(write(b"x"), timeout_ns=FAR) is False
    assert sp.post_outcome(1, Status.COMMITTED) is False


def test_connect_failures_and_one_host_at_a_time(make, tmp_path):
    with pytest.raises(TransportUnavailable, match="card.sock"):
        RingSplitter.connect(str(tmp_path / "nowhere" / "card.sock"), timeout=0.2)
    ep, sp = make(data_size=R.MIN_DATA, sq_entries=8)
    roundtrip(ep, sp, write(b"first"))
    with pytest.raises(TransportUnavailable, match="another host"):
        RingSplitter.connect(str(ep.socket_path), timeout=1)
    sp.close()
    # the card notices the host left and accepts the next one, which resumes the rings
    def attach():
        try:
            return RingSplitter.connect(str(ep.socket_path), timeout=1, stale_after_ns=FAR)
        except TransportUnavailable:
            return None

    sp2 = wait_for(attach, 5, "the card to accept a new host")
    try:
        for _ in range(20):
            roundtrip(ep, sp2, write(b"second" * 100))
        assert sp2.statistics().acked == 20 and ep.statistics().writes == 21
    finally:
        sp2.close()


def test_second_card_on_the_same_run_dir_is_refused(make, tmp_path):
    ep, sp = make(data_size=R.MIN_DATA, sq_entries=8)
    with pytest.raises(FileExistsError, match="already serving"):
        RingEndpoint(ep.run_dir, data_size=R.MIN_DATA, sq_entries=8)


def test_stale_socket_of_a_dead_card_is_replaced(tmp_path):
    import socket

    run = tmp_path / "run"
    run.mkdir()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(str(run / "card.sock"))
    s.close()  # bound, never listening: a dead card's leftover
    ep = RingEndpoint(run, data_size=R.MIN_DATA, sq_entries=8)
    try:
        sp = RingSplitter.connect(str(ep.socket_path))
        sp.close()
    finally:
        ep.close()


def test_records_that_do_not_fit_are_refused_without_publishing(make):
    ep, sp = make(data_size=R.MIN_DATA, sq_entries=8)
    bad = write(b"x" * 10, cg=2**32)  # cg_id is u32 on the ring
    assert sp.split(bad, timeout_ns=FAR) is False
    short = write(b"x" * 10)
    short.length = 11
    assert sp.split(short, timeout_ns=FAR) is False
    assert sp.split(write(b"x" * (R.MIN_DATA + 1)), timeout_ns=FAR) is False  # larger than the area
    st = sp.statistics()
    assert st.invalid == 2 and st.full_data == 1 and st.submitted == 0
    assert ep.poll() == []
    roundtrip(ep, sp, write(b"fine"))


def test_no_checksum_mode(make):
    ep, sp = make(checksum=False, data_size=R.MIN_DATA, sq_entries=8)
    recs = roundtrip(ep, sp, write(b"unchecked" * 10))
    assert bytes(recs[0].data) == b"unchecked" * 10


# -- a misbehaving host: descriptors written by hand ---------------------------------


class RawHost:
    """Writes descriptors straight into the rings (what a buggy host could do)."""

    def __init__(self, ep: RingEndpoint) -> None:
        self.hv = HiddenVolume.attach(ep.volume_path, ep.fake_uid)
        self.c = self.hv.counters

    def publish(self, *, kind=1, wflags=0, dflags=0, status=0, length=0, io_id=1, data_pos=0, csum=0,
                seq=None, payload: bytes | None = None, data_tail=None) -> None:
        tail = self.c[R.Counter.SQ_TAIL]
        if payload is not None:
            off = data_pos % len(self.hv.data)
            self.hv.data[off: off + len(payload)] = payload
        R.pack_descriptor(self.hv.sq, (tail % self.hv.geometry.sq_entries) * 64, R.Descriptor(
            kind, wflags, dflags, status, length, io_id, 1, 1, 1, 0, 0, data_pos, csum,
            (tail if seq is None else seq) & 0xFFFFFFFF))
        if data_tail is not None:
            self.c[R.Counter.DATA_TAIL] = data_tail
        self.c[R.Counter.SQ_TAIL] = tail + 1

    def completions(self) -> list[R.Completion]:
        out = []
        while self.c[R.Counter.CQ_HEAD] != self.c[R.Counter.CQ_TAIL]:
            h = self.c[R.Counter.CQ_HEAD]
            out.append(R.unpack_completion(self.hv.cq, (h % self.hv.geometry.cq_entries) * 16))
            self.c[R.Counter.CQ_HEAD] = h + 1
        return out

    def close(self):
        self.hv.close()


def test_bad_descriptors_get_failed_completions(make, caplog):
    ep, sp = make(data_size=R.MIN_DATA, sq_entries=16)
    sp.close()
    raw = RawHost(ep)
    try:
        good = b"g" * 100
        raw.publish(kind=9, io_id=10)
        raw.publish(kind=1, io_id=11, length=100, seq=12345, payload=good, data_tail=100)
        raw.publish(kind=1, io_id=12, length=100, data_pos=0, dflags=1, csum=R.payload_checksum(good) ^ 1,
                    payload=good, data_tail=100)
        raw.publish(kind=1, io_id=13, length=100, data_pos=R.MIN_DATA + 1000)  # beyond the final data_tail
        raw.publish(kind=1, io_id=14, length=100, data_pos=R.MIN_DATA - 50, payload=None,
                    data_tail=R.MIN_DATA + 50)  # straddles the end of the area
        raw.publish(kind=4, io_id=15, length=512)  # barrier with a length
        raw.publish(kind=1, io_id=16, length=100, data_pos=R.MIN_DATA + 50, dflags=1,
                    csum=R.payload_checksum(good), payload=good, data_tail=R.MIN_DATA + 150)  # good
        raw.publish(kind=1, io_id=16, length=100, data_pos=R.MIN_DATA + 150, payload=good,
                    data_tail=R.MIN_DATA + 250)  # duplicate io_id while 16 is held
        raw.publish(kind=16, io_id=16, status=7)  # outcome with an unknown status: dropped
        raw.publish(kind=16, io_id=16, status=0)
        got = ep.poll()
        assert [(type(r).__name__, r.io_id) for r in got] == [("AugmentedWrite", 16), ("Outcome", 16)]
        assert bytes(got[0].data) == good
        cq = raw.completions()
        assert [(c.io_id, c.status, R.AckReason(c.reason)) for c in cq] == [
            (10, 1, R.AckReason.BAD_KIND), (11, 1, R.AckReason.BAD_SEQ), (12, 1, R.AckReason.BAD_CHECKSUM),
            (13, 1, R.AckReason.BAD_RANGE), (14, 1, R.AckReason.BAD_RANGE), (15, 1, R.AckReason.BAD_FIELD),
            (16, 0, R.AckReason.NONE), (16, 1, R.AckReason.DUPLICATE)]
        assert [c.seq for c in cq] == list(range(8))
        assert ep.statistics().bad == 8
        assert "refused io 12" in caplog.text and "BAD_CHECKSUM" in caplog.text
        # the refused payloads' space is reclaimed with the good one
        got[0].data = None
        ep.release(16)
        assert ep._ctr[R.Counter.DATA_HEAD] == R.MIN_DATA + 250
        # a host publishing an impossible tail is ignored, not obeyed
        raw.c[R.Counter.SQ_TAIL] = raw.c[R.Counter.SQ_TAIL] + 1000
        assert ep.poll() == []
    finally:
        raw.close()


def test_card_stops_consuming_when_cq_is_full(make):
    ep, sp = make(data_size=R.MIN_DATA, sq_entries=8, cq_entries=2)
    ws = [write(b"w" * 10) for _ in range(4)]
    for w in ws:
        assert sp.submit(w)
    assert [r.io_id for r in ep.poll()] == [ws[0].io_id, ws[1].io_id]  # CQ full: the rest waits in the SQ
    assert ep.statistics().cq_full == 1
    assert sp.wait_ack(ws[0].io_id, time.monotonic_ns() + FAR)  # host drains the CQ
    assert [r.io_id for r in ep.poll()] == [ws[2].io_id, ws[3].io_id]
    for w in ws[1:]:
        assert sp.wait_ack(w.io_id, time.monotonic_ns() + FAR)


def test_full_card_refuses_writes_at_once_and_frees_their_space(make):
    ep, sp = make(data_size=R.MIN_DATA, sq_entries=8)
    ep.set_full(True)
    w = write(b"f" * 1000)
    assert sp.submit(w)
    assert ep.poll() == []
    assert sp.wait_ack(w.io_id, time.monotonic_ns() + FAR) is False  # refused, not timed out
    st = sp.statistics()
    assert st.rejected == 1 and st.timeouts == 0
    assert ep.statistics().refused_full == 1 and ep.statistics().bad == 0
    assert ep._ctr[R.Counter.DATA_HEAD] == 1000  # its payload space is free again
    assert sp.post_outcome(w.io_id, Status.FAILED)
    assert ep.poll() == [Outcome(w.io_id, Status.FAILED)]  # outcomes still flow
    ep.set_full(False)
    roundtrip(ep, sp, write(b"ok"))


def test_detached_write_stays_in_flight_and_its_late_verdict_is_kept(make):
    """A late ack is not a lost write: after `detach` the write is still in
    the ring, the card takes it in order, and its verdict reaches `take_late`."""
    ep, sp = make(data_size=R.MIN_DATA, sq_entries=8)
    w1, w2 = write(b"late" * 10), write(b"next" * 10)
    assert sp.submit(w1)
    assert sp.detach(w1.io_id) is None  # no verdict yet: late, not failed
    assert sp.statistics().late == 1 and sp.take_late() == []
    assert sp.submit(w2)
    got = ep.poll()
    assert [r.io_id for r in got] == [w1.io_id, w2.io_id]  # in ring order, payload intact
    assert bytes(got[0].data) == w1.data
    assert sp.wait_ack(w2.io_id, time.monotonic_ns() + FAR)  # w1's ack is drained on the way
    assert sp.take_late() == [(w1.io_id, True)]
    st = sp.statistics()
    assert st.late == 0 and st.late_acks == 1 and st.acked == 2 and st.timeouts == 1


def test_detached_write_refused_later_reports_the_refusal(make):
    ep, sp = make(data_size=R.MIN_DATA, sq_entries=8)
    w = write(b"r" * 100)
    assert sp.submit(w)
    assert sp.detach(w.io_id) is None
    ep.set_full(True)
    assert ep.poll() == []  # refused: acked FAILED
    assert sp.take_late() == [(w.io_id, False)]
    assert sp.statistics().rejected == 1


def test_detach_after_the_verdict_returns_it(make):
    ep, sp = make(data_size=R.MIN_DATA, sq_entries=8)
    w = write(b"quick")
    assert sp.submit(w)
    ep.poll()
    sp.reap()
    assert sp.detach(w.io_id) is True  # the ack was there: not late
    assert sp.statistics().late == 0 and sp.take_late() == []


def test_refused_writes_are_reported_for_the_lost_log(make):
    """A refusal may reach a host that already answered its client (a late
    write) and then died: the card reports each one (the card process puts it
    in the lost log the host reads at its next start)."""
    ep, sp = make(data_size=R.MIN_DATA, sq_entries=8)
    seen: list = []
    ep.on_refused = lambda *a: seen.append(a)
    ep.set_full(True)
    w = write(b"f" * 300, vdisk=9, voffset=8192)
    b = other(Op.BARRIER)
    assert sp.submit(w) and sp.submit(b)
    ep.poll()
    assert seen == [(w.io_id, 9, 8192, 300, "FULL")]  # the barrier has no region to report
