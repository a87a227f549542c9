"""Reservations of the ring's data area (`RingSplitter.reserve`): a payload
received in place is published with its descriptor only, in ring order; one
overtaken by a later payload is moved (copied); one released unpublished is
never seen by the card and its space comes back; a reservation pins its
space until released. The card is a real `RingEndpoint`, polled by hand."""

from __future__ import annotations

import time

import pytest
from xxhash import xxh3_64_intdigest

from nicsplit.card.transports.ring_endpoint import RingEndpoint
from nicsplit.card.transports.ring_splitter import RingSplitter
from nicsplit.core.records import AugmentedWrite, Op, WFlag
from nicsplit.wire import ring as R

FAR = 10 * 1_000_000_000
DSIZE = R.MIN_DATA  # 64 KiB: small enough to fill


@pytest.fixture
def ring(tmp_path):
    made: list = []

    def _make(**opts):
        ep = RingEndpoint(tmp_path / f"run{len(made)}", **opts)
        made.append(ep)
        sp = RingSplitter.connect(str(ep.socket_path), stale_after_ns=60 * 10**9)
        made.append(sp)
        return ep, sp

    yield _make
    for x in reversed(made):
        x.close()


_ids = iter(range(1, 1 << 62))


def write(data, voffset: int = 0) -> AugmentedWrite:
    return AugmentedWrite(next(_ids), 1, 0, 1, Op.WRITE, WFlag.NONE, voffset, len(data), time.time_ns(), data)


def receive(res, payload: bytes, chunk: int) -> None:
    """What the NBD front end does: the payload lands chunk by chunk."""
    for at in range(0, len(payload), chunk):
        n = min(chunk, len(payload) - at)
        res.buf[at: at + n] = payload[at: at + n]
        res.filled(at + n)


def take(ep: RingEndpoint, sp: RingSplitter, ws: list[AugmentedWrite]) -> list:
    got = ep.poll(max_entries=100)
    for w in ws:
        assert sp.wait_ack(w.io_id, time.monotonic_ns() + FAR), f"io {w.io_id} refused"
    return got


def test_received_in_place_is_published_without_a_copy(ring, rng):
    ep, sp = ring(data_size=DSIZE)
    payload = rng.randbytes(20000)
    res = sp.reserve(len(payload))
    receive(res, payload, 3000)
    assert res.checksum() == xxh3_64_intdigest(payload) & 0xFFFFFFFF  # streamed == whole
    assert ep.poll() == []  # nothing is visible before the descriptor
    w = write(res.data)
    assert sp.submit(w)
    (got,) = take(ep, sp, [w])
    assert bytes(got.data) == payload
    st = sp.statistics()
    assert (st.reserved, st.in_place, st.moved, st.dropped, st.bytes, st.held) == (1, 1, 0, 0, 0, 1)
    res.release()
    assert sp.statistics().held == 0
    with pytest.raises(TypeError):
        res.data[0] = 1  # the view the chain gets is read-only


def test_overtaken_reservation_is_moved_and_the_card_takes_both_in_order(ring, rng):
    ep, sp = ring(data_size=DSIZE)
    a, b = rng.randbytes(9000), rng.randbytes(7000)
    ra, rb = sp.reserve(len(a)), sp.reserve(len(b))
    receive(ra, a, 4096)
    receive(rb, b, 4096)
    wb, wa = write(rb.data), write(ra.data)
    assert sp.submit(wb)  # b first: in place
    assert sp.submit(wa)  # a is behind what was published: copied after b
    got = take(ep, sp, [wb, wa])
    assert [bytes(g.data) for g in got] == [b, a]
    st = sp.statistics()
    assert (st.in_place, st.moved, st.bytes) == (1, 1, len(a))
    assert ep.statistics().bad == 0


def test_abandoned_reservation_is_never_seen_and_its_space_comes_back(ring, rng):
    ep, sp = ring(data_size=DSIZE)
    tail0 = sp._ctr[R.Counter.DATA_TAIL]
    res = sp.reserve(30000)
    receive(res, rng.randbytes(12000), 4096)  # the client went away mid-payload
    res.release()
    res.release()  # idempotent
    assert ep.poll() == [] and sp._ctr[R.Counter.DATA_TAIL] == tail0
    w = write(rng.randbytes(DSIZE))  # the whole area: possible only if the space came back
    assert sp.submit(w)
    (got,) = take(ep, sp, [w])
    assert bytes(got.data) == w.data and got.io_id == w.io_id
    st = sp.statistics()
    assert (st.reserved, st.dropped, st.in_place, st.held) == (1, 1, 0, 0)


def test_abandoned_reservation_between_two_is_padding(ring, rng):
    ep, sp = ring(data_size=DSIZE)
    r1, r2, r3 = (sp.reserve(8000) for _ in range(3))
    p1, p3 = rng.randbytes(8000), rng.randbytes(8000)
    receive(r1, p1, 8000)
    receive(r3, p3, 8000)
    r2.release()  # never published
    w1, w3 = write(r1.data), write(r3.data)
    assert sp.submit(w1) and sp.submit(w3)
    got = take(ep, sp, [w1, w3])
    assert [bytes(g.data) for g in got] == [p1, p3]
    assert sp.statistics().in_place == 2 and ep.statistics().bad == 0
    for g in got:
        g.data = None
        ep.release(g.io_id)
    assert ep._ctr[R.Counter.DATA_HEAD] == r3.end  # the gap was freed with the write after it


def test_no_room_means_no_reservation_and_a_pinned_region_is_never_overwritten(ring, rng):
    ep, sp = ring(data_size=DSIZE)
    half = DSIZE // 2
    res = sp.reserve(half)
    payload = rng.randbytes(half)
    receive(res, payload, half)
    w = write(res.data)
    assert sp.submit(w)
    (got,) = take(ep, sp, [w])
    got.data = None
    ep.release(w.io_id)  # the card is done with it; the host still reads it (datastore write)
    assert sp.reserve(DSIZE) is None and sp.statistics().no_room == 1
    w2 = write(b"\xee" * half)
    assert sp.submit(w2)  # fits the other half
    (g2,) = take(ep, sp, [w2])
    g2.data = None
    ep.release(w2.io_id)
    # The card freed everything, but the first half is pinned: a payload that
    # would land on it is refused (full), not written over the host's bytes.
    assert not sp.submit(write(b"\xdd" * 100))
    assert bytes(res.data) == payload
    res.release()
    w3 = write(b"\xdd" * 100)
    assert sp.submit(w3)
    take(ep, sp, [w3])


def test_a_view_that_is_not_the_reservations_takes_the_copy_path(ring, rng):
    ep, sp = ring(data_size=DSIZE)
    res = sp.reserve(5000)
    receive(res, rng.randbytes(5000), 5000)
    other = bytes(res.data[:4000]) + b"x" * 1000  # a filter above changed the bytes: a new object
    w = write(other)
    assert sp.submit(w)
    (got,) = take(ep, sp, [w])
    assert bytes(got.data) == other
    assert sp.statistics().in_place == 0 and sp.statistics().moved == 0
    res.release()
    assert sp.statistics().dropped == 1
