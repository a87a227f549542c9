"""The host sleeps for acks instead of spinning its event loop: a wait past
the short spin arms the ring's completion eventfd (HOST_WAITING), and the
card writes it after posting completions. A real ring in one process (the
card's `poll` runs as a loop callback); the host's poller is counted, so a
loop that spins for the ack fails these tests."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import uvloop

from nicsplit.card.transports.ring_endpoint import RingEndpoint
from nicsplit.core.records import AugmentedWrite, Op, WFlag
from nicsplit.host.cardlink import CardLink
from nicsplit.host.marking import MarkingMap
from nicsplit.wire import ring as R

SIZE = 16 << 20
_ids = iter(range(1, 1 << 40))


@pytest.fixture(params=["asyncio", "uvloop"])
def rig(request, tmp_path: Path):
    ep = RingEndpoint(tmp_path / "run", data_size=1 << 20, sq_entries=16)
    link = CardLink(ep.socket_path, tmp_path / "card-lost.log", spin_us=0)
    mm = MarkingMap(tmp_path / "marking", "uuid-a", SIZE)
    link.register(7, mm)
    t = link.get()
    assert t is not None, link.last_error
    polls = [0]
    poll = link._poll_acks

    def counted() -> None:
        polls[0] += 1
        poll()

    link._poll_acks = counted  # every path into the poller goes through the attribute
    loop = uvloop.new_event_loop() if request.param == "uvloop" else asyncio.new_event_loop()
    yield ep, link, t, polls, loop
    loop.close()
    link.close()
    mm.close()
    ep.close()


def submit(t, offset: int = 0) -> AugmentedWrite:
    w = AugmentedWrite(next(_ids), 1, next(_ids), 7, Op.WRITE, WFlag.NONE, offset, 4096, time.time_ns(), b"x" * 4096)
    assert t.submit(w)
    return w


def test_a_waiting_host_sleeps_until_the_card_acks(rig):
    ep, link, t, polls, loop = rig

    async def go():
        w = submit(t)
        fut = link.wait_ack(t, w.io_id, time.monotonic_ns() + 5_000_000_000)
        assert isinstance(fut, asyncio.Future)
        assert t._ctr[R.Counter.HOST_WAITING] == 1  # armed: the card will write the eventfd
        asyncio.get_running_loop().call_later(0.05, ep.poll)  # the card acks 50 ms later
        return await fut

    assert loop.run_until_complete(go()) is True
    # A spinning poller runs thousands of times in 50 ms; a sleeping one
    # runs when the card wakes it.
    assert polls[0] <= 2, polls[0]
    assert ep._n_host_wakes == 1
    assert t._ctr[R.Counter.HOST_WAITING] == 0  # nobody waits: the card writes no eventfd
    assert t.statistics().ack_sleeps >= 1


def test_the_deadline_ends_the_sleep_and_the_write_is_late(rig):
    ep, link, t, polls, loop = rig

    async def go():
        w = submit(t)
        fut = link.wait_ack(t, w.io_id, time.monotonic_ns() + 30_000_000)  # the card never looks in time
        t0 = time.monotonic()
        v = await fut
        return w, v, time.monotonic() - t0

    w, v, waited = loop.run_until_complete(go())
    assert v is None  # late, not failed: it waits in the ring, in order
    assert 0.02 <= waited < 1.0, waited
    assert polls[0] <= 5, polls[0]  # the timer, not a spin (uvloop's timers are ms-grained: one early wake-up)
    ep.poll()
    assert dict(t.take_late()) == {w.io_id: True}


def test_an_ack_posted_between_the_spin_and_the_sleep_is_not_lost(rig):
    """The Dekker order: the card posts while HOST_WAITING is still 0 (so it
    writes no eventfd); the host's look after setting the flag finds it."""
    ep, link, t, polls, loop = rig
    arm = t.arm_wake

    def card_acks_then_arm() -> bool:
        ep.poll()
        assert ep._n_host_wakes == 0  # the flag was not set yet: no wake-up written
        return arm()

    t.arm_wake = card_acks_then_arm

    async def go():
        w = submit(t)
        fut = link.wait_ack(t, w.io_id, time.monotonic_ns() + 5_000_000_000)
        return await asyncio.wait_for(fut, 5)

    assert loop.run_until_complete(go()) is True
    assert polls[0] <= 2, polls[0]


def test_many_waiters_are_completed_by_one_wake_up(rig):
    ep, link, t, polls, loop = rig

    async def go():
        futs = []
        for i in range(8):
            w = submit(t, i * 4096)
            futs.append(link.wait_ack(t, w.io_id, time.monotonic_ns() + 5_000_000_000))
        asyncio.get_running_loop().call_later(0.02, ep.poll)
        return await asyncio.gather(*futs)

    assert loop.run_until_complete(go()) == [True] * 8
    assert polls[0] <= 2, polls[0]
    assert ep._n_host_wakes == 1


def test_losing_the_card_refuses_sleeping_waiters_at_once(rig):
    ep, link, t, polls, loop = rig

    async def go():
        w = submit(t)
        fut = link.wait_ack(t, w.io_id, time.monotonic_ns() + 5_000_000_000)
        asyncio.get_running_loop().call_later(0.02, link.lost, "card gone")
        t0 = time.monotonic()
        v = await asyncio.wait_for(fut, 5)
        return v, time.monotonic() - t0

    v, waited = loop.run_until_complete(go())
    assert v is False and waited < 1.0  # refused (the caller marks), not left to its 5 s deadline
