"""The net transport's sans-IO state (`nicsplit.card.transports.net_state`):
writes in, Batch frames out (decoded here by the appliance's own codecs,
fed byte by byte), Acks in, verdicts out."""

from __future__ import annotations

import os

import pytest

from nicsplit.card.transports.net_state import NetProtocolError, NetState
from nicsplit.core.records import AugmentedWrite, Op, WFlag
from nicsplit.wire.frames import (
    NEED_DATA, PROTOCOL_VERSION, Ack, Batch, Error, FrameDecoder, Heartbeat, Hello, HelloAck, batch_aad, decode_records,
)
from nicsplit.wire.envelope import unseal

KEY = bytes(range(32))


def w(io_id: int, seq: int, cg_id: int = 1, *, op: Op = Op.WRITE, data: bytes | bytearray | None = None,
      off: int = 0) -> AugmentedWrite:
    data = (bytes([io_id & 0xFF]) * 4096) if data is None and op == Op.WRITE else data
    return AugmentedWrite(io_id, cg_id, seq, 7, op, WFlag.GAP if seq % 2 else WFlag(0), off,
                          len(data) if data is not None else (4096 if op != Op.BARRIER else 0),
                          1_000_000 + seq, data)


def state(key: bytes | None = KEY) -> NetState:
    st = NetState({1: "cg1", 2: "cg2"}, key=key)
    st.connected(HelloAck("app", PROTOCOL_VERSION, {"cg1": 0, "cg2": 5}))
    return st


def frames(wire: bytes) -> list:
    dec, out = FrameDecoder(), []
    for i in range(len(wire)):  # byte by byte: every split point
        dec.receive_data(wire[i:i + 1])
        while (f := dec.next_event()) is not NEED_DATA:
            out.append(f)
    return out


def test_hello_names_every_cg_and_helloack_is_checked():
    st = NetState({1: "cg1", 2: "cg2"}, key=None)
    (h,) = frames(st.hello("host-x"))
    assert h == Hello("host-x", PROTOCOL_VERSION, ("cg1", "cg2"))
    with pytest.raises(NetProtocolError, match="protocol 9"):
        st.connected(HelloAck("app", 9, {}))
    with pytest.raises(NetProtocolError, match="refused: error 5"):
        st.connected(Error(5, "no"))
    with pytest.raises(NetProtocolError, match="expected HelloAck"):
        st.connected(Heartbeat(1))
    st.connected(HelloAck("app", PROTOCOL_VERSION, {"cg1": 3}))
    assert st.accepted == {"cg1"} and st.resume == {"cg1": 3}
    assert not st.add(w(1, 4, cg_id=2))  # cg2 not accepted: refused at add (the splitter marks)
    assert st.add(w(2, 4, cg_id=1))


@pytest.mark.parametrize("key", [KEY, None])
def test_records_carry_the_virtual_identity_and_a_copy_of_the_payload(key):
    st = state(key)
    buf = bytearray(os.urandom(8192))
    writes = [w(10, 1, data=buf, off=1 << 20), w(11, 2, op=Op.ZERO, off=8192), w(12, 3, op=Op.BARRIER),
              w(13, 4, data=b"z" * 512, off=512)]
    for x in writes:
        assert st.add(x)
    want = bytes(buf)
    buf[:] = bytes(8192)  # the caller reuses its buffer at once: the record kept a copy
    (b,) = frames(st.take_batches())
    assert isinstance(b, Batch) and (b.cg, b.first_seq, b.last_seq) == ("cg1", 1, 4)
    assert (b.t_first_ns, b.t_last_ns) == (1_000_001, 1_000_004)
    recs = decode_records(unseal(b.body, key, batch_aad(b)))
    assert [(r.seq, r.io_id, r.vdisk_id, r.op, r.flags, r.offset, r.length) for r in recs] == [
        (x.cg_seq, x.io_id, 7, int(x.op), int(x.flags), x.voffset, x.length) for x in writes]
    assert recs[0].data == want and recs[3].data == b"z" * 512 and recs[1].data == b"" == recs[2].data
    assert st.take_batches() == b""  # nothing pending: nothing sent


def test_writes_added_together_share_one_batch_per_cg():
    st = state()
    for i, (cg, seq) in enumerate([(1, 1), (2, 6), (1, 2), (2, 7), (1, 3)]):
        st.add(w(100 + i, seq, cg_id=cg))
    bs = frames(st.take_batches())
    assert [(b.cg, b.first_seq, b.last_seq) for b in bs] == [("cg1", 1, 3), ("cg2", 6, 7)]
    assert len({b.batch_id for b in bs}) == 2
    st.add(w(200, 4))
    (b3,) = frames(st.take_batches())
    assert b3.batch_id > max(b.batch_id for b in bs) and st.statistics().batches == 3


def test_only_a_durable_ack_settles_and_it_covers_earlier_batches_of_its_cg():
    st = state()
    st.add(w(1, 1)); st.add(w(2, 2))  # noqa: E702
    (b1,) = frames(st.take_batches())
    st.add(w(3, 3))
    st.add(w(9, 6, cg_id=2))
    b2, c1 = frames(st.take_batches())
    assert st.on_frame(Ack(b1.batch_id, "cg1", 2, False)) == []  # received only: not durable
    assert st.on_frame(Ack(999, "cg1", 3, True)) == []  # no such batch (an earlier link's)
    assert st.on_frame(Heartbeat(5)) == []
    # the ack of the later batch: the journal is append-only per CG, so seq 3 durable means 1..3 are
    assert st.on_frame(Ack(b2.batch_id, "cg1", 3, True)) == [(1, True), (2, True), (3, True)]
    assert st.on_frame(Ack(b1.batch_id, "cg1", 2, True)) == []  # already covered
    assert st.statistics().inflight == 1 and st.statistics().unacked_batches == 1
    assert st.on_frame(Ack(c1.batch_id, "cg2", 6, True)) == [(9, True)]
    s = st.statistics()
    assert (s.acked, s.inflight, s.unacked_batches, s.acks) == (4, 0, 0, 2)


def test_a_lost_link_fails_every_write_without_its_durable_ack_and_nothing_is_resent():
    st = state()
    st.add(w(1, 1)); st.add(w(2, 2))  # noqa: E702
    (b1,) = frames(st.take_batches())
    st.add(w(3, 3))  # sent with the next batch, never
    assert st.on_frame(Ack(b1.batch_id, "cg1", 1, True)) == [(1, True), (2, True)]
    st.add(w(4, 4))
    frames(st.take_batches())
    st.add(w(5, 5))
    assert st.fail_all("cut") == [3, 4, 5]
    assert st.broken == "cut" and not st.add(w(6, 6)) and st.take_batches() == b""
    assert st.statistics().inflight == 0


def test_error_and_unexpected_frames_break_the_state_for_good():
    st = state()
    with pytest.raises(NetProtocolError, match="appliance error 4: bad"):
        st.on_frame(Error(4, "bad"))
    assert not st.add(w(1, 1))
    st2 = state()
    with pytest.raises(NetProtocolError, match="unexpected HelloAck"):
        st2.on_frame(HelloAck("app", PROTOCOL_VERSION, {}))
    assert st2.broken


def test_a_duplicate_io_id_or_a_short_payload_is_refused():
    st = state()
    assert st.add(w(1, 1))
    assert not st.add(w(1, 2))
    bad = AugmentedWrite(2, 1, 3, 7, Op.WRITE, WFlag(0), 0, 4096, 1, b"x" * 100)
    assert not st.add(bad)
    assert st.statistics().failed == 2 and st.statistics().submitted == 1
