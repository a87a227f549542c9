"""The acker's spin (`RingAcker.wait_entries`): it polls SQ_TAIL alone and
returns as soon as the host publishes an entry, or False once its deadline
passed with nothing published; it never consumes what it sees (the next
`pump` does)."""

from __future__ import annotations

import os
import time

import pytest

from nicsplit.card.handoff import Handoff
from nicsplit.card.transports.ring_acker import RingAcker
from nicsplit.card.transports.ring_splitter import RingSplitter
from nicsplit.core.records import AugmentedWrite, Op, WFlag

pytestmark = pytest.mark.unit


def w(io: int) -> AugmentedWrite:
    return AugmentedWrite(io, 1, io, 1, Op.WRITE, WFlag.NONE, io * 4096, 4096, time.time_ns(), bytes(4096))


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
