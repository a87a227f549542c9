"""Transport selection drives the card (issue 12; docs/operations.md
"Choosing a transport"), with real processes (`nicsplit up`) and real
clients (qemu-io, libnbd, qemu-img):

* ``nicsplit up --transport nvme-pi`` starts the card serving nvme-pi (no
  ``[card] transport`` set) and the host's card link is nvme-pi: qemu-io
  writes reach the journal with their virtual identity, the latest PIT
  equals production;
* switching ring -> nvme-pi -> ring across restarts keeps every PIT;
* a write the nvme-pi card acked and then could not make durable (the
  appliance stopped, then ``up`` stopped) is in the card's lost-writes log,
  and the next start's host (on nvme-pi) reads it, marks and resyncs it;
* two card transports in use, or an explicit ``[card] transport`` that
  disagrees with the vdisks', are refused at start with one clear line.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from nicsplit.core.layout import Layout
from nicsplit.testing.ledger import BS, block
from nicsplit.testing.procs import UpProcess, journal, nbd_connect, run_cli, wait_for
from nicsplit.testing.stack import (
    cg_data, host_card_link, latest_pit_equals_production, qemu_io, status, switch_keeps_every_pit, wait_durable,
)

pytestmark = pytest.mark.usefixtures("peers")

SIZE = 8 << 20


def test_up_transport_nvme_pi_journals_writes_with_their_identity(tmp_path, seed):
    data = cg_data(tmp_path, SIZE, ("a",))
    with UpProcess(data, "--transport", "nvme-pi") as up:
        assert "card" in up.ready["processes"], up.ready
        uri = up.uri("a")
        pat = seed & 0xFF
        qemu_io(uri, f"write -P {pat:#x} 1M 64k", "write -P 0x5a 1000 3000", "write -f -P 0x77 3M 4k",
                "write -z 2M 64k", "flush", f"write -P {pat ^ 0xFF:#x} 5M 200k")
        cg = wait_durable(data)
        (v,) = [v for c in status(data)["cgs"] for v in c["vdisks"]]
        assert v["state"] == "protected" and v.get("transport") == "nvme-pi", v
        stats = json.loads(run_cli(data, "host", "stats", "--json").stdout)
        # the card link is nvme-pi (its counters have the guard check), no ring link exists
        assert "guard_errors" in stats["card_transport"] and stats["card_transport"]["rejected"] == 0, stats["card_transport"]
        assert not [k for k in stats if k.endswith("_transport") and k != "card_transport"], stats.keys()
        assert stats["vdisks"]["a"]["split"]["marked"] == 0, stats["vdisks"]["a"]["split"]
        recs = journal(data, "cg1")
        got = {(r["op"], r["offset"], r["length"]) for r in recs}
        for want in (("write", 1 << 20, 65536), ("write", 1000, 3000), ("write", 3 << 20, 4096),
                     ("zero", 2 << 20, 65536), ("write", 5 << 20, 200 << 10)):
            assert want in got, (want, sorted(got))
        seqs = [r["seq"] for r in recs]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs) and seqs[-1] == cg["host_last_seq"], seqs
        latest_pit_equals_production(data, "cg1", "a", uri, tmp_path)
        print(f"seed={seed}: {len(recs)} records over nvme-pi")


def test_switching_ring_nvme_pi_ring_keeps_every_pit(tmp_path, seed):
    data = cg_data(tmp_path, SIZE, ("a",))
    pits = switch_keeps_every_pit(data, tmp_path, (("ring", 0x11), ("nvme-pi", 0x22), ("ring", 0x33)))
    print(f"seed={seed}: PITs {pits} kept across ring -> nvme-pi -> ring")


def vdisk_states(data: Path) -> dict[str, str]:
    (cg,) = status(data)["cgs"]
    return {v["name"]: v["state"] for v in cg["vdisks"]}


@pytest.mark.timeout(300)
def test_a_write_the_nvme_pi_card_lost_is_found_by_the_host(tmp_path):
    """The card acks writes while the appliance is stopped; ``up`` stops
    (host first, then the card, which gives up draining and logs them in its
    lost-writes log); the next start's host, on nvme-pi, reads that log,
    marks and resyncs: the latest PIT equals production."""
    data = cg_data(tmp_path, names=("a",), timeout_us=1000)
    with UpProcess(data, "--transport", "nvme-pi") as up:
        h = nbd_connect(up.uri("a"))
        for i in range(8):
            h.pwrite(block(i), i * BS)
        wait_for(lambda: len(journal(data, "cg1")) >= 8, 60, "the first writes journaled", interval=0.1)
        first_last = max(r["seq"] for r in journal(data, "cg1"))
        appliance, card = up.pid_of("appliance"), up.pid_of("card")
        os.kill(appliance, signal.SIGSTOP)
        try:
            for i in range(8, 24):  # acked by the nvme-pi card; the appliance never sees them before the stop
                h.pwrite(block(i), i * BS)
            h.shutdown()
            up.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: not os.path.exists(f"/proc/{card}"), 120, "the card to stop", interval=0.2)
        finally:
            os.kill(appliance, signal.SIGCONT)
        assert up.proc.wait(120) == 0
    lost = [json.loads(x) for x in Layout(data).card_lost_log.read_text().splitlines()]
    assert {x["offset"] for x in lost} >= {i * BS for i in range(8, 24)}, lost
    assert not (Layout(data).run / "nvme-pi-lost.log").exists()  # no second log that nothing writes
    with UpProcess(data, "--transport", "nvme-pi") as up:
        assert host_card_link(data) == "nvme-pi"
        wait_for(lambda: set(vdisk_states(data).values()) == {"protected"}, 120,
                 "a resynced and protected again by itself", interval=0.2)
        latest_pit_equals_production(data, "cg1", "a", up.uri("a"), tmp_path)
        # the resync journaled the lost blocks again, after what the first run journaled
        later = [r for r in journal(data, "cg1") if r["seq"] > first_last]
        for i in range(8, 24):
            assert any(r["offset"] <= i * BS < r["offset"] + r["length"] for r in later), (i, later)


def test_two_card_transports_or_a_disagreeing_card_transport_are_refused(tmp_path):
    data = cg_data(tmp_path / "two", SIZE, ("a",), vdisks={"b": {"transport": "nvme-pi"}})
    run_cli(data, "vdisk", "create", "b", "--size", str(SIZE))  # no CG: only the card is shared
    for args in (["up"], ["host", "serve", "--listen", "127.0.0.1:0"]):
        p = run_cli(data, *args, check=False, timeout=60)
        assert p.returncode != 0 and "two card transports (nvme-pi: b; ring: a" in p.stderr, (args, p.stderr)
        assert "one card serves one transport" in p.stderr and "Traceback" not in p.stderr, p.stderr
    data = cg_data(tmp_path / "explicit", SIZE, ("a",), sections={"card": {"transport": "ring"}})
    p = run_cli(data, "up", "--transport", "nvme-pi", check=False, timeout=60)
    assert p.returncode != 0 and "[card] transport = 'ring', but the vdisks use 'nvme-pi'" in p.stderr, p.stderr
    assert not Layout(data).pid("card").exists() and not Layout(data).pid("host").exists()  # refused before any start
