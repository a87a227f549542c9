"""Issue 11, "a fault suite": link faults between the card and the appliance,
through our own TCP fault relay (`nicsplit.testing.linkemu`). A real
deployment (`nicsplit up`) whose card ships to the appliance *through* the
relay (``[card] appliance``), a ledger writer (libnbd) running throughout:

* cut for a few seconds (connections reset, new ones refused);
* blackhole for longer than the appliance's and the card's idle timeouts
  (TCP stays up, nothing arrives);
* one duplicated chunk, one flipped byte (TLS must catch both).

After each, with no command, the system recovers (TLS error or timeout →
reconnect → the unconfirmed batches are sent again); then: no acknowledged
write lost and no phantom write (the latest PIT restores exactly the whole
ledger, and equals production by `qemu-img compare`), and the consistent PITs
around the fault (the last before, one inside, the first after) are exact
prefixes of the ledger (the oracle)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from nicsplit.core.ctl import request
from nicsplit.core.layout import Layout
from nicsplit.testing.ledger import Ledger
from nicsplit.testing.linkemu import LinkEmulator
from nicsplit.testing.procs import wait_for
from nicsplit.testing.recovered import cg_state, check_recovered
from nicsplit.testing.relayed import relayed_deployment

pytestmark = pytest.mark.usefixtures("peers")

SIZE = 8 << 20
IDLE_S = 4  # the appliance drops a silent card after this
DEAD_S = 3
RATE = 400  # ledger writes/s: the journals to replay stay small on a loaded box  # the card drops a silent appliance (with batches unacked) after this


def deployment(tmp_path: Path, seed: int):
    return relayed_deployment(
        tmp_path, seed, SIZE,
        lambda relay: {"card": {"transport_options": {"data_size": "256M"}, "dead_after_s": DEAD_S,
                                "appliance": relay},
                       "appliance": {"idle_timeout": IDLE_S, "heartbeat_interval": 1}},
        filters=["stats", {"name": "split", "split_timeout_us": 1_000_000}])


def card_link(data: Path) -> dict:
    r = request(Layout(data).card_ctl_sock, {"cmd": "stats"}) or {}
    return r.get("stats", {}).get("appliance", {})


def run_fault(tmp_path: Path, seed: int, fault) -> dict:
    t_case = time.monotonic()
    data, link, up = deployment(tmp_path, seed)
    try:
        with up:
            ledger = Ledger(up.uri("a"), seed, SIZE, rate=RATE)
            ledger.start()
            try:
                wait_for(lambda: (cg_state(data)["last_durable_seq"] or 0) >= 50, 60,
                         "writes journaled through the relay", interval=0.2)
                assert link.stats()["accepted"] >= 1  # the card ships through the relay
                n0, s0 = len(ledger.done), cg_state(data)["host_last_seq"]
                fault(link, data)
                n1, s1 = len(ledger.done), cg_state(data)["host_last_seq"]
                # Recovered by itself: the link is up again and the writes made since reach the journal.
                wait_for(lambda: card_link(data).get("connected"), 60, "the card reconnected", interval=0.2)
                wait_for(lambda: len(ledger.done) >= n1 + 50, 60, "ledger writes after the fault", interval=0.1)
            finally:
                ledger.stop.set()
                ledger.join(30)
            assert ledger.error is None, ledger.error
            assert n1 > n0, "the host kept acknowledging writes through the fault"
            t_check = time.monotonic()
            st = check_recovered(data, up.uri("a"), ledger, tmp_path, (s0, s1))
            print(f"checks took {time.monotonic() - t_check:.1f}s, the case {time.monotonic() - t_case:.1f}s")
            stats = link.stats()
            print(f"seed={seed}: {len(ledger.done)} ledger writes ({n1 - n0} during the fault); relay: "
                  f"{stats['accepted']} connections, refused {stats['refused']}, "
                  f"c2s {json.dumps({k: v for k, v in stats['directions']['c2s'].items() if k != 'flipped'})}; "
                  f"state {st['state']}")
            return stats
    finally:
        link.close()


def test_cut_for_a_few_seconds(tmp_path, seed):
    def fault(link: LinkEmulator, data: Path) -> None:
        link.cut()
        wait_for(lambda: not card_link(data).get("connected"), 30, "the card to see the link down", interval=0.1)
        t = time.monotonic()
        wait_for(lambda: time.monotonic() - t > 3 and link.stats()["refused"] > 0, 30,
                 "3 s of cut link and a refused reconnect", interval=0.1)
        link.heal()

    stats = run_fault(tmp_path, seed, fault)
    assert stats["refused"] > 0 and stats["accepted"] >= 2


def test_blackhole_longer_than_the_idle_timeouts(tmp_path, seed):
    def fault(link: LinkEmulator, data: Path) -> None:
        first = link.stats()["accepted"]
        link.blackhole()
        t = time.monotonic()
        # Both ends give up on their own: the card reconnects (into the blackhole too).
        wait_for(lambda: link.stats()["accepted"] > first, 30, "the card to drop the silent link and reconnect",
                 interval=0.1)
        wait_for(lambda: time.monotonic() - t > IDLE_S + 2, 30, "a blackhole longer than the idle timeouts",
                 interval=0.2)
        link.heal()

    stats = run_fault(tmp_path, seed, fault)
    assert stats["directions"]["c2s"]["dropped_bytes"] > 0


def test_duplicated_chunk_then_flipped_byte(tmp_path, seed):
    """Both are TLS errors at the appliance: one deployment takes both in turn."""
    def fault(link: LinkEmulator, data: Path) -> None:
        first = link.stats()["accepted"]
        link.duplicate("c2s")
        wait_for(lambda: link.stats()["accepted"] > first, 30, "TLS to catch the replay and the card to reconnect",
                 interval=0.1)
        wait_for(lambda: card_link(data).get("connected"), 60, "the card reconnected", interval=0.2)
        second = link.stats()["accepted"]
        link.flip("c2s", after=100 + seed % 4000)
        wait_for(lambda: link.stats()["accepted"] > second, 30, "TLS to catch the flip and the card to reconnect",
                 interval=0.1)

    stats = run_fault(tmp_path, seed, fault)
    c2s = stats["directions"]["c2s"]
    assert c2s["duplicated"] == 1 and len(c2s["flipped"]) == 1, c2s
    assert stats["accepted"] >= 3
