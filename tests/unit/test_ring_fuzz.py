"""Fuzz the ring and queue entries (issue 11, Build 4): the SQ descriptor and
CQ completion codecs (wire/ring.py), the card's overflow log record decoder
(card/overflow.py) and the card's consumers of the SQ — the inline
`RingEndpoint` and the `RingAcker` with its handoff queue and worker
(`HandoffEndpoint`) — fed descriptors a buggy or hostile host writes
straight into the shared memory.

Rules checked: a codec returns a value or raises its format error
(RingFormatError, TornRecord); a consumer never raises, acks every
write-like entry it consumes exactly once (OK, or FAILED with a reason),
hands on exactly the entries it acked OK (the acker + worker pair: less
those whose payload fails its checksum, which the worker reports lost
instead, as the acker no longer hashes payloads), and writes nothing the host owns
(the SQ, the data area, the host's counters). Derandomized; budgets in
`nicsplit.testing.fuzz` (NICSPLIT_FUZZ_SCALE runs them longer).
"""

from __future__ import annotations

import os
import struct
import tempfile
import zlib

from hypothesis import example, given, strategies as st

from nicsplit.card import overflow as O
from nicsplit.card.handoff import Handoff
from nicsplit.card.hidden import HiddenVolume
from nicsplit.card.transports.ring_acker import RingAcker
from nicsplit.card.transports.ring_endpoint import RingEndpoint
from nicsplit.card.transports.ring_handoff import HandoffEndpoint
from nicsplit.core.records import AugmentedWrite, Op, Outcome, Status, WFlag
from nicsplit.testing.fuzz import fuzz_settings
from nicsplit.wire import ring as R

M32 = 0xFFFFFFFF
u8, u16, u32, u64 = (st.integers(0, (1 << b) - 1) for b in (8, 16, 32, 64))


# -- the codecs --------------------------------------------------------------------------


@fuzz_settings(300)
@given(st.binary(min_size=64, max_size=64), u64)
def test_check_fields_never_raises_on_any_descriptor(raw, position):
    d = R.unpack_descriptor(raw, 0)
    reason = R.validate_descriptor(d, position)
    assert isinstance(reason, R.AckReason)
    assert reason == R.check_fields(d.kind, d.wflags, d.dflags, d.status, d.length, d.data_pos, d.csum, d.seq,
                                    position)
    if reason == R.AckReason.NONE:  # what passes is something the card can act on
        assert d.seq == position & M32 and d.kind in set(R.Kind)
        assert d.wflags & ~3 == 0 and d.dflags & ~1 == 0
        if d.kind == R.Kind.OUTCOME:
            assert d.status in (0, 1) and d.length == 0
        else:
            assert d.status == 0
            assert (d.length > 0) == (d.kind != R.Kind.BARRIER) or d.kind in (R.Kind.ZERO, R.Kind.TRIM)
        if d.kind != R.Kind.WRITE:
            assert d.dflags == d.data_pos == d.csum == 0
    buf = bytearray(64)
    R.pack_descriptor(buf, 0, d)
    assert bytes(buf) == raw  # the layout is a bijection on 64 bytes


@fuzz_settings(200)
@given(st.binary(max_size=200), st.integers(-100, 300))
@example(b"\0" * 10, 0)  # found by this target: struct.error, not RingFormatError
def test_unpack_arbitrary_buffers(buf, offset):
    for unpack in (R.unpack_descriptor, R.unpack_completion):
        try:
            unpack(buf, offset)
        except R.RingFormatError:
            pass
    try:
        R.unpack_identity(buf)
    except R.RingFormatError:
        pass


@fuzz_settings(100)
@given(st.tuples(u64, st.integers(0, 1), u8, u32))
def test_completion_round_trip(fields):
    c = R.Completion(*fields)
    buf = bytearray(16)
    R.pack_completion(buf, 0, c)
    assert R.unpack_completion(buf, 0) == c


# -- the overflow log's record decoder ------------------------------------------------------


def _ow(io, op=Op.WRITE, data=b"x" * 100, flags=WFlag.NONE):
    return AugmentedWrite(io, 1, io, 2, op, flags, io * 4096, len(data) if data is not None else 512, 7, data)


