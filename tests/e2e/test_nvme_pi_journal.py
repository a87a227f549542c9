"""nvme-pi end to end: ``nicsplit up --transport nvme-pi`` (the first run
also sets ``[card] transport``, which must then agree) starts the card
serving the nvme-pi transport and the host's splitter attaches with it; a real client (qemu-io) writes a deterministic workload
at QD1; the journal (every record's seq, vdisk, op, offset and length) and
the images it replays to are the same as with the ring transport."""

from __future__ import annotations

import hashlib
import json
import subprocess

import pytest

from nicsplit.core.ctl import request
from nicsplit.core.layout import Layout
from nicsplit.testing.procs import UpProcess, run_cli, wait_for
from nicsplit.testing.stack import cg_data, cg_status, latest_pit_equals_production, wait_caught_up

pytestmark = pytest.mark.usefixtures("peers")

SIZE = 32 << 20


def qemu_commands(seed: int) -> list[str]:
    """Aligned, unaligned, multi-block, FUA, zero and discard writes; a flush."""
    cmds = []
    for i in range(12):
        pat = (seed + 13 * i) & 0xFF
        cmds += ["-c", f"write -P {pat:#x} {(i * 7 % 24) << 20} {4096 << (i % 5)}"]
    cmds += ["-c", f"write -P {seed & 0xFF:#x} 1000 3000", "-c", "write -f -P 0x5a 5120 512",
             "-c", "write -z 2M 64k", "-c", "discard 3M 128k", "-c", "flush",
             "-c", f"write -P {(seed >> 8) & 0xFF:#x} 8M 200k"]
    return cmds


def run_once(tmp_path, transport: str, seed: int) -> tuple[list, dict]:
    # nvme-pi: [card] transport set explicitly and agreeing; ring: selection alone
    data = cg_data(tmp_path / transport, SIZE, ("a",),
                   sections={"card": {"transport": transport}} if transport == "nvme-pi" else None)
    with UpProcess(data, "--transport", transport) as up:
        wait_for(lambda: cg_status(data)["state"] == "protected", 60, "the CG protected")
        subprocess.run(["qemu-io", "-f", "raw", "-t", "writeback", *qemu_commands(seed), up.uri("a")], check=True,
                       capture_output=True, timeout=120)
        wait_caught_up(data)
        stats = request(Layout(data).host_sock, {"cmd": "stats"})["stats"]
        split = stats["vdisks"]["a"]["split"]
        assert split["marked"] == 0 and split["state"] == "protected", split
        assert stats["card_transport"]["rejected"] == 0, stats["card_transport"]
        if transport == "nvme-pi":
            assert "guard_errors" in stats["card_transport"], stats["card_transport"]
    rows = json.loads(run_cli(data, "journal", "dump", "cg1", "--json").stdout)["records"]
    out = tmp_path / f"replay-{transport}"
    run_cli(data, "journal", "replay", "cg1", "--out", str(out))
    images = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir()) if p.is_file()}
    return [{k: v for k, v in r.items() if k != "time"} for r in rows], images


def test_journal_on_nvme_pi_equals_the_rings(tmp_path, seed):
    nvme_rows, nvme_images = run_once(tmp_path, "nvme-pi", seed)
    ring_rows, ring_images = run_once(tmp_path, "ring", seed)
    print(f"seed {seed}: {len(nvme_rows)} records")
    assert len(nvme_rows) >= 17  # every write of the workload (qemu-io may add a flush)
    assert nvme_rows == ring_rows
    assert nvme_images and nvme_images == ring_images


def test_a_guard_error_marks_the_vdisk_and_the_resync_makes_it_whole(tmp_path, seed, monkeypatch):
    """One payload corrupted after its guard was computed (the failpoint
    host.nvme-pi.after-pi): the card completes it 282h, the host marks the
    region and resyncs it; the CG is protected again and its latest PIT
    equals production."""
    monkeypatch.setenv("NICSPLIT_FAILPOINTS", "host.nvme-pi.after-pi=1*error(EIO)")
    data = cg_data(tmp_path, SIZE, ("a",), sections={"splitter": {"transport": "nvme-pi"}})
    with UpProcess(data) as up:
        wait_for(lambda: cg_status(data)["state"] == "protected", 60, "the CG protected")
        subprocess.run(["qemu-io", "-f", "raw", "-t", "writeback", *qemu_commands(seed), up.uri("a")], check=True,
                       capture_output=True, timeout=120)

        def transport() -> dict:
            return request(Layout(data).host_sock, {"cmd": "stats"})["stats"]["card_transport"]

        wait_for(lambda: transport()["guard_errors"] == 1, 30, "the card's 282h completion")
        split = request(Layout(data).host_sock, {"cmd": "stats"})["stats"]["vdisks"]["a"]["split"]
        print(f"seed {seed}: transport {transport()}, split {split}")
        wait_for(lambda: cg_status(data)["state"] == "protected", 120, "the resync to end")
        latest_pit_equals_production(data, "cg1", "a", up.uri("a"), tmp_path)
        assert transport()["guard_errors"] == 1 and transport()["rejected"] >= 1
