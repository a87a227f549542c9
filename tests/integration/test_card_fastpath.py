"""The card's fast path (nicsplit.card.fastpath): a real `nicsplit card run`
(the acker process and its pipeline worker), driven through the real ring by
the host's own `RingSplitter` from this test.

- Acks keep flowing while the pipeline does not run at all (the worker is
  SIGSTOPped: a stronger case than a seal in progress, which stops it for
  ~0.5 ms).
- A worker killed while it holds acked writes loses none of them silently:
  each is in the lost log (the host marks and resyncs its region), its ring
  space is freed, a new worker takes over and acks go on.
- A card stopping while acked writes wait in the handoff queue, never read
  by the worker, puts them in the lost log too (the soak found them lost
  without a trace after a kill -9 of `nicsplit up`).
- The card's idle time (empty polls, doorbell sleeps in CPU time) is
  counted apart from its work, and a worker napping between paced writes
  is not rung per write.
"""

from __future__ import annotations

import json
import os
import signal
from time import monotonic_ns

import pytest

from nicsplit.card.transports.ring_splitter import RingSplitter
from nicsplit.core.layout import Layout
from nicsplit.core.records import AugmentedWrite, Op, Status, WFlag
from nicsplit.testing.cardproc import BS, CardProcess, card_data
from nicsplit.testing.cardproc import card_stats as stats
from nicsplit.testing.cardproc import card_stats_or_none as _stats_or_none
from nicsplit.testing.cardproc import pattern_write as write
from nicsplit.testing.procs import wait_for



@pytest.fixture
def card(tmp_path):
    data = card_data(tmp_path)
    c = CardProcess(data).start()
    yield data, c
    c.stop()


def test_acks_flow_while_the_pipeline_worker_is_stopped(card, seed):
    data, c = card
    assert c.ready["fast_path"] == "process" and c.ready["worker_pid"] != c.pid
    worker = c.ready["worker_pid"]
    r = RingSplitter.connect(str(Layout(data).card_sock))
    try:
        for i in range(1, 101):  # the worker runs: it takes them
            assert r.split(write(i, seed), 1_000_000_000)
        wait_for(lambda: stats(data)["endpoint"]["handoff"]["consumed"] >= 100, 30, "the worker taking 100 writes")
        os.kill(worker, signal.SIGSTOP)
        try:
            waits = []
            for i in range(101, 1101):  # 1000 x 4 KiB: fits the 16 MiB data area
                t = monotonic_ns()
                assert r.split(write(i, seed), 1_000_000_000), f"write {i} not acked while the worker is stopped"
                waits.append(monotonic_ns() - t)
        finally:
            os.kill(worker, signal.SIGCONT)
        waits.sort()
        print(f"acks with the worker stopped: p50 {waits[500] / 1000:.1f} us, p99 {waits[990] / 1000:.1f} us, "
              f"max {waits[-1] / 1000:.1f} us")
        wait_for(lambda: stats(data)["endpoint"]["handoff"]["consumed"] >= 1100, 30, "the worker catching up")
        st = stats(data)
        assert st["worker_pid"] == worker and st["endpoint"]["handoff"]["worker_restarts"] == 0
        assert st["writes_in"] == 1100, st
    finally:
        r.close()


def test_the_acker_naps_for_a_worker_behind_so_the_host_rings_no_doorbell(tmp_path, seed):
    """While the worker is behind (stopped here) and writes keep coming, the
    acker gives its core away in short naps on a timer, staying awake for
    the host: a host publishing meanwhile rings no doorbell (an acker that
    slept on it was rung for nearly every write) and every write is acked.
    (The worker serves the card's control socket: its counters are read
    once it runs again.)"""
    data = card_data(tmp_path, worker_nap_us=1000)  # behind at most 8 ms after its last round
    c = CardProcess(data).start()
    worker = c.ready["worker_pid"]
    allowed = os.sched_getaffinity(0)
    off_acker = allowed - os.sched_getaffinity(c.pid)
    r = RingSplitter.connect(str(Layout(data).card_sock))
    try:
        h0 = stats(data)["endpoint"]["handoff"]
        if off_acker:  # the host's side, as `nicsplit up` places it: not on the acker's CPU
            os.sched_setaffinity(0, off_acker)
        os.kill(worker, signal.SIGSTOP)
        try:
            io = 0

            def burst(n: int) -> None:
                nonlocal io
                for _ in range(n):  # one write every 30 us: inside the acker's spin window, after its look
                    t = monotonic_ns()
                    io += 1
                    assert r.split(write(io, seed), 1_000_000_000), f"write {io} not acked"
                    r.post_outcome(io, Status.COMMITTED)
                    while monotonic_ns() - t < 30_000:  # pacing, not synchronisation
                        pass

            t0 = monotonic_ns()
            while monotonic_ns() - t0 < 20_000_000:  # past the stopped worker's last nap: it is behind
                burst(50)
            n = 300
            d0 = r.statistics().doorbells
            burst(n)
            rings = r.statistics().doorbells - d0
        finally:
            os.sched_setaffinity(0, allowed)
            os.kill(worker, signal.SIGCONT)
        wait_for(lambda: stats(data)["endpoint"]["handoff"]["consumed"] >= 2 * io, 30, "the worker catching up")
        naps = stats(data)["endpoint"]["handoff"]["acker_naps"] - h0["acker_naps"]
        print(f"{io} writes with the worker stopped, the last {n}: {rings} doorbells; {naps} acker naps")
        assert naps > 0
        assert rings <= n // 4, rings
    finally:
        r.close()
        c.stop()