OV_SEED = [_ow(1), _ow(2, Op.ZERO, None), Outcome(1, Status.COMMITTED), _ow(3, data=b""),
           _ow(4, flags=WFlag.FUA | WFlag.GAP), Outcome(4, Status.FAILED), _ow(5, Op.BARRIER, None)]
OV_STREAM = b"".join(h + d for h, d in (O.encode(e) for e in OV_SEED))


def _ov_walk(buf, verify=True):
    """Decode records from the start like OverflowLog._open: a record, None
    (ends inside one) or TornRecord, nothing else."""
    pos, out = 0, []
    while True:
        try:
            r = O.decode(buf, pos, verify=verify)
        except O.TornRecord:
            return out, "torn"
        if r is None:
            return out, "short"
        e, nxt, rflags = r
        assert nxt > pos and isinstance(e, (AugmentedWrite, Outcome))
        if isinstance(e, AugmentedWrite):
            assert e.op in set(Op) and isinstance(e.flags, WFlag)
            if e.data is not None:
                assert len(e.data) == e.length, "a write's payload must be as long as its length"
        out.append(e)
        pos = nxt


def test_overflow_reference_stream_decodes():
    got, end = _ov_walk(OV_STREAM)
    assert end == "short" and len(got) == len(OV_SEED)
    assert [(type(e), e.io_id) for e in got] == [(type(e), e.io_id) for e in OV_SEED]


@fuzz_settings(300)
@given(st.binary(max_size=400), st.booleans())
def test_overflow_decode_random_bytes(buf, verify):
    _ov_walk(buf, verify)


def _refix_crc(buf: bytearray) -> None:
    """Recompute every record's CRC so the decoder's field checks (not only the
    CRC) see the damage."""
    pos = 0
    while pos + O.REC.size <= len(buf):
        dlen = struct.unpack_from("<I", buf, pos + 12)[0]
        end = pos + O.REC.size
        if end + dlen > len(buf):
            return
        c = zlib.crc32(bytes(buf[end:end + dlen]), zlib.crc32(bytes(buf[pos:pos + O.HEAD.size])))
        struct.pack_into("<I", buf, pos + O.HEAD.size, c)
        pos = end + dlen


@fuzz_settings(400)
@given(st.lists(st.tuples(st.integers(0, len(OV_STREAM) - 1), u8), min_size=1, max_size=4),
       st.integers(0, 300), st.booleans())
# found by this target: a write record whose payload is shorter than its length (CRC fixed up) decoded
@example([(12, 0)], 0, True)
def test_overflow_decode_mutated_records(flips, chop, fix_crc):
    buf = bytearray(OV_STREAM)
    for pos, val in flips:
        buf[pos] = val
    del buf[len(buf) - chop:]
    if fix_crc:
        _refix_crc(buf)
    _ov_walk(bytes(buf))


@fuzz_settings(150)
@given(st.lists(st.tuples(st.integers(0, len(OV_STREAM) + 7), u8), max_size=4), st.integers(0, 300),
       st.booleans(), st.integers(1, 4))
# found by this target: a CRC-valid outcome record with a payload length was kept
# at open (its payload ignored, the file cut after its head) and then refused by
# peek() with RuntimeError ("passes the end"): the card could not read its log
@example([(2, 2)], 0, True, 1)
def test_overflow_log_opens_a_damaged_file_at_its_good_prefix(flips, chop, fix_crc, copies):
    """What the card does at restart: open the log (the torn tail is cut),
    then read every entry found. Never an exception; every entry it counted
    is read back, in order, as the prefix of what was written."""
    body = bytearray(OV_STREAM * copies)
    for pos, val in flips:
        body[pos % len(body)] = val
    del body[len(body) - chop:]
    if fix_crc:
        _refix_crc(body)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "overflow.log")
        with open(path, "wb") as f:
            f.write(O.FILE_MAGIC + bytes(body))
        olog = O.OverflowLog(path)
        try:
            n, got = olog.unread, []
            for _ in range(n):
                e = olog.peek()
                assert e is not None
                got.append(e)
                olog.advance()
            assert olog.peek() is None and olog.entries == n
            if not flips:  # only cut short: the whole records before the cut read back exactly
                want = (OV_SEED * copies)[:n]
                assert [(type(e), e.io_id) for e in got] == [(type(e), e.io_id) for e in want]
                assert n == len(OV_SEED) * copies or chop
        finally:
            olog.close()


