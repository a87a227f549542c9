"""Issue 12 item 3 over a shaped link: the net transport (the classic
splitter) with our TCP relay (`nicsplit.testing.linkemu`) between the host
and the appliance (``[splitter] appliance`` names the relay), real processes
(`nicsplit up`, no card) and a real client (libnbd):

* QD1 (blocks alternating between no delay and D, so load hits both alike):
  every write waits for the appliance's durable ack, so an emulated
  one-way delay D makes each write slower by at least the round trip 2D
  (what the card saves: with the ring the host never waits for the link);
* cut (the connection is reset and new ones refused for a few seconds) and
  blackhole (TCP stays up, nothing arrives): the waiting writes and every
  write meanwhile mark the vdisk (the client goes on, P4); after the heal the host reconnects by itself, the resync copies
  the marked regions and the CG is protected again, with no acknowledged
  write lost and no phantom write (the ledger oracle, `check_recovered`).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pytest

from nicsplit.testing.ledger import Ledger
from nicsplit.testing.linkemu import LinkEmulator
from nicsplit.testing.procs import nbd_connect, run_cli, wait_for
from nicsplit.testing.recovered import cg_state, check_recovered
from nicsplit.testing.relayed import relayed_deployment

pytestmark = pytest.mark.usefixtures("peers")

SIZE = 8 << 20
DELAY_MS = 10.0  # one way: a round trip of 20 ms, far above this box's commit and scheduling noise
WRITES = 40
BLOCK = 5  # writes per block; blocks alternate direct / delayed
RATE = 200  # ledger writes/s during the cut test


def deployment(tmp_path: Path, seed: int):
    return relayed_deployment(
        tmp_path, seed, SIZE,
        lambda relay: {"splitter": {"transport": "net", "appliance": relay, "dead_after_s": 3},
                       "appliance": {"idle_timeout": 4, "heartbeat_interval": 1}})


def qd1_latencies(h, n: int, base: int) -> list[float]:
    """``n`` 4 KiB writes one at a time; each one's latency in ms."""
    out = []
    for i in range(n):
        t = time.perf_counter()
        h.pwrite(bytes([i & 0xFF]) * 4096, (base + i) * 4096)
        out.append((time.perf_counter() - t) * 1000)
    return out


def test_qd1_latency_grows_by_at_least_the_round_trip(tmp_path, seed):
    data, link, up = deployment(tmp_path, seed)
    try:
        with up:
            assert "card" not in up.ready["processes"]
            h = nbd_connect(up.uri("a"))
            qd1_latencies(h, 5, 0)  # the link is attached (the first write may find it connecting)
            wait_for(lambda: cg_state(data)["state"] == "protected", 60, "cg1 protected over the relay", interval=0.2)
            # paired: blocks of writes alternate between the direct and the delayed link,
            # so the box's load (an fdatasync slowed by another job) hits both alike
            direct, delayed = [], []
            for b in range(WRITES // BLOCK):
                link.set(delay_ms=0.0)
                direct += qd1_latencies(h, BLOCK, 100 + b * BLOCK)
                link.set(delay_ms=DELAY_MS)
                delayed += qd1_latencies(h, BLOCK, 200 + b * BLOCK)
            link.set(delay_ms=0.0)
            h.shutdown()
            st = cg_state(data)
            assert st["state"] == "protected", st  # no write was marked: each waited for its ack
            assert st["last_durable_seq"] >= st["host_last_seq"], st
        rtt = 2 * DELAY_MS
        p50_d, p50_l = statistics.median(direct), statistics.median(delayed)
        print(f"seed={seed}: QD1 over net, one-way delay 0 / {DELAY_MS} ms: p50 {p50_d:.2f} / {p50_l:.2f} ms, "
              f"min {min(direct):.2f} / {min(delayed):.2f} ms, max {max(direct):.2f} / {max(delayed):.2f} ms")
        assert min(delayed) >= rtt, (min(delayed), rtt)  # every write crossed the link twice before its reply
        assert p50_l - p50_d >= 0.9 * rtt, (p50_d, p50_l)
    finally:
        link.close()


def cut(link: LinkEmulator) -> None:
    link.cut()


def blackhole(link: LinkEmulator) -> None:
    link.blackhole()


def heal(link: LinkEmulator) -> None:
    link.heal()
    link.blackhole(False)


@pytest.mark.parametrize("fault", [cut, blackhole])
def test_link_fault_marks_then_resyncs_with_nothing_acknowledged_lost(tmp_path, seed, fault):
    """cut: resets, refused reconnects; blackhole: TCP stays up, nothing
    arrives, so only the writes' deadline and ``dead_after_s`` notice."""
    data, link, up = deployment(tmp_path, seed)
    try:
        with up:
            ledger = Ledger(up.uri("a"), seed, SIZE, rate=RATE)
            ledger.start()
            try:
                wait_for(lambda: (cg_state(data)["last_durable_seq"] or 0) >= 50, 60,
                         "writes journaled through the relay", interval=0.2)
                assert link.stats()["accepted"] >= 1  # the host ships through the relay
                n0, s0 = len(ledger.done), cg_state(data)["host_last_seq"]
                fault(link)
                wait_for(lambda: cg_state(data)["state"] in ("marking", "link-down"), 30,
                         f"the vdisk marking after the {fault.__name__}", interval=0.1)
                t = time.monotonic()
                wait_for(lambda: time.monotonic() - t > 3 and (fault is blackhole or link.stats()["refused"] > 0), 30,
                         f"3 s of {fault.__name__} (and a refused reconnect if cut)", interval=0.1)
                marked = run_cli(data, "status", "--json").stdout
                heal(link)
                n1, s1 = len(ledger.done), cg_state(data)["host_last_seq"]
                wait_for(lambda: len(ledger.done) >= n1 + 50, 60, "ledger writes after the heal", interval=0.1)
            finally:
                ledger.stop.set()
                ledger.join(30)
            assert ledger.error is None, ledger.error
            assert n1 > n0, "the host kept acknowledging writes while the link was cut"
            assert '"marking"' in marked, marked
            st = check_recovered(data, up.uri("a"), ledger, tmp_path, (s0, s1))
            stats = link.stats()
            print(f"seed={seed}: {len(ledger.done)} ledger writes ({n1 - n0} while cut); relay: "
                  f"{stats['accepted']} connections, refused {stats['refused']}; state {st['state']}; {fault.__name__}")
            assert stats["accepted"] >= 2 and (fault is blackhole or stats["refused"] > 0)
    finally:
        link.close()