def test_idle_time_is_counted_apart_and_in_cpu_not_wall_time(card, seed):
    """The benchmarks report the card's work per write apart from what it
    spends waiting for writes (a DPU core's spin): the acker's empty polls
    and doorbell sleeps, the worker's empty rounds. A sleep is counted in CPU
    time: 250 ms asleep on the doorbell costs microseconds, not 250 ms."""
    data, c = card
    r = RingSplitter.connect(str(Layout(data).card_sock))
    try:
        st0 = stats(data)
        for i in range(1, 51):
            assert r.split(write(i, seed), 1_000_000_000)
            r.post_outcome(i, Status.COMMITTED)
        wait_for(lambda: stats(data)["endpoint"]["handoff"]["consumed"] >= 100, 30, "the worker taking them")
        h0 = stats(data)["endpoint"]["handoff"]
        t0 = monotonic_ns()
        # Idle: the acker sleeps on the doorbell (up to 250 ms at a time) and wakes to heartbeat.
        wait_for(lambda: stats(data)["endpoint"]["handoff"]["acker_sleeps"] >= h0["acker_sleeps"] + 3, 30,
                 "three doorbell sleeps of the acker")
        wall = (monotonic_ns() - t0) / 1e9
        st = stats(data)
        h1 = st["endpoint"]["handoff"]
        slept = h1["acker_sleep_cpu_s"] - h0["acker_sleep_cpu_s"]
        busy = h1["acker_busy_s"] - st0["endpoint"]["handoff"]["acker_busy_s"]
        empty = st["poller"]["empty_poll_s"] - st0["poller"]["empty_poll_s"]
        print(f"idle {wall:.3f} s: acker sleep CPU {slept * 1e6:.1f} us over {h1['acker_sleeps'] - h0['acker_sleeps']} "
              f"sleeps; acker busy {busy * 1e3:.2f} ms; worker empty rounds {empty * 1e3:.2f} ms")
        assert 0 < slept < 0.2 * wall, (slept, wall)  # CPU time, not the wall time asleep
        assert busy > 0  # the 100 entries were acked in busy rounds
        assert empty > 0  # the worker's rounds after its last entry found nothing
    finally:
        r.close()


def test_a_napping_worker_is_not_rung_per_write_and_a_sleeping_one_is(card, seed):
    """Paced writes (one every 300 us, longer than any spin): the worker naps
    on a timer between them (handoff state NAPPING), so the acker does not
    ring its doorbell per write, and every write reaches the worker. Once the
    naps are over the worker sleeps on the doorbell, and a write rings it."""
    data, c = card
    r = RingSplitter.connect(str(Layout(data).card_sock))
    try:
        st0 = stats(data)
        n = 300
        for i in range(1, n + 1):
            assert r.split(write(i, seed), 1_000_000_000)
            r.post_outcome(i, Status.COMMITTED)
            until = monotonic_ns() + 300_000
            while monotonic_ns() < until:  # pacing, not synchronisation
                pass
        wait_for(lambda: stats(data)["writes_in"] == n, 30, "the worker taking every write")
        st = stats(data)
        rings = st["endpoint"]["handoff"]["worker_rings"] - st0["endpoint"]["handoff"]["worker_rings"]
        naps = st["poller"]["naps"] - st0["poller"]["naps"]
        print(f"{n} paced writes: {rings} doorbell rings, {naps} naps, "
              f"{st['poller']['sleeps'] - st0['poller']['sleeps']} doorbell sleeps")
        assert naps > 0
        assert rings <= n // 10, rings  # spinning 200 us and then sleeping on the doorbell rang for nearly each
        # Idle now: the worker's naps end and it sleeps on the doorbell; a write then rings it.
        # (Up to 5 tries: a write landing in the instant between two sleeps is polled, not rung for.)
        for k in range(5):
            before = stats(data)
            wait_for(lambda b=before: stats(data)["poller"]["sleeps"] > b["poller"]["sleeps"], 30,
                     "the worker asleep on the doorbell")
            io = n + 1 + k
            assert r.split(write(io, seed), 1_000_000_000)
            r.post_outcome(io, Status.COMMITTED)
            wait_for(lambda io=io: stats(data)["writes_in"] == io, 30, "the worker taking the write")
            after = stats(data)
            if after["endpoint"]["handoff"]["worker_rings"] > before["endpoint"]["handoff"]["worker_rings"]:
                break
        assert after["endpoint"]["handoff"]["worker_rings"] > before["endpoint"]["handoff"]["worker_rings"]
        assert after["poller"]["doorbell_wakeups"] > before["poller"]["doorbell_wakeups"]  # woken by it, not a timeout
    finally:
        r.close()