# -- the SQ consumers ------------------------------------------------------------------------

DATA = R.MIN_DATA
SQN, CQN = 8, 4
# Card-owned u64 slots of the header; every other header byte is the host's or fixed.
CARD_SLOTS = {int(R.Counter.CARD_STATE), int(R.Counter.CARD_HEARTBEAT), int(R.Counter.SQ_HEAD),
              int(R.Counter.CQ_TAIL), int(R.Counter.DATA_HEAD)} | {int(c) for c in R.CardCounter}


@st.composite
def descriptor(draw, io_ids):
    """A descriptor as a host might write it: mostly near-valid fields (so the
    payload range and checksum paths are reached), sometimes raw garbage."""
    if draw(st.integers(0, 9)) == 0:
        return ("raw", draw(st.binary(min_size=64, max_size=64)))
    kind = draw(st.sampled_from([1, 1, 1, 2, 3, 4, 16, 16, 0, 5, 255]))
    length = draw(st.one_of(st.integers(0, 3000), st.sampled_from([0, 1, DATA, DATA + 1, M32])))
    return ("fields", dict(
        kind=kind, wflags=draw(st.sampled_from([0, 0, 1, 2, 3, 4, 255])),
        dflags=draw(st.sampled_from([0, 1, 1, 2])), status=draw(st.sampled_from([0, 0, 1, 2])),
        length=length, io_id=draw(io_ids),
        data_pos=draw(st.sampled_from(["next", "next", "next", "wrapnext", "zero", "back", "far", "big"])),
        csum=draw(st.sampled_from(["good", "good", "bad", "zero"])),
        seq=draw(st.sampled_from(["ok", "ok", "ok", "ok", "stale", "rand"])),
        payload=draw(st.booleans()), vdisk=draw(u32), voffset=draw(u64)))


@st.composite
def rounds(draw, unique_ids=True):
    ids = st.just(None) if unique_ids else st.one_of(st.just(None), st.integers(1, 6))  # None: a fresh id
    return draw(st.lists(st.tuples(
        st.lists(descriptor(ids), min_size=0, max_size=SQN),
        st.sampled_from(["exact", "exact", "exact", "beyond", "behind", "huge"]),   # data_tail
        st.sampled_from(["count", "count", "count", "count", "over", "back"]),      # sq_tail
        st.integers(0, 3),   # how many held writes the worker releases after the round
        st.booleans(),       # the card is full
    ), min_size=1, max_size=6))


