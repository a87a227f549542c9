"""The pipeline worker's coalescing window (its nap, ``worker_nap_us``): a
real `nicsplit card run` (acker + worker) driven through the real ring by
the host's own `RingSplitter`.

The window is stretched to 300 ms here so that a test can act inside it:
writes acked while the worker naps wait, unread, in the handoff queue.

- Writes acked during a nap reach the worker at its next round, without a
  doorbell ring per write.
- A BARRIER acked during a nap rings the worker: its batch closes then,
  not at the nap's end (a bookmark's or verify's PIT does not wait it out).
- A worker killed in the middle of a nap loses nothing acked: what it had
  read goes to the lost log (the host resyncs it), what it had not read
  yet is taken by the new worker; every write is in one of the two.
"""

from __future__ import annotations

import json
import os
import signal
from time import monotonic_ns

import pytest

from nicsplit.card.transports.nvme_pi import NvmePiSplitter
from nicsplit.card.transports.ring_splitter import RingSplitter
from nicsplit.core.layout import Layout
from nicsplit.core.records import AugmentedWrite, Op, Status, WFlag
from nicsplit.testing.cardproc import CardProcess, card_data
from nicsplit.testing.cardproc import card_stats as stats
from nicsplit.testing.cardproc import card_stats_or_none as _stats_or_none
from nicsplit.testing.cardproc import pattern_write as write
from nicsplit.testing.procs import wait_for

NAP_US = 300_000


@pytest.fixture
def card(tmp_path):
    data = card_data(tmp_path, worker_nap_us=NAP_US)
    c = CardProcess(data).start()
    yield data, c
    c.stop()


def _one_then_napping(data, r: RingSplitter, seed: int) -> dict:
    """Split write 1 and wait until the worker has taken it: the round that
    took it found nothing else queued, so the worker now naps NAP_US.
    Returns the card's stats from just after it took write 1."""
    assert r.split(write(1, seed), 1_000_000_000)  # rings the worker, asleep on the doorbell since start
    r.post_outcome(1, Status.COMMITTED)
    got: list[dict] = []
    wait_for(lambda: got.append(stats(data)) or got[-1]["writes_in"] == 1, 30, "the worker taking write 1")
    return got[-1]  # (the rings for write 1 are before it)


def test_writes_acked_during_a_nap_reach_the_worker_at_its_next_round(card, seed):
    data, _ = card
    r = RingSplitter.connect(str(Layout(data).card_sock))
    try:
        st0 = _one_then_napping(data, r, seed)
        t0 = monotonic_ns()
        for i in range(2, 41):  # acked at once by the acker, while the worker naps
            assert r.split(write(i, seed), 1_000_000_000)
            r.post_outcome(i, Status.COMMITTED)
        acked_in = (monotonic_ns() - t0) / 1e9
        queued = stats(data)["endpoint"]["handoff"]["queued"]
        wait_for(lambda: stats(data)["writes_in"] == 40, 30, "the worker taking the 39 writes")
        st = stats(data)
        rings = st["endpoint"]["handoff"]["worker_rings"] - st0["endpoint"]["handoff"]["worker_rings"]
        print(f"39 writes acked in {acked_in * 1e3:.1f} ms while the worker napped; {queued} entries queued "
              f"at once after them; {rings} doorbell rings")
        if acked_in < NAP_US / 2e6:  # (a starved box may take longer than the window to ack them)
            assert queued > 0  # they waited for the worker's next round, unread
        assert rings <= 1, rings  # a napping worker is not rung (one ring at most: its naps may have run out)
    finally:
        r.close()


@pytest.mark.parametrize("transport", ["ring", "nvme-pi"])
def test_a_barrier_acked_during_a_nap_cuts_the_nap_short(tmp_path, seed, transport):
    data = card_data(tmp_path, worker_nap_us=NAP_US, transport=transport)
    c = CardProcess(data).start()
    splitter = RingSplitter if transport == "ring" else NvmePiSplitter
    r = splitter.connect(str(Layout(data).card_sock))
    try:
        st0 = _one_then_napping(data, r, seed)  # write 1 sits in the open batch; the worker naps
        assert st0["stages"]["batch"]["closed_by_barrier"] == 0
        barrier = AugmentedWrite(2, 1, 2, 1, Op.BARRIER, WFlag.NONE, 0, 0, monotonic_ns(), None)
        assert r.split(barrier, 1_000_000_000)
        r.post_outcome(2, Status.COMMITTED)
        # The nap ends early only if the acker rang; otherwise the batch would
        # close by barrier at the nap's end (naps_cut stays 0).
        st = wait_for(lambda: (s := stats(data))["stages"]["batch"]["closed_by_barrier"] == 1 and s, 30,
                      "the barrier closing the batch")
        cut = st["poller"]["naps_cut"] - st0["poller"]["naps_cut"]
        print(f"barrier taken after {st['poller']['naps'] - st0['poller']['naps']} more naps, {cut} cut short")
        assert cut == 1, st["poller"]
    finally:
        r.close()
        c.stop()


def test_a_worker_killed_mid_window_loses_nothing_acked(card, seed):
    data, c = card
    worker = c.ready["worker_pid"]
    r = RingSplitter.connect(str(Layout(data).card_sock))
    n = 60
    try:
        _one_then_napping(data, r, seed)
        for i in range(2, n + 1):
            assert r.split(write(i, seed), 1_000_000_000)
            if i % 2:  # half committed; the rest still wait for their outcome
                r.post_outcome(i, Status.COMMITTED)
        ho = stats(data)["endpoint"]["handoff"]
        unread = ho["queued"]
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: (s := _stats_or_none(data)) is not None and s["worker_pid"] != worker, 60,
                 "a new worker serving the control socket")
        wait_for(lambda: stats(data)["endpoint"]["handoff"]["queued"] == 0, 30, "the new worker reading the rest")
        st = stats(data)
        ho = st["endpoint"]["handoff"]
        lines = [json.loads(x) for x in Layout(data).card_lost_log.read_text().splitlines()]
        died = {x["io_id"] for x in lines if "worker died" in x["reason"]}
        taken = st["writes_in"]  # writes the new worker read (nothing ships: no appliance, so it holds them)
        print(f"killed mid-window with {unread} entries unread: {len(died)} writes to the lost log, "
              f"{taken} taken by the new worker")
        assert ho["worker_restarts"] == 1
        assert 1 in died  # read by the dead worker, never shipped: reported, so the host resyncs it
        # every acked write is accounted for exactly once: reported lost, or read by the new worker
        assert len(died) + taken == n, (sorted(died), taken)
        assert ho["lost_on_worker_death"] == len(died)
    finally:
        r.close()