def test_a_killed_worker_reports_what_it_held_and_a_new_one_goes_on(card, seed):
    data, c = card
    worker = c.ready["worker_pid"]
    r = RingSplitter.connect(str(Layout(data).card_sock))
    try:
        for i in range(1, 201):
            assert r.split(write(i, seed), 1_000_000_000)
            if i <= 150:  # 150 committed; 50 still wait for their outcome
                assert r.post_outcome(i, Status.COMMITTED)
        wait_for(lambda: stats(data)["endpoint"]["handoff"]["consumed"] >= 350, 30, "the worker taking them")
        held_before = r.released_position()
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: (s := _stats_or_none(data)) is not None and s["worker_pid"] != worker, 60,
                 "a new worker serving the control socket")
        st = stats(data)
        ho = st["endpoint"]["handoff"]
        # Nothing was shipped (no appliance), so every one of the 200 was held.
        assert ho["worker_restarts"] == 1 and ho["lost_on_worker_death"] == 200, ho
        lines = [json.loads(x) for x in Layout(data).card_lost_log.read_text().splitlines()]
        died = sorted(x["io_id"] for x in lines if "worker died" in x["reason"])
        assert died == list(range(1, 201)), died[:10]
        assert r.released_position() > held_before and r.released_position() == 200 * BS
        for i in range(201, 301):  # the new worker takes writes again
            assert r.split(write(i, seed), 1_000_000_000)
        wait_for(lambda: stats(data)["writes_in"] == 100, 30, "the new worker taking 100 writes")
    finally:
        r.close()


def test_a_stopping_card_reports_acked_writes_its_worker_never_read(tmp_path, seed):
    data = card_data(tmp_path, drain_timeout_s=0.5)
    c = CardProcess(data).start()
    r = RingSplitter.connect(str(Layout(data).card_sock))
    try:
        for i in range(1, 51):  # read by the worker; held (no appliance)
            assert r.split(write(i, seed), 1_000_000_000)
        wait_for(lambda: stats(data)["endpoint"]["handoff"]["consumed"] >= 50, 30, "the worker taking 50 writes")
        os.kill(c.ready["worker_pid"], signal.SIGSTOP)  # it reads nothing more
        for i in range(51, 131):  # acked by the acker, never read by the worker
            assert r.split(write(i, seed), 1_000_000_000)
        # (the worker serves the control socket: no stats while it is stopped)
        # SIGTERM: the acker asks the (stopped) worker to drain, kills it at
        # the drain deadline and reclaims everything it acked
        assert c.stop(60) == 0, c.log()
    finally:
        r.close()
    lines = [json.loads(x) for x in Layout(data).card_lost_log.read_text().splitlines()]
    lost = sorted(x["io_id"] for x in lines)
    print(f"seed {seed}: {len(lost)} writes in the lost log")
    assert lost == list(range(1, 131)), lost[:10]
    assert all(x["reason"] == "the card stopped before the appliance held it" for x in lines)
    assert {(x["offset"], x["length"]) for x in lines} == {((i % 1000) * BS, BS) for i in range(1, 131)}


def _ack_then_corrupt(r: RingSplitter, worker: int, io_id: int, offset: int, payload: bytes, seed: int) -> None:
    """Split one write while the worker is stopped, then flip one bit of its
    payload in the ring after the ack (the worker must not read it first)."""
    os.kill(worker, signal.SIGSTOP)
    try:
        bad = AugmentedWrite(io_id, 1, io_id, 1, Op.WRITE, WFlag.NONE, offset, len(payload), monotonic_ns(), payload)
        assert r.split(bad, 1_000_000_000), "the acker checks the descriptor, not the payload"
        r._data[(r.last_position - len(payload)) % len(r._data) + seed % len(payload)] ^= 0x01
    finally:
        os.kill(worker, signal.SIGCONT)


