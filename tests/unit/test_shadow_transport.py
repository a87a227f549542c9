"""The shadow transport's two halves in one process
(`nicsplit.card.transports.shadow`), and the hold stage matching its halves:

* the real half goes through the device queue to the volume file and comes
  out of the card's poll as the write's ``Outcome(COMMITTED)``, whichever
  half came first; the card counts pairs and reversed pairs;
* a write in pieces (across extents) is one outcome, at its last piece; a
  bad entry or a failed pwrite completes with an errno and is no outcome;
* a card that closes fails the host's waiting writer with `DeviceGone`
  (the host then writes directly and marks);
* hold matches both orders, loses an orphaned fake half at the timeout
  (on_lost: the region is marked), drops an unmatched real half at the
  timeout (counted), and drops a fake half on FAILED (commit-only)."""

from __future__ import annotations

import asyncio
import os
import random

import pytest

from nicsplit.card.pipeline.hold import Hold
from nicsplit.card.pipeline.items import Resolved
from nicsplit.card.transports.shadow import ShadowEndpoint, ShadowSplitter
from nicsplit.card.transports.shadow_device import DeviceGone, DeviceMemory, HostDevice
from nicsplit.core.records import AugmentedWrite, Outcome, Status
from nicsplit.host.datastore.store import Datastore
from nicsplit.host.shadowio import ShadowIO, write_through
from nicsplit.testing.splitpair import WriteMaker, split_pairs, volume_files
from nicsplit.wire import shadow as S

VOL = 1 << 20


def _closed(ep: ShadowEndpoint) -> None:
    assert not ep.socket_path.exists()


@pytest.fixture
def pair(tmp_path):
    vols = volume_files(tmp_path / "datastore", 2, VOL)
    with split_pairs(tmp_path, ShadowEndpoint, ShadowSplitter, _closed) as make:
        ep, sp = make({"volume_dir": str(vols), "data_size": 1 << 20, "device_entries": 8,
                       "device_data_size": 1 << 16, "match_timeout_ms": 60_000}, {})
        yield ep, sp, vols


def run_card_until(ep, coro):
    """Run ``coro`` (the host's writer) while the card polls, in one loop;
    returns (coro's result, every record the card polled)."""
    got: list = []

    async def main():
        task = asyncio.ensure_future(coro)
        while not task.done():
            got.extend(ep.poll())
            await asyncio.sleep(0)  # ok-sleep: one loop turn, no time passes: the writer spins or waits
        got.extend(ep.poll())
        return task.result()

    return asyncio.run(main()), got


def test_the_real_half_lands_in_the_volume_and_is_the_outcome(pair, seed):
    ep, sp, vols = pair
    rng = random.Random(seed)
    wm = WriteMaker()
    data = rng.randbytes(4096)
    w = wm.write(data, seq=1)
    assert sp.submit(w)

    async def real():
        return await sp.device.wait(sp.device.write(1, 8192, data, w.io_id))

    status, recs = run_card_until(ep, real())
    assert status == 0
    assert [type(r) for r in recs] == [AugmentedWrite, Outcome]
    assert recs[1] == Outcome(w.io_id, Status.COMMITTED)
    assert (vols / S.volume_file(1)).read_bytes()[8192: 8192 + 4096] == data
    st = ep.statistics()
    assert (st.fake_halves, st.real_halves, st.matched, st.reversed) == (1, 1, 1, 0), st
    ep.release(w.io_id)


def test_a_real_half_first_is_a_reversed_pair(pair):
    ep, sp, _ = pair
    wm = WriteMaker()
    w = wm.write(b"r" * 512, seq=1)

    async def real():
        return await sp.device.wait(sp.device.write(0, 4096, w.data, w.io_id))

    status, recs = run_card_until(ep, real())
    assert status == 0 and recs == [Outcome(w.io_id, Status.COMMITTED)]
    assert ep.statistics().unmatched_real == 1
    assert sp.submit(w)
    (fake,) = ep.poll()
    assert fake.io_id == w.io_id
    st = ep.statistics()
    assert (st.matched, st.reversed, st.unmatched_real, st.unmatched_fake) == (1, 1, 0, 0), st
    ep.release(w.io_id)


