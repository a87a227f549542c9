"""Issue 11, "a fault suite": full storage, with a ledger writer (libnbd)
running on a real deployment (`nicsplit up`):

* a full hidden volume and a full overflow log (the appliance stopped): the
  card refuses, the host marks, and once the appliance is back the vdisk
  resyncs by itself;
* ENOSPC on the journal's filesystem (a small tmpfs mounted on the journal
  directory, room for the whole test's journal, then filled up by a filler
  file, which is removed to give the space back): the appliance refuses to ack what it cannot make
  durable and says why ("No space left on device"), the card holds the
  batches (overflow log), and once space returns everything is journaled.

After each: nothing acknowledged lost, no phantom write, the latest PIT
equals production, and the consistent PITs around the fault are exact
prefixes of the ledger (`nicsplit.testing.recovered`)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from nicsplit.core.ctl import request
from nicsplit.core.layout import Layout
from nicsplit.testing.datadir import init_data
from nicsplit.testing.ledger import Ledger
from nicsplit.testing.procs import UpProcess, run_cli, wait_for
from nicsplit.testing.recovered import cg_state, check_recovered

pytestmark = pytest.mark.usefixtures("peers")

SIZE = 8 << 20
RATE = 400  # ledger writes/s


def deployment(tmp_path: Path, card: dict, appliance: dict | None = None) -> Path:
    data = init_data(tmp_path / "data", filters=["stats", {"name": "split", "split_timeout_us": 1_000_000}],
                     sections={"card": card, "appliance": appliance or {}})
    run_cli(data, "cg", "create", "cg1")
    run_cli(data, "vdisk", "create", "a", "--size", str(SIZE), "--cg", "cg1")
    return data


def card_stats(data: Path) -> dict:
    return (request(Layout(data).card_ctl_sock, {"cmd": "stats"}) or {}).get("stats", {})


def vdisk_state(data: Path) -> str:
    (v,) = cg_state(data)["vdisks"]
    return v["state"]


def test_full_hidden_volume_and_overflow_log_mark_then_resync(tmp_path, seed):
    data = deployment(tmp_path, {"transport_options": {"data_size": "4M"}, "overflow_max": "1M"})
    with UpProcess(data) as up:
        ledger = Ledger(up.uri("a"), seed, SIZE, rate=RATE)
        ledger.start()
        try:
            wait_for(lambda: (cg_state(data)["last_durable_seq"] or 0) >= 50, 60, "writes journaled", interval=0.2)
            appliance = up.pid_of("appliance")
            s0 = cg_state(data)["host_last_seq"]
            os.kill(appliance, signal.SIGSTOP)
            try:
                wait_for(lambda: card_stats(data).get("full"), 120, "the ring and the overflow log full", interval=0.2)
                wait_for(lambda: vdisk_state(data) == "marking", 60, "the host marking", interval=0.2)
                full = card_stats(data)
            finally:
                os.kill(appliance, signal.SIGCONT)
            try:
                wait_for(lambda: vdisk_state(data) == "protected", 180, "the resync to end by itself", interval=0.2)
            except TimeoutError as e:  # say where it stood: the host's vdisk, the card's buffers
                host = request(Layout(data).host_sock, {"cmd": "status"})["status"]
                raise AssertionError(f"{e}\nhost: {host['vdisks']}\ncard: {card_stats(data)}") from None
            s1 = cg_state(data)["host_last_seq"]
            n1 = len(ledger.done)
            wait_for(lambda: len(ledger.done) >= n1 + 50, 60, "ledger writes after the resync", interval=0.1)
        finally:
            ledger.stop.set()
            ledger.join(30)
        assert ledger.error is None, ledger.error
        ovf = full["overflow"]
        print(f"seed={seed}: card full with overflow {ovf}; {len(ledger.done)} ledger writes")
        assert full["endpoint"]["refused_full"] > 0, full["endpoint"]
        check_recovered(data, up.uri("a"), ledger, tmp_path, (s0, s1))
        host = request(Layout(data).host_sock, {"cmd": "status"})["status"]
        assert host["vdisks"][0]["marked"] > 0, host  # it did go through marking


def fill(path: Path) -> int:
    """Write a filler file until the filesystem is full; its size."""
    n = 0
    with open(path, "wb", buffering=0) as f:
        chunk = b"\xff" * (64 << 10)
        while True:
            try:
                n += f.write(chunk)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                if len(chunk) == 512:
                    return n
                chunk = chunk[: len(chunk) // 2]


def test_enospc_on_the_journal_filesystem_holds_then_recovers(tmp_path, seed):
    data = deployment(tmp_path, {"transport_options": {"data_size": "64M"}}, {"segment_size": "1M"})
    jdir = Layout(data).appliance / "journal"
    jdir.mkdir(parents=True, exist_ok=True)
    assert not any(jdir.iterdir()), list(jdir.iterdir())
    # The CI machine runs the suite as root (scripts/setup-system.sh), which may mount a tmpfs.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512m,mode=0700", "tmpfs", str(jdir)], check=True,
                   capture_output=True, timeout=30)
    try:
        with UpProcess(data) as up:
            ledger = Ledger(up.uri("a"), seed, SIZE, rate=RATE)
            ledger.start()
            try:
                wait_for(lambda: (cg_state(data)["last_durable_seq"] or 0) >= 50, 60, "writes journaled",
                         interval=0.2)
                s0 = cg_state(data)["host_last_seq"]
                filler = jdir / "filler"
                filled = fill(filler)
                log = Layout(data).log("appliance")
                wait_for(lambda: "No space left on device" in log.read_text(errors="replace"), 60,
                         "the appliance to say the journal's filesystem is full", interval=0.2)
                t = time.monotonic()
                wait_for(lambda: time.monotonic() - t > 3 and card_stats(data).get("cgs", {}).get("cg1", {})
                         .get("lagging"), 60, "the card holding batches for a while", interval=0.2)
                held = card_stats(data)
                assert (cg_state(data)["last_durable_seq"] or 0) < cg_state(data)["host_last_seq"]
                filler.unlink()
                s1 = cg_state(data)["host_last_seq"]
                n1 = len(ledger.done)
                wait_for(lambda: len(ledger.done) >= n1 + 50, 60, "ledger writes after space returned",
                         interval=0.1)
            finally:
                ledger.stop.set()
                ledger.join(30)
            assert ledger.error is None, ledger.error
            print(f"seed={seed}: filler {filled >> 10} KiB; card while full: overflow {held['overflow']}, "
                  f"cg1 {held['cgs']['cg1']}; {len(ledger.done)} ledger writes")
            assert vdisk_state(data) in ("protected", "lagging")  # the card held everything: no marking
            check_recovered(data, up.uri("a"), ledger, tmp_path, (s0, s1))
            host = request(Layout(data).host_sock, {"cmd": "status"})["status"]
            assert host["vdisks"][0]["marked"] == 0, host
    finally:
        subprocess.run(["umount", "-l", str(jdir)], capture_output=True, timeout=30)
