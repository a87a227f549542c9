"""Shadow on the card's fast path: `ShadowAcker` serves the device queue (the
real halves) next to the ring's acks, and hands each real half's outcome to
the pipeline worker's `HandoffEndpoint`, which counts how the halves meet.
Acker, worker endpoint and host splitter in one process (`CardRig`), stepped
by hand; real volume files."""

from __future__ import annotations

import pytest

from nicsplit.card.handoff import H
from nicsplit.core.records import AugmentedWrite, Outcome, Status
from nicsplit.testing.cardrig import CardRig
from nicsplit.testing.splitpair import WriteMaker, volume_files
from nicsplit.wire import shadow as S

VOL = 1 << 20


@pytest.fixture
def rig(tmp_path):
    vols = volume_files(tmp_path / "datastore", 2, VOL)
    r = CardRig(str(tmp_path / "run"), transport="shadow", slots=8, data_size=1 << 20, sq=8,
                acker_options={"volume_dir": str(vols), "device_entries": 8, "device_data_size": 1 << 16,
                               "match_timeout_ms": 60_000})
    yield r, vols
    r.close()


def step(r: CardRig) -> list:
    """One acker round, then what the worker reads."""
    r.acker.pump()
    return r.worker.poll()


def test_the_real_half_is_written_completed_and_its_outcome_handed_off(rig):
    r, vols = rig
    w = WriteMaker().write(b"f" * 4096, seq=1)
    assert r.sp.submit(w)
    assert r.acker.wait_entries(0) is True  # work waits on the ring
    (fake,) = step(r)
    assert type(fake) is AugmentedWrite and fake.io_id == w.io_id
    assert r.acker.wait_entries(0) is False
    pos = r.sp.device.write(1, 8192, w.data, w.io_id)
    assert r.acker.wait_entries(0) is True  # ... or on the device queue
    assert step(r) == [Outcome(w.io_id, Status.COMMITTED)]
    assert r.sp.device.take(pos) == 0  # the host's real half completed by the acker
    assert (vols / S.volume_file(1)).read_bytes()[8192: 8192 + 4096] == w.data
    st = r.worker.statistics()
    assert (st["fake_halves"], st["real_halves"], st["matched"], st["reversed"]) == (1, 1, 1, 0), st
    r.worker.release(w.io_id)


def test_a_real_half_first_is_a_reversed_pair_counted_by_the_worker(rig):
    r, _ = rig
    w = WriteMaker().write(b"r" * 512, seq=1)
    pos = r.sp.device.write(0, 4096, w.data, w.io_id)
    assert step(r) == [Outcome(w.io_id, Status.COMMITTED)]
    assert r.sp.device.take(pos) == 0
    assert r.worker.statistics()["unmatched_real"] == 1
    assert r.sp.submit(w)
    (fake,) = step(r)
    assert fake.io_id == w.io_id
    st = r.worker.statistics()
    assert (st["matched"], st["reversed"], st["unmatched_real"], st["unmatched_fake"]) == (1, 1, 0, 0), st
    r.worker.release(w.io_id)


def test_a_host_outcome_on_the_ring_is_not_a_real_half(rig):
    """A FAILED outcome the filter posts (the write failed below it) drops
    the fake half (commit-only); it is not counted as a real half."""
    r, _ = rig
    w = WriteMaker().write(b"x" * 512, seq=1)
    assert r.sp.submit(w)
    assert r.sp.post_outcome(w.io_id, Status.FAILED)
    recs = step(r)
    assert recs[1] == Outcome(w.io_id, Status.FAILED)
    st = r.worker.statistics()
    assert (st["real_halves"], st["failed_fake"], st["unmatched_fake"]) == (0, 1, 0), st
    r.worker.release(w.io_id)


def test_device_errors_and_bytes_reach_the_worker_statistics(rig):
    r, vols = rig
    ok = r.sp.device.write(0, 4096, b"a" * 512, 11)
    bad = r.sp.device.write(7, 4096, b"c" * 512, 12)  # no such volume file: ENOENT, no outcome
    assert step(r) == [Outcome(11, Status.COMMITTED)]
    assert r.sp.device.take(ok) == 0 and r.sp.device.take(bad) == 2
    r.acker._store_counters()  # the acker's loop does it every ms
    st = r.worker.statistics()
    assert (st["device_errors"], st["device_bytes"]) == (1, 512), st


def test_real_halves_wait_in_the_device_queue_while_the_handoff_is_full(rig):
    """No room for a real half's outcome: the acker leaves it in the device
    queue (its completion waits) rather than complete it and lose the
    outcome, which would orphan its fake half."""
    r, _ = rig
    wm = WriteMaker()
    ws = [wm.write(bytes([65 + i]) * 512, seq=i + 1) for i in range(8)]
    for w in ws:
        assert r.sp.submit(w)
    r.acker.pump()  # 8 fake halves fill the 8 handoff slots
    pos = r.sp.device.write(0, 4096, b"z" * 512, ws[0].io_id)
    r.acker.pump()
    assert r.acker.blocked and r.sp.device.take(pos) is None  # not written, not completed
    assert r.worker.poll() and r.acker._dev.pending()
    for w in ws:
        r.worker.release(w.io_id)  # the floor moves: slots free
    assert step(r) == [Outcome(ws[0].io_id, Status.COMMITTED)]
    assert r.sp.device.take(pos) == 0
    assert r.worker.handoff.get(H.HANDOFF_FULL) >= 1
