"""The acker's spin (`RingAcker.wait_entries`): it polls SQ_TAIL alone and
returns as soon as the host publishes an entry, or False once its deadline
passed with nothing published; it never consumes what it sees (the next
`pump` does). And the duplicate io_id check of a round, exact against the
handoff floor although live io_ids are pruned only after the round's acks."""

from __future__ import annotations

import os
import time

import pytest

from nicsplit.card.handoff import Handoff
from nicsplit.card.transports.ring_acker import RingAcker
from nicsplit.card.transports.ring_splitter import RingSplitter
from nicsplit.core.records import AugmentedWrite, Op, WFlag
from nicsplit.testing.cardrig import CardRig

pytestmark = pytest.mark.unit


def w(io: int) -> AugmentedWrite:
    return AugmentedWrite(io, 1, io, 1, Op.WRITE, WFlag.NONE, io * 4096, 4096, time.time_ns(), bytes(4096))



class Pair(CardRig):
    """Acker, pipeline worker's endpoint and splitter in one process."""

    def __init__(self, run: str) -> None:
        super().__init__(run, slots=64, data_size=1 << 20)


@pytest.fixture
def pair(tmp_path):
    ho = Handoff.create(slots=64)
    acker = RingAcker(str(tmp_path / "run"), handoff=ho, data_size=1 << 20, sq_entries=64, cq_entries=64)
    sp = RingSplitter.connect(str(acker.socket_path))
    yield acker, sp
    sp.close()
    acker.close()
    ho.close()
    os.close(ho.fd)


def test_the_spin_ends_at_its_deadline_when_nothing_comes(pair):
    acker, _ = pair
    t0 = time.monotonic_ns()
    assert acker.wait_entries(t0 + 2_000_000) is False
    assert time.monotonic_ns() - t0 >= 2_000_000, "returned before its deadline with nothing published"


def test_the_spin_sees_a_published_entry_and_leaves_it_to_pump(pair):
    acker, sp = pair
    assert sp.submit(w(1))
    t0 = time.monotonic_ns()
    assert acker.wait_entries(t0 + 5_000_000_000) is True
    assert time.monotonic_ns() - t0 < 1_000_000_000, "spun on although an entry waited"
    assert acker.wait_entries(0) is True, "the spin consumed the entry"
    assert acker.pump() == 1
    assert sp.wait_ack(1, time.monotonic_ns() + 1_000_000_000) is True
    assert acker.wait_entries(time.monotonic_ns() + 1_000_000) is False, "nothing is left after the pump"


def test_an_io_id_is_a_duplicate_while_held_and_free_again_below_the_floor(tmp_path):
    """The duplicate check compares a live io_id's position with the handoff
    floor in the round itself (the list is pruned only after the acks): a
    reuse after the floor passed it is acked OK even before any pruning, a
    reuse while it is held is refused DUPLICATE."""
    p = Pair(str(tmp_path / "run"))
    try:
        far = time.monotonic_ns() + 1_000_000_000
        assert p.sp.submit(w(1)) and p.acker.pump() == 1 and p.sp.wait_ack(1, far) is True
        assert [e.io_id for e in p.worker.poll()] == [1]
        assert p.sp.submit(w(1)) and p.acker.pump() == 1
        assert p.sp.wait_ack(1, far) is False, "io 1 is still held: a second one must be refused"
        p.worker.poll()  # the refused entry goes on (its seq is real); nothing to release for it
        p.worker.release(1)
        assert p.acker._live, "precondition: io 1 is still listed (pruned only after a round's acks)"
        assert p.sp.submit(w(1)) and p.acker.pump() == 1
        assert p.sp.wait_ack(1, far) is True, "io 1 is below the floor: the reuse is a new write"
    finally:
        p.close()