def test_pieces_make_one_outcome_and_errors_none(pair):
    ep, sp, vols = pair
    dev = sp.device

    async def writes():
        a = dev.write(0, VOL - 512, b"a" * 512, 11, more=True)
        b = dev.write(1, 4096, b"b" * 512, 11)
        c = dev.write(7, 4096, b"c" * 512, 12)  # no such volume file: ENOENT
        return [await dev.wait(p) for p in (a, b, c)]

    statuses, recs = run_card_until(ep, writes())
    assert statuses[:2] == [0, 0] and statuses[2] == 2, statuses  # ENOENT
    assert recs == [Outcome(11, Status.COMMITTED)]
    assert (vols / S.volume_file(0)).read_bytes()[-512:] == b"a" * 512
    assert ep.statistics().device_errors == 1


def test_a_bad_entry_is_completed_eio_and_never_written(pair):
    ep, sp, vols = pair
    dev = sp.device
    before = (vols / S.volume_file(0)).read_bytes()

    async def bad():
        pos = dev.write(0, 4096, b"x" * 512, 21)
        S.SQE.pack_into(dev.mem.sq, 0, 9, 0, 0, 0, 512, pos, 21, 4096, 0)  # opcode 9, after publication
        return await dev.wait(pos)

    # the card has not polled yet: the corrupted entry is what it reads
    status, recs = run_card_until(ep, bad())
    assert status == 5 and recs == [] and ep.statistics().device_errors == 1
    assert (vols / S.volume_file(0)).read_bytes() == before


def test_a_closed_card_fails_the_waiting_writer(pair):
    ep, sp, _ = pair

    async def orphaned():
        pos = sp.device.write(0, 4096, b"z" * 512, 31)
        ep.close()  # the card goes away before it polls
        return await sp.device.wait(pos)

    with pytest.raises(DeviceGone):
        asyncio.run(orphaned())
    with pytest.raises(DeviceGone):
        sp.device.write(0, 4096, b"z", 32)


def test_unmatched_halves_are_counted_as_orphans_at_the_timeout(pair):
    ep, sp, _ = pair
    wm = WriteMaker()
    w = wm.write(b"f" * 512, seq=1)
    assert sp.submit(w)
    ep.poll()

    async def real():
        return await sp.device.wait(sp.device.write(0, 4096, b"g" * 512, 999))

    run_card_until(ep, real())
    ep.heartbeat()
    st = ep.statistics()
    assert (st.orphan_fake, st.orphan_real, st.unmatched_fake, st.unmatched_real) == (0, 0, 1, 1), st
    ep.match.timeout_ns = 0  # now a timeout of 0: everything unmatched is overdue
    ep.match._expire_at = 0  # the expiry runs at most every 100 ms; this test does not wait for it
    ep.heartbeat()
    st = ep.statistics()
    assert (st.orphan_fake, st.orphan_real, st.unmatched_fake, st.unmatched_real) == (1, 1, 0, 0), st
    ep.release(w.io_id)


# -- hold: the match -------------------------------------------------------------

class Sink:
    def __init__(self) -> None:
        self.lost: list[int] = []
        self.released: list[int] = []

    def hold(self) -> Hold:
        return Hold(on_lost=lambda w: self.lost.append(w.io_id), release=self.released.append,
                    outcome_timeout_ms=10)


def fake(io_id: int, seq: int) -> Resolved:
    return Resolved(AugmentedWrite(io_id, 1, seq, 1, 1, 0, seq * 4096, 4096, 0, b"x" * 4096), "cg", "v", 4096)


MS = 1_000_000


@pytest.mark.parametrize("real_first", [False, True])
def test_hold_matches_either_order(real_first):
    s = Sink()
    h = s.hold()
    if real_first:
        h.outcome(Outcome(1, Status.COMMITTED), 0)
        h.add(fake(1, 5), 1)
    else:
        h.add(fake(1, 5), 0)
        h.outcome(Outcome(1, Status.COMMITTED), 1)
    r = h.pop_ready()
    assert r is not None and r.write.io_id == 1 and not s.lost


def test_hold_interleaved_reversed_pairs_leave_in_seq_order(seed):
    rng = random.Random(seed)
    s = Sink()
    h = s.hold()
    n = 64
    events = [("w", i) for i in range(n)] + [("o", i) for i in range(n)]
    rng.shuffle(events)
    # a write's seq is its io_id: the lane starts at seq 0 (told by expect, as the card's lead does)
    h.expect(1, 0)
    for t, (kind, i) in enumerate(events):
        if kind == "w":
            h.add(fake(i, i), t)
        else:
            h.outcome(Outcome(i, Status.COMMITTED), t)
    out = []
    while (r := h.pop_ready()) is not None:
        out.append(r.write.cg_seq)
    assert out == list(range(n)) and not s.lost, (seed, out)


