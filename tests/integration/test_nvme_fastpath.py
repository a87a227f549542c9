"""nvme-pi on the card's fast path: a real `nicsplit card run` with
``transport = "nvme-pi"`` runs the acker process (`NvmeAcker`) and its
pipeline worker, driven through the real NVMe queue pair by the host's own
`NvmePiSplitter` from this test (the ring's cases are in test_card_fastpath).

- Completions keep flowing while the pipeline worker does not run at all
  (SIGSTOPped): no compression, seal or TLS write delays them.
- A worker killed while it holds acked writes loses none silently: each is
  in the lost log, its namespace blocks are freed, a new worker goes on.
- A guard error is completed 282h by the acker and counted where the card's
  status shows it.
"""

from __future__ import annotations

import json
import os
import signal
from time import monotonic_ns

import pytest

from nicsplit.card.transports.nvme_pi import NvmePiSplitter
from nicsplit.core.layout import Layout
from nicsplit.core.records import Status
from nicsplit.testing.cardproc import CardProcess, card_data
from nicsplit.testing.cardproc import card_stats as stats
from nicsplit.testing.cardproc import card_stats_or_none as _stats_or_none
from nicsplit.testing.cardproc import pattern_write as write
from nicsplit.testing.procs import wait_for
from nicsplit.wire import nvme as N

SECOND = 1_000_000_000


@pytest.fixture
def card(tmp_path):
    data = card_data(tmp_path, transport="nvme-pi")
    c = CardProcess(data).start()
    yield data, c
    c.stop()


def test_completions_flow_while_the_pipeline_worker_is_stopped(card, seed):
    data, c = card
    assert c.ready["fast_path"] == "process" and c.ready["worker_pid"] != c.pid
    worker = c.ready["worker_pid"]
    r = NvmePiSplitter.connect(str(Layout(data).card_sock))
    try:
        for i in range(1, 101):  # the worker runs: it takes them
            assert r.split(write(i, seed), SECOND)
        wait_for(lambda: stats(data)["endpoint"]["handoff"]["consumed"] >= 100, 30, "the worker taking 100 writes")
        os.kill(worker, signal.SIGSTOP)
        try:
            waits = []
            for i in range(101, 1101):  # 1000 x 4 KiB (+ PI): fits the 16 MiB namespace
                t = monotonic_ns()
                assert r.split(write(i, seed), SECOND), f"write {i} not completed while the worker is stopped"
                waits.append(monotonic_ns() - t)
        finally:
            os.kill(worker, signal.SIGCONT)
        waits.sort()
        print(f"completions with the worker stopped: p50 {waits[500] / 1000:.1f} us, p99 {waits[990] / 1000:.1f} us")
        wait_for(lambda: stats(data)["endpoint"]["handoff"]["consumed"] >= 1100, 30, "the worker catching up")
        st = stats(data)
        assert st["worker_pid"] == worker and st["writes_in"] == 1100, st
        assert st["endpoint"]["guard_errors"] == 0
    finally:
        r.close()


def test_a_killed_worker_reports_what_it_held_and_a_new_one_goes_on(card, seed):
    data, c = card
    worker = c.ready["worker_pid"]
    r = NvmePiSplitter.connect(str(Layout(data).card_sock))
    try:
        for i in range(1, 201):
            assert r.split(write(i, seed), SECOND)
            if i <= 150:  # 150 committed; 50 still wait for their outcome
                assert r.post_outcome(i, Status.COMMITTED)
        wait_for(lambda: stats(data)["endpoint"]["handoff"]["consumed"] >= 350, 30, "the worker taking them")
        held_before = r.released_position()
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: (s := _stats_or_none(data)) is not None and s["worker_pid"] != worker, 60,
                 "a new worker serving the control socket")
        ho = stats(data)["endpoint"]["handoff"]
        assert ho["worker_restarts"] == 1 and ho["lost_on_worker_death"] == 200, ho  # no appliance: all held
        lines = [json.loads(x) for x in Layout(data).card_lost_log.read_text().splitlines()]
        assert sorted(x["io_id"] for x in lines if "worker died" in x["reason"]) == list(range(1, 201))
        assert r.released_position() > held_before and r.released_position() == 200 * N.EXT  # a block each
        for i in range(201, 301):  # the new worker takes writes again
            assert r.split(write(i, seed), SECOND)
        wait_for(lambda: stats(data)["writes_in"] == 100, 30, "the new worker taking 100 writes")
    finally:
        r.close()


def test_a_guard_error_is_completed_by_the_acker_and_counted(card, seed):
    data, _c = card
    r = NvmePiSplitter.connect(str(Layout(data).card_sock))
    try:
        assert r.split(write(1, seed), SECOND)

        def flip(buf, off, nb):
            buf[off + 77] ^= 0x01  # a data byte the guard already covers

        r.fault_after_pi = flip
        assert r.split(write(2, seed), SECOND) is False
        r.fault_after_pi = None
        assert r.split(write(3, seed), SECOND)
        assert r.statistics().refused_status == N.Status.GUARD_CHECK
        wait_for(lambda: stats(data)["writes_in"] == 2, 30, "the worker taking the two good writes")
        assert stats(data)["endpoint"]["guard_errors"] == 1
        lines = [json.loads(x) for x in Layout(data).card_lost_log.read_text().splitlines()]
        assert [x["io_id"] for x in lines] == [2] and "GUARD_CHECK" in lines[0]["reason"]
    finally:
        r.close()