def test_the_bad_checksum_count_survives_a_worker_restart(card, seed):
    """`bad_checksum` is the card's total: a worker killed after it caught a
    bad payload does not take the count with it."""
    data, c = card
    worker = c.ready["worker_pid"]
    mib = 1 << 20
    payload = bytes((seed + i) & 0xFF for i in range(256)) * (mib // 256)
    r = RingSplitter.connect(str(Layout(data).card_sock))
    try:
        _ack_then_corrupt(r, worker, 1, 0, payload, seed)
        wait_for(lambda: stats(data)["endpoint"]["handoff"]["bad_checksum"] == 1, 30, "the worker catching it")
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: (s := _stats_or_none(data)) is not None and s["worker_pid"] != worker, 60,
                 "a new worker serving the control socket")
        ho = stats(data)["endpoint"]["handoff"]
        assert ho["worker_restarts"] == 1 and ho["bad_checksum"] == 1, ho
        _ack_then_corrupt(r, stats(data)["worker_pid"], 2, mib, payload, seed + 1)
        wait_for(lambda: stats(data)["endpoint"]["handoff"]["bad_checksum"] == 2, 30, "the new worker catching it")
        lines = [json.loads(x) for x in Layout(data).card_lost_log.read_text().splitlines()]
        assert [(x["io_id"], x["offset"]) for x in lines if "BAD_CHECKSUM" in x["reason"]] == [(1, 0), (2, mib)]
    finally:
        r.close()


def test_a_payload_corrupted_after_its_ack_is_caught_by_the_worker_and_reported_lost(card, seed):
    """The acker acks on the descriptor alone (issue 9: no 1 MiB hash on
    the ack path); the worker verifies the payload before the pipeline gets
    it. A payload changed in the ring after it was published is acked, then
    caught: never shipped, in the lost log (the host marks and resyncs its
    region), its space freed; a 1 MiB write after it reaches the worker."""
    data, c = card
    worker = c.ready["worker_pid"]
    mib = 1 << 20
    payload = bytes((seed + i) & 0xFF for i in range(256)) * (mib // 256)
    r = RingSplitter.connect(str(Layout(data).card_sock))
    try:
        os.kill(worker, signal.SIGSTOP)  # it must not read the payload before we change it
        try:
            bad = AugmentedWrite(1, 1, 1, 1, Op.WRITE, WFlag.NONE, 0, mib, monotonic_ns(), payload)
            assert r.split(bad, 1_000_000_000), "the acker checks the descriptor, not the payload"
            r._data[(r.last_position - mib) % len(r._data) + seed % mib] ^= 0x01  # one bit, after the ack
        finally:
            os.kill(worker, signal.SIGCONT)
        good = AugmentedWrite(2, 1, 2, 1, Op.WRITE, WFlag.NONE, mib, mib, monotonic_ns(), payload)
        assert r.split(good, 1_000_000_000)
        wait_for(lambda: stats(data)["endpoint"]["handoff"]["consumed"] >= 2, 30, "the worker taking both")
        st = stats(data)
        assert st["endpoint"]["handoff"]["bad_checksum"] == 1
        assert st["writes_in"] == 1, st  # only the intact one reached the pipeline
        lines = [json.loads(x) for x in Layout(data).card_lost_log.read_text().splitlines()]
        assert [(x["io_id"], x["offset"], x["length"]) for x in lines] == [(1, 0, mib)]
        assert "BAD_CHECKSUM" in lines[0]["reason"]
        assert r.released_position() >= mib  # its space is free again (the lost log has it first)
        # Until its region is covered again, later writes of its CG carry GAP:
        # no PIT after it is offered as consistent before the host's resync.
        for i in (1, 2):  # (the host posts the bad one's outcome too: a stray)
            assert r.post_outcome(i, Status.COMMITTED)
        wait_for(lambda: stats(data)["stages"]["hold"]["gap_flagged"] == 1, 30, "write 2 leaving hold flagged")
        assert stats(data)["stages"]["hold"]["gaps_open"] == 1
        cover = AugmentedWrite(3, 1, 3, 1, Op.WRITE, WFlag.NONE, 0, mib, monotonic_ns(), payload)
        assert r.split(cover, 1_000_000_000) and r.post_outcome(3, Status.COMMITTED)
        wait_for(lambda: stats(data)["stages"]["hold"]["gaps_open"] == 0, 30, "write 3 covering the region")
        assert stats(data)["stages"]["hold"]["gap_flagged"] == 1  # the covering write is a consistent PIT
    finally:
        r.close()