def test_hold_orphans_on_each_side_and_commit_only():
    s = Sink()
    h = s.hold()
    h.add(fake(1, 1), 0)  # a fake half whose real half never comes
    h.outcome(Outcome(2, Status.COMMITTED), 0)  # a real half whose fake half never comes
    h.add(fake(3, 2), 0)
    h.outcome(Outcome(3, Status.FAILED), 0)  # failed below the splitter: dropped, never shipped
    h.expire(11 * MS)
    assert s.lost == [1]  # the orphaned fake half: its region is marked (on_lost)
    st = h.statistics()
    assert st.lost_timeout == 1 and st.stray_outcomes == 1 and st.failed == 1, st
    assert h.pop_ready() is None  # nothing of the three is shipped
    assert sorted(s.released) == [1, 3]


def test_a_second_host_goes_on_from_the_first_ones_positions(pair):
    """The card outlives a host: the next host's payloads go after what the
    first one queued (an entry the card has not run yet keeps its bytes)."""
    ep, sp, vols = pair
    dev = sp.device
    p1 = dev.write(0, 4096, b"1" * 40000, 41)  # queued, not yet run by the card
    mem2 = DeviceMemory.attach(os.dup(dev.mem.fd))
    dev2 = HostDevice(mem2, os.dup(dev._done_fd), wake_card=lambda: None, healthy=lambda: True)
    try:
        p2 = dev2.write(0, 65536, b"2" * 20000, 42)  # after it: the first payload's bytes are kept
        assert p2 == p1 + 1
        done = ep._dev.poll()
        assert done == [(41, 0), (42, 0)]
        vol = (vols / S.volume_file(0)).read_bytes()
        assert vol[4096: 4096 + 40000] == b"1" * 40000 and vol[65536: 65536 + 20000] == b"2" * 20000
        assert dev2.take(p2) == 0
    finally:
        dev2.close()


# -- the host's real half (nicsplit.host.shadowio) ----------------------------------

@pytest.fixture
def store_pair(tmp_path):
    ds = Datastore.create(tmp_path / "ds", volume_size=64 << 20, extent_size=1 << 20)
    ds.open_io()
    ds.create_vdisk("a", 8 << 20)
    with split_pairs(tmp_path, ShadowEndpoint, ShadowSplitter, _closed) as make:
        ep, sp = make({"volume_dir": str(tmp_path / "ds"), "data_size": 1 << 20, "device_entries": 8,
                       "device_data_size": 1 << 20}, {})
        yield ds.vdisk("a"), ep, sp
    ds.close()


def test_write_through_the_card_across_extents(store_pair, seed):
    store, ep, sp = store_pair
    data = random.Random(seed).randbytes(300_000)
    io = ShadowIO(7, sp, (1 << 20) - 100_000)
    _, recs = run_card_until(ep, write_through(store, io.offset, data, io))
    assert io.routed and recs == [Outcome(7, Status.COMMITTED)]  # two pieces, one outcome
    assert sp.device.submitted == 2 and ep.statistics().device_bytes == len(data)
    assert store.pread(io.offset, len(data)) == data  # what the card wrote, read back by the host


def test_write_through_a_gone_card_writes_directly_unrouted(store_pair, seed):
    store, ep, sp = store_pair
    data = random.Random(seed).randbytes(8192)
    ep.close()
    io = ShadowIO(8, sp, 4096)
    asyncio.run(write_through(store, 4096, data, io))
    assert not io.routed  # the filter marks the region and posts FAILED
    assert store.pread(4096, len(data)) == data  # production first


def test_write_through_a_piece_larger_than_the_device_goes_direct(tmp_path):
    ds = Datastore.create(tmp_path / "ds", volume_size=64 << 20, extent_size=4 << 20)
    ds.open_io()
    ds.create_vdisk("a", 8 << 20)
    with split_pairs(tmp_path, ShadowEndpoint, ShadowSplitter, _closed) as make:
        ep, sp = make({"volume_dir": str(tmp_path / "ds"), "data_size": 1 << 20, "device_entries": 8,
                       "device_data_size": 1 << 20}, {})
        data = b"L" * (2 << 20)
        io = ShadowIO(9, sp, 0)
        asyncio.run(write_through(ds.vdisk("a"), 0, data, io))
        assert not io.routed and sp.device.submitted == 0
        assert ds.vdisk("a").pread(0, len(data)) == data
    ds.close()
