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
import socket
import subprocess
import time
from pathlib import Path

import pytest

from nicsplit.control.ops import pits_doc
from nicsplit.control.status import system_status
from nicsplit.core import config
from nicsplit.core.ctl import request
from nicsplit.core.layout import Layout
from nicsplit.testing.datadir import init_data
from nicsplit.testing.ledger import Ledger, check_prefix
from nicsplit.testing.linkemu import LinkEmulator
from nicsplit.testing.procs import UpProcess, run_cli, wait_for

pytestmark = pytest.mark.usefixtures("peers")

SIZE = 8 << 20
IDLE_S = 4  # the appliance drops a silent card after this
DEAD_S = 3
RATE = 400  # ledger writes/s: the journals to replay stay small on a loaded box  # the card drops a silent appliance (with batches unacked) after this


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deployment(tmp_path: Path, seed: int):
    appliance = ("127.0.0.1", free_port())
    link = LinkEmulator(("127.0.0.1", 0), appliance, seed=seed).start()
    data = init_data(tmp_path / "data", filters=["stats", {"name": "split", "split_timeout_us": 1_000_000}],
                     sections={"card": {"transport_options": {"data_size": "256M"}, "dead_after_s": DEAD_S,
                                        "appliance": f"{link.address[0]}:{link.address[1]}"},
                               "appliance": {"idle_timeout": IDLE_S, "heartbeat_interval": 1}})
    run_cli(data, "cg", "create", "cg1")
    run_cli(data, "vdisk", "create", "a", "--size", str(SIZE), "--cg", "cg1")
    up = UpProcess(data, "--appliance-listen", f"{appliance[0]}:{appliance[1]}")
    return data, link, up


def status(data: Path) -> dict:
    """What `nicsplit status --json` says of cg1, computed here: on a loaded
    box each CLI start costs seconds, and the waits below poll."""
    (cg,) = system_status(config.load(data))["cgs"]
    return cg


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
                wait_for(lambda: (status(data)["last_durable_seq"] or 0) >= 50, 60,
                         "writes journaled through the relay", interval=0.2)
                assert link.stats()["accepted"] >= 1  # the card ships through the relay
                n0, s0 = len(ledger.done), status(data)["host_last_seq"]
                fault(link, data)
                n1, s1 = len(ledger.done), status(data)["host_last_seq"]
                # Recovered by itself: the link is up again and the writes made since reach the journal.
                wait_for(lambda: card_link(data).get("connected"), 60, "the card reconnected", interval=0.2)
                wait_for(lambda: len(ledger.done) >= n1 + 50, 60, "ledger writes after the fault", interval=0.1)
            finally:
                ledger.stop.set()
                ledger.join(30)
            assert ledger.error is None, ledger.error
            assert n1 > n0, "the host kept acknowledging writes through the fault"
            t_check = time.monotonic()
            st = check_everything(data, up, ledger, tmp_path, (s0, s1))
            print(f"checks took {time.monotonic() - t_check:.1f}s, the case {time.monotonic() - t_case:.1f}s")
            stats = link.stats()
            print(f"seed={seed}: {len(ledger.done)} ledger writes ({n1 - n0} during the fault); relay: "
                  f"{stats['accepted']} connections, refused {stats['refused']}, "
                  f"c2s {json.dumps({k: v for k, v in stats['directions']['c2s'].items() if k != 'flipped'})}; "
                  f"state {st['state']}")
            return stats
    finally:
        link.close()


def check_everything(data: Path, up: UpProcess, ledger: Ledger, tmp_path: Path, fault: tuple[int, int]) -> dict:
    last = status(data)["host_last_seq"]
    wait_for(lambda: (status(data)["last_durable_seq"] or 0) >= last, 120, f"the journal reaching seq {last}",
             interval=0.2)
    st = wait_for(lambda: (s := status(data))["state"] == "protected" and s, 120, "the CG protected", interval=0.2)
    latest = tmp_path / "latest.raw"
    run_cli(data, "restore", "a", "--latest", "--to", str(latest), "--force", timeout=120)
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(latest), up.uri("a")],
                   check=True, capture_output=True, timeout=120)
    # Every acknowledged write, and nothing else: the whole ledger, as a prefix.
    assert check_prefix(latest.read_bytes(), ledger) == len(ledger.done)
    pits = pits_doc(config.load(data), "cg1", every=True)["pits"]
    consistent = [p for p in pits if p["consistent"]]
    assert consistent, pits
    # The consistent PITs around the fault: the last before it, one inside, the first after.
    before = [p for p in consistent if p["seq"] <= fault[0]][-1:]
    inside = [p for p in consistent if fault[0] < p["seq"] < fault[1]]
    after = [p for p in consistent if p["seq"] >= fault[1]][:1]
    sample = before + inside[len(inside) // 2:][:1] + after
    assert before and after, (fault, [p["seq"] for p in consistent])
    lengths = []
    for p in sample:
        out = tmp_path / f"pit-{p['seq']}.raw"
        run_cli(data, "restore", "a", "--seq", str(p["seq"]), "--to", str(out), "--force", timeout=120)
        lengths.append(check_prefix(out.read_bytes(), ledger))
        out.unlink()
    print(f"PITs {[p['seq'] for p in sample]} (fault between seq {fault[0]} and {fault[1]}) restore "
          f"ledger prefixes {lengths}")
    assert lengths == sorted(lengths), lengths  # later PITs hold longer prefixes
    return st


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


def test_duplicated_chunk(tmp_path, seed):
    def fault(link: LinkEmulator, data: Path) -> None:
        first = link.stats()["accepted"]
        link.duplicate("c2s")
        wait_for(lambda: link.stats()["accepted"] > first, 30, "TLS to catch the replay and the card to reconnect",
                 interval=0.1)

    stats = run_fault(tmp_path, seed, fault)
    assert stats["directions"]["c2s"]["duplicated"] == 1


def test_flipped_byte(tmp_path, seed):
    def fault(link: LinkEmulator, data: Path) -> None:
        first = link.stats()["accepted"]
        link.flip("c2s", after=100 + seed % 4000)
        wait_for(lambda: link.stats()["accepted"] > first, 30, "TLS to catch the flip and the card to reconnect",
                 interval=0.1)

    stats = run_fault(tmp_path, seed, fault)
    assert len(stats["directions"]["c2s"]["flipped"]) == 1
