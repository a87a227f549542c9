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
import subprocess
from pathlib import Path

import pytest

from nicsplit.core import failpoints as fp
from nicsplit.core.layout import Layout
from nicsplit.testing.ledger import BS, block
from nicsplit.testing.procs import UpProcess, journal, nbd_connect, run_cli, wait_for
from nicsplit.testing.recovered import cg_state
from nicsplit.testing.stack import (
    cg_data, latest_pit_equals_production, qemu_io, status, switch_keeps_every_pit, wait_durable,
)

pytestmark = pytest.mark.usefixtures("peers")

SIZE = 8 << 20


def card_endpoint(data: Path) -> dict:
    return json.loads(run_cli(data, "card", "stats").stdout)["endpoint"]


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


def card_stats(data: Path) -> dict:
    return json.loads(run_cli(data, "card", "stats").stdout)


@pytest.mark.timeout(600)
def test_fio_qd32_with_reversed_interleaved_halves_is_matched(tmp_path, seed, monkeypatch):
    fpdir = tmp_path / "fp"
    fpdir.mkdir()
    monkeypatch.setenv(fp.DIR_ENV, str(fpdir))  # the host arms points written to fpdir/armed while it runs
    monkeypatch.setenv(fp.SEED_ENV, str(seed))  # which writes are reversed: seeded
    data = cg_data(tmp_path, SIZE, ("a",))
    with UpProcess(data, "--transport", "shadow") as up:
        uri = up.uri("a")
        h = nbd_connect(uri)
        # warm-up: the card's hold has a lane for cg1 before any fake half comes late
        # (a lane starts at the first seq it sees)
        for i in range(4):
            h.pwrite(block(i), i * BS)
        (fpdir / "armed").write_text("host.shadow.real-first=25%300*error(EIO)\n")
        i = 4

        def fired() -> bool:
            nonlocal i
            h.pwrite(block(i), i * BS)
            i += 1
            return (fpdir / "host.shadow.real-first.0").exists()

        wait_for(fired, 30, "the failpoint armed in the host", interval=0.01)
        h.shutdown()
        f = subprocess.run(
            ["fio", "--name=a", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k", f"--size={SIZE}",
             "--iodepth=32", "--verify=crc32c", "--verify_fatal=1", f"--randseed={seed}"],
            cwd=tmp_path, capture_output=True, text=True, timeout=400)
        assert f.returncode == 0, f.stdout + f.stderr  # production first: fio verified every block
        (fpdir / "armed").write_text("")
        reversed_ = len(list(fpdir.glob("host.shadow.real-first.*")))
        latest_pit_equals_production(data, "cg1", "a", uri, tmp_path)
        cg = cg_state(data)
        assert cg["state"] == "protected", cg
        st = card_stats(data)
        ep, hold = st["endpoint"], st["stages"]["hold"]
        # every fake half whose real half the card completed before it existed is a reversed pair
        # (more may be: the card reads its ring, then its device queue, and a pair published between
        # the two reads is seen real half first)
        assert ep["reversed"] >= reversed_ > 50, (reversed_, ep)
        assert ep["matched"] == ep["fake_halves"] == ep["real_halves"], ep
        assert ep["orphan_fake"] == ep["orphan_real"] == ep["unmatched_fake"] == ep["unmatched_real"] == 0, ep
        assert hold["lost_timeout"] == hold["lost_late"] == hold["stray_outcomes"] == 0, hold
        split = json.loads(run_cli(data, "host", "stats", "--json").stdout)["vdisks"]["a"]["split"]
        assert split["marked"] == 0, split
        recs = journal(data, "cg1")
        seqs = [r["seq"] for r in recs]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "a seq missing or repeated in the journal"
        assert not [r for r in recs if r["gap"]], "protected all along: no GAP record"
        print(f"seed={seed}: {ep['matched']} pairs matched, {reversed_} reversed, {len(recs)} records")


@pytest.mark.timeout(300)
def test_orphaned_fake_halves_are_marked_and_resynced(tmp_path, seed, monkeypatch):
    monkeypatch.setenv(fp.ENV, "host.shadow.drop-real=3*error(EIO)")  # the first 3 real halves bypass the card
    data = cg_data(tmp_path, SIZE, ("a",), sections={"card": {"outcome_timeout_ms": 1000}})
    with UpProcess(data, "--transport", "shadow") as up:
        uri = up.uri("a")
        h = nbd_connect(uri)
        for i in range(20):
            h.pwrite(block(i), i * BS)  # production first: every write succeeds
        wait_for(lambda: card_stats(data)["stages"]["hold"]["lost_timeout"] >= 3, 60,
                 "the card losing the 3 orphaned fake halves at its timeout", interval=0.2)
        lost = [json.loads(x) for x in Layout(data).card_lost_log.read_text().splitlines()]
        assert sorted(x["offset"] for x in lost) == [0, BS, 2 * BS], lost
        wait_for(lambda: cg_state(data)["state"] == "protected", 120, "cg1 resynced and protected", interval=0.2)
        for i in range(20, 24):
            h.pwrite(block(i), i * BS)
        latest_pit_equals_production(data, "cg1", "a", uri, tmp_path)
        st = card_stats(data)
        assert st["stages"]["hold"]["lost_timeout"] == 3, st["stages"]["hold"]
        wait_for(lambda: card_stats(data)["endpoint"]["orphan_fake"] == 3, 10, "the card counting 3 orphans",
                 interval=0.1)
        # the resync journaled the orphaned blocks again, flagged GAP
        recs = journal(data, "cg1")
        for i in range(3):
            assert any(r["gap"] and r["offset"] <= i * BS < r["offset"] + r["length"] for r in recs), (i, recs)
        h.shutdown()
        print(f"seed={seed}: 3 orphans marked and resynced; {len(recs)} records")


def test_switching_ring_shadow_ring_keeps_every_pit(tmp_path, seed):
    data = cg_data(tmp_path, SIZE, ("a",))
    pits = switch_keeps_every_pit(data, tmp_path, (("ring", 0x11), ("shadow", 0x22), ("ring", 0x33)))
    print(f"seed={seed}: PITs {pits} kept across ring -> shadow -> ring")
