"""The host's card link with a real ring in one process: a write whose ack
misses its deadline is *late*, not lost — it stays unconfirmed until the
card's verdict (acked: kept like any write; refused: marked) or the card's
loss (marked)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from nicsplit.card.transports.ring_endpoint import RingEndpoint
from nicsplit.core.records import AugmentedWrite, Op, WFlag
from nicsplit.host.cardlink import CardLink
from nicsplit.host.marking import MarkingMap

SIZE = 16 << 20


@pytest.fixture
def rig(tmp_path: Path):
    ep = RingEndpoint(tmp_path / "run", data_size=1 << 20, sq_entries=16)
    link = CardLink(ep.socket_path, tmp_path / "card-lost.log")
    mm = MarkingMap(tmp_path / "marking", "uuid-a", SIZE)
    link.register(7, mm)
    t = link.get()
    assert t is not None, link.last_error
    yield ep, link, t, mm
    link.close()
    mm.close()
    ep.close()


_ids = iter(range(1, 1 << 40))


def late_write(link: CardLink, t, mm: MarkingMap, offset: int) -> AugmentedWrite:
    """Submit a write and let its deadline pass before the card looks."""
    w = AugmentedWrite(next(_ids), 1, next(_ids), 7, Op.WRITE, WFlag.NONE, offset, 4096, time.time_ns(), b"x" * 4096)
    assert t.submit(w)
    assert link.wait_ack(t, w.io_id, time.monotonic_ns() - 1) is None  # late: no verdict, nothing failed
    link.late(w.io_id, t.last_position, mm, w.voffset, w.length)
    return w


def test_late_write_acked_later_is_kept_and_never_marked(rig):
    ep, link, t, mm = rig
    late_write(link, t, mm, 0)
    assert link.unconfirmed == 1 and not mm.marking
    ep.poll()  # the card takes it late, in order, and acks
    link.trim()
    assert link.unconfirmed == 0 and link.tracked == 1
    assert not mm.marking and mm.dirty_bytes() == 0


def test_late_write_refused_later_marks_its_region(rig):
    ep, link, t, mm = rig
    late_write(link, t, mm, 1 << 20)
    ep.set_full(True)
    ep.poll()
    link.trim()
    assert link.unconfirmed == 0 and link.late_refused == 1
    assert mm.marking and mm.is_marked(1 << 20, 4096) and not mm.is_marked(0, 4096)


def test_card_lost_with_late_writes_marks_them(rig):
    ep, link, t, mm = rig
    late_write(link, t, mm, 2 << 20)
    late_write(link, t, mm, 3 << 20)
    link.lost("card gone")
    assert link.unconfirmed == 0
    assert mm.marking and mm.is_marked(2 << 20, 4096) and mm.is_marked(3 << 20, 4096)


def test_a_write_whose_card_was_lost_meanwhile_is_refused_not_left_unconfirmed(rig):
    """Found by the fault soak (seed 20261202 case 15, kill -9 of the card):
    a write submitted to a card that was then lost (while the write went
    down to the datastore) was waited for on the dead transport; past its
    deadline it became *late*, registered after the loss had marked the
    late list, so no card would ever settle it: the vdisk's resync waited
    for its verdict forever (resyncing, never protected). Its verdict is
    now a refusal, so the splitter marks its region at once, and a loss
    reported for the dead transport leaves the new card attached."""
    ep, link, t, mm = rig
    w = AugmentedWrite(next(_ids), 1, next(_ids), 7, Op.WRITE, WFlag.NONE, 0, 4096, time.time_ns(), b"x" * 4096)
    assert t.submit(w)
    link.lost("card stopped responding")  # the housekeeping saw the heartbeat stale
    link._last_try = 0.0  # the retry interval passed: a card is there again
    t2 = link.get()
    assert t2 is not None and t2 is not t
    assert link.wait_ack(t, w.io_id, time.monotonic_ns() - 1) is False
    assert link.unconfirmed == 0 and link.unconfirmed_for(mm) == 0
    link.lost("card stopped responding", t)  # the splitter reports the dead transport again
    assert link.get() is t2 and link.losses == 1


def test_a_verdict_taken_after_its_card_was_lost_marks_the_region(rig):
    """The same race one await later: the ack poller settled a write's wait
    (late, or acked) while its card was still attached, and the splitter
    resumed only after the card's loss: kept as unconfirmed it would wait
    forever, kept as tracked its old position would be compared with the
    next card's release counter (and dropped unmarked). Both mark now."""
    ep, link, t, mm = rig
    link.lost("card stopped responding")
    link.late(next(_ids), 4096, mm, 5 << 20, 4096, t)
    link.track(8192, mm, 6 << 20, 4096, t)
    assert link.unconfirmed == 0 and link.tracked == 0
    assert mm.marking and mm.is_marked(5 << 20, 4096) and mm.is_marked(6 << 20, 4096)


def test_a_late_verdict_that_arrives_before_the_write_is_registered_late_is_kept(rig):
    """The ack poller ends a wait (late) and the waiting coroutine resumes a
    loop turn later; a settle in between (the resync loop, a trim) took the
    card's verdict and, finding no late entry yet, dropped it: the entry
    registered next waited forever, so the vdisk never left resyncing
    (test_card_worker_death under load; the soak's worker kills)."""
    ep, link, t, mm = rig
    late_write(link, t, mm, 0)  # another late write, registered: settling has work
    w = AugmentedWrite(next(_ids), 1, next(_ids), 7, Op.WRITE, WFlag.NONE, 7 << 20, 4096, time.time_ns(), b"x" * 4096)
    assert t.submit(w)
    assert link.wait_ack(t, w.io_id, time.monotonic_ns() - 1) is None  # late
    ep.poll()  # the card acks both
    link.settle()  # before the splitter registered the second
    link.late(w.io_id, t.last_position, mm, w.voffset, w.length, t)
    assert link.unconfirmed == 0 and link.unconfirmed_for(mm) == 0
    assert link.tracked == 2 and not mm.marking
    late_write(link, t, mm, 1 << 20)  # again: settling has work
    # refused the same way: marked
    w2 = AugmentedWrite(next(_ids), 1, next(_ids), 7, Op.WRITE, WFlag.NONE, 8 << 20, 4096, time.time_ns(), b"y" * 4096)
    assert t.submit(w2)
    assert link.wait_ack(t, w2.io_id, time.monotonic_ns() - 1) is None
    ep.set_full(True)
    ep.poll()
    link.settle()
    link.late(w2.io_id, t.last_position, mm, w2.voffset, w2.length, t)
    assert link.unconfirmed == 0 and mm.is_marked(8 << 20, 4096)