class Host:
    """Plays a host that writes whatever it likes into the hidden volume."""

    def __init__(self, ep: RingEndpoint) -> None:
        self.hv = HiddenVolume.attach(ep.volume_path, ep.fake_uid)
        self.c = self.hv.counters
        self.data_tail = 0
        self.next_io = 1000

    def publish(self, descs, tail_mode, sq_mode) -> tuple[list[tuple[int, int, bytes]], int | None]:
        """Write the round's descriptors: (position, kind, 64 bytes) of each,
        and an impossible sq_tail to show the card first (or None). The caller
        publishes sq_tail."""
        c, hv = self.c, self.hv
        tail = c[R.Counter.SQ_TAIL]
        room = SQN - (tail - c[R.Counter.SQ_HEAD])
        assert room >= 0
        out = []
        for i, (how, d) in enumerate(descs[:room]):
            pos = tail + i
            self.next_io += 1
            io_id = self.next_io if how == "raw" or d["io_id"] is None else d["io_id"]
            if how == "raw":
                raw = bytearray(d)
                if i % 2:  # half of them: a fresh id, so the handed-on check can tell them apart
                    struct.pack_into("<Q", raw, 8, io_id)
            else:
                n = d["length"] if d["kind"] == 1 else 0
                n = min(n, 4096)
                start = {"next": self.data_tail, "wrapnext": (self.data_tail // DATA + 1) * DATA,
                         "zero": 0, "back": max(0, self.data_tail - 100), "far": self.data_tail + DATA,
                         "big": (1 << 64) - 1 - n}[d["data_pos"]] if d["kind"] == 1 else 0
                start = min(start, (1 << 64) - 1 - n)
                payload = os.urandom(n) if d["payload"] else bytes(n)
                off = start % DATA
                if n and off + n <= DATA:
                    hv.data[off:off + n] = payload
                if d["kind"] == 1 and off + n <= DATA and start + n < (1 << 64):
                    self.data_tail = max(self.data_tail, start + n)
                csum = {"good": R.payload_checksum(payload), "bad": R.payload_checksum(payload) ^ 1,
                        "zero": 0}[d["csum"]] if d["dflags"] & 1 else 0
                seq = {"ok": pos & M32, "stale": (pos - SQN) & M32, "rand": (pos * 7919 + 13) & M32}[d["seq"]]
                raw = bytearray(64)
                R.DESC.pack_into(raw, 0, d["kind"], d["wflags"], d["dflags"], d["status"], d["length"] & M32,
                                 io_id, 1, 1, d["vdisk"], d["voffset"], 0, start if d["kind"] == 1 else 0,
                                 csum, seq)
            hv.sq[(pos % SQN) * 64:(pos % SQN) * 64 + 64] = raw
            out.append((pos, raw[0], bytes(raw)))
        dt = {"exact": self.data_tail, "beyond": self.data_tail + 5000, "behind": max(0, self.data_tail - 50),
              "huge": (1 << 64) - 1}[tail_mode]
        c[R.Counter.DATA_TAIL] = min(dt, (1 << 64) - 1)
        head = c[R.Counter.SQ_HEAD]
        bogus = {"count": None, "over": head + SQN + 1, "back": head - 1 if head else None}[sq_mode]
        return out, bogus

    def snapshot(self) -> tuple:
        hdr = bytes(self.hv.header)
        host_hdr = b"".join(hdr[i * 8:i * 8 + 8] for i in range(R.HEADER_SIZE // 8) if i not in CARD_SLOTS)
        return host_hdr, bytes(self.hv.sq), bytes(self.hv.data)

    def completions(self) -> list[R.Completion]:
        c, out = self.c, []
        while c[R.Counter.CQ_HEAD] != c[R.Counter.CQ_TAIL]:
            h = c[R.Counter.CQ_HEAD]
            comp = R.unpack_completion(self.hv.cq, (h % CQN) * 16)
            assert comp.seq == h & M32, "a completion must carry its CQ position"
            out.append(comp)
            c[R.Counter.CQ_HEAD] = h + 1
        return out

    def close(self) -> None:
        self.hv.close()


def _bad_payload(host, raw) -> bool:
    """A WRITE whose payload in the data area does not match its checksum."""
    d = R.unpack_descriptor(raw, 0)
    if d.kind != R.Kind.WRITE or not d.dflags & 1:
        return False
    off = d.data_pos % DATA
    return R.payload_checksum(host.hv.data[off:off + d.length]) != d.csum


def _check_round(host, before, published, consumed, got, lost=None):
    """What one poll/pump must have done with the round's entries. ``lost``
    (acker + worker): the io ids the worker reported lost this round; the
    acker acks without hashing payloads, so an entry acked OK whose payload
    fails its checksum must be reported lost instead of handed on."""
    assert host.snapshot() == before, "the card wrote into memory the host owns"
    comps = host.completions()
    taken = published[:consumed]
    acked = [(p, k, raw) for p, k, raw in taken if k != R.Kind.OUTCOME]
    assert [c.io_id for c in comps] == [struct.unpack_from("<Q", raw, 8)[0] for _, _, raw in acked], \
        "every consumed write-like entry gets exactly one completion, in order"
    for c in comps:
        assert c.status in (R.AckStatus.OK, R.AckStatus.FAILED)
        assert (c.status == R.AckStatus.FAILED) == (c.reason != 0) and c.reason in set(R.AckReason)
    ok_writes = [raw for (_, _, raw), c in zip(acked, comps) if c.status == R.AckStatus.OK]
    if lost is not None:
        caught = [raw for raw in ok_writes if _bad_payload(host, raw)]
        assert lost == [struct.unpack_from("<Q", r, 8)[0] for r in caught], \
            "an acked write whose payload fails its checksum goes to the lost log, and nothing else does"
        ok_writes = [raw for raw in ok_writes if not _bad_payload(host, raw)]
    got_writes = [e for e in got if isinstance(e, AugmentedWrite)]
    assert [e.io_id for e in got_writes] == [struct.unpack_from("<Q", r, 8)[0] for r in ok_writes], \
        "exactly the entries acked OK are handed on"
    for e, raw in zip(got_writes, ok_writes):
        d = R.unpack_descriptor(raw, 0)
        assert (e.op, e.length, e.vdisk_id, e.voffset) == (d.kind, d.length, d.vdisk_id, d.voffset)
        if e.op == Op.WRITE:
            assert len(e.data) == d.length
            if d.dflags & 1:
                assert R.payload_checksum(e.data) == d.csum
    return comps


def _drive(set_full, poll, release, host, plan, lost=None):
    held: list[int] = []
    pending: list[tuple[int, int, bytes]] = []  # published, not yet consumed
    c = host.c
    for descs, tail_mode, sq_mode, n_release, full in plan:
        set_full(full)
        published, bogus = host.publish(descs, tail_mode, sq_mode)
        head = c[R.Counter.SQ_HEAD]
        if bogus is not None:  # an impossible tail is ignored, not obeyed
            c[R.Counter.SQ_TAIL] = bogus
            before = host.snapshot()
            assert poll() == []
            assert c[R.Counter.SQ_HEAD] == head and host.snapshot() == before and host.completions() == []
        c[R.Counter.SQ_TAIL] = head + len(pending) + len(published)
        pending += published
        before = host.snapshot()
        got = poll()
        consumed = c[R.Counter.SQ_HEAD] - head
        assert 0 <= consumed <= len(pending)
        _check_round(host, before, pending, consumed, got, lost)
        if lost is not None:
            lost.clear()
        del pending[:consumed]
        held += [e.io_id for e in got if isinstance(e, AugmentedWrite) and e.data is not None]
        for e in got:
            if isinstance(e, AugmentedWrite) and e.data is not None:
                e.data = None  # the views must go before the mapping closes
        for io in held[:n_release]:
            release(io)
        del held[:n_release]


@fuzz_settings(60)
@given(rounds(unique_ids=False))
def test_inline_endpoint_acks_whatever_the_host_writes(plan):
    with tempfile.TemporaryDirectory() as d:
        ep = RingEndpoint(os.path.join(d, "run"), data_size=DATA, sq_entries=SQN, cq_entries=CQN)
        host = Host(ep)
        try:
            _drive(ep.set_full, ep.poll, ep.release, host, plan)
        finally:
            host.close()
            ep.close()


@fuzz_settings(60)
@given(rounds())
def test_acker_and_worker_ack_whatever_the_host_writes(plan):
    with tempfile.TemporaryDirectory() as d:
        ho = Handoff.create(slots=8)
        acker = RingAcker(os.path.join(d, "run"), handoff=ho, data_size=DATA, sq_entries=SQN, cq_entries=CQN)
        worker_ho = Handoff(os.dup(ho.fd))
        lost: list[int] = []
        worker = HandoffEndpoint(worker_ho, acker.volume_path, acker.fake_uid, acker.wake_fd,
                                 on_refused=lambda io_id, *_: lost.append(io_id))
        host = Host(acker)

        def poll():
            acker.pump()
            slots = bytes(ho.slots)
            out = worker.poll()
            assert bytes(ho.slots) == slots, "the worker must not write the acker's slots"
            return out

        try:  # full: the worker asks the acker to refuse (handoff FULL)
            _drive(worker.set_full, poll, worker.release, host, plan, lost)
        finally:
            host.close()
            worker.close()
            worker_ho.close()
            os.close(worker_ho.fd)
            acker.close()
            ho.close()
            os.close(ho.fd)


def test_acker_refuses_a_duplicate_io_id_of_a_held_write():
    dup = [("fields", dict(kind=1, wflags=0, dflags=1, status=0, length=100, io_id=7, data_pos="next",
                           csum="good", seq="ok", payload=True, vdisk=1, voffset=0))] * 2
    test_acker_and_worker_ack_whatever_the_host_writes.hypothesis.inner_test([(dup, "exact", "count", 0, False)])
