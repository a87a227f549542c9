"""qemu boots from an image export: a hand-assembled MBR written to a
protected vdisk through the host, bookmarked, its second sector then
overwritten; `nicsplit image export` of the bookmark and of the latest PIT
each boot in qemu-system-x86_64 (TCG, SeaBIOS), and the guest prints the
second sector, as read through the BIOS from the export, to its serial port.
So the BIOS loading the MBR and a BIOS disk read both go through the image
server, and the tag on the serial port says which point in time was served.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from nicsplit.testing.datadir import init_data
from nicsplit.testing.procs import UpProcess, nbd_connect, run_cli, wait_for

from bootsector import SECTOR, boot_sector, message_sector

pytestmark = pytest.mark.usefixtures("peers")

SIZE = 8 << 20
QEMU = "qemu-system-x86_64"
BOOT_TIMEOUT = 60.0


def _boot(url: str, workdir: Path, *, read_only: bool) -> str:
    """Boot ``url`` in qemu and return the first line the guest prints to
    COM1. A read-only export needs ``snapshot=on``: an IDE disk cannot be
    read-only in qemu, so qemu puts a throw-away qcow2 overlay (in TMPDIR)
    over the export and opens the export itself read-only."""
    workdir.mkdir(parents=True)
    serial, stderr_path = workdir / "serial.log", workdir / "qemu.stderr"
    drive = f"file={url},format=raw,if=ide" + (",snapshot=on" if read_only else "")
    argv = [QEMU, "-accel", "tcg", "-display", "none", "-nodefaults", "-no-reboot", "-m", "32",
            "-serial", f"file:{serial}", "-drive", drive]
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "TMPDIR": str(workdir)}

    def report(why: str) -> str:
        out = serial.read_bytes() if serial.exists() else b""
        return (f"{why}\nqemu: {' '.join(argv)}\nserial so far: {out!r}\n"
                f"qemu stderr:\n{stderr_path.read_text(errors='replace')}")

    with open(stderr_path, "wb") as err:
        qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=env, cwd=workdir)
    try:
        # The guest halts after printing: wait for a whole line on its serial
        # port (a condition with a deadline), then stop qemu.
        def first_line() -> tuple[str] | None:
            out = serial.read_bytes() if serial.exists() else b""
            if b"\n" in out:
                return (out.split(b"\n", 1)[0].decode("ascii", errors="replace"),)
            if qemu.poll() is not None:
                raise AssertionError(report(f"qemu exited {qemu.returncode} before the guest printed a line"))
            return None

        try:
            return wait_for(first_line, BOOT_TIMEOUT, "a line on the guest's serial port", interval=0.02)[0]
        except TimeoutError:
            raise AssertionError(report(f"no line on the guest's serial port in {BOOT_TIMEOUT:.0f} s")) from None
    finally:
        if qemu.poll() is None:
            qemu.kill()
        qemu.wait(30)


def test_qemu_boots_an_image_export(tmp_path):
    if shutil.which(QEMU) is None:
        pytest.fail(f"{QEMU} missing (make test installs it: scripts/setup-system.sh)")
    data = init_data(tmp_path / "data", filters=["stats", {"name": "split", "split_timeout_us": 1_000_000}],
                     sections={"card": {"transport_options": {"data_size": "256M"}}})
    run_cli(data, "cg", "create", "cg1")
    for n in ("boot", "other"):  # a second vdisk: the image holds every vdisk of the CG
        run_cli(data, "vdisk", "create", n, "--size", str(SIZE), "--cg", "cg1")
    mbr = boot_sector()
    assert len(mbr) == SECTOR and mbr[-2:] == b"\x55\xaa"
    with UpProcess(data) as up:
        # Production through the host: the MBR and "tag A" in sector 2, bookmark A
        # (a barrier through the card: it covers every acknowledged write).
        h = nbd_connect(up.uri("boot"))
        h.pwrite(mbr + message_sector("NICSPLIT-BOOT tag A\n"), 0)
        h.flush()
        mark_a = json.loads(run_cli(data, "bookmark", "cg1", "A", "--json").stdout)
        # Then "tag B" over sector 2 only, and bookmark B: the latest PIT.
        h.pwrite(message_sector("NICSPLIT-BOOT tag B\n"), SECTOR)
        h.flush()
        h.shutdown()
        mark_b = json.loads(run_cli(data, "bookmark", "cg1", "B", "--json").stdout)
        assert mark_b["seq"] > mark_a["seq"]

        for args, seq, tag, read_only in (
            (("--bookmark", "A"), mark_a["seq"], "A", True),
            (("--latest",), mark_b["seq"], "B", True),
            (("--latest", "--writable"), mark_b["seq"], "B", False),  # qemu opens it read-write
        ):
            img = json.loads(run_cli(data, "image", "export", "cg1", *args, "--json").stdout)
            try:
                assert img["seq"] == seq and img["writable"] == (not read_only), img
                assert set(img["exports"]) == {"boot", "other"}, img
                t = time.monotonic()
                line = _boot(img["exports"]["boot"], tmp_path / f"qemu-{img['id']}", read_only=read_only)
                print(f"\n{' '.join(args)}: {img['exports']['boot']} booted in {time.monotonic() - t:.2f} s: {line!r}")
                assert line == f"NICSPLIT-BOOT tag {tag}", (args, line)
            finally:
                closed = json.loads(run_cli(data, "image", "close", img["id"], "--json").stdout)
            assert closed["closed"] and not closed["killed"], closed
        assert json.loads(run_cli(data, "image", "list", "--json").stdout)["images"] == []
        # Production was only read: it still holds the MBR and tag B.
        h = nbd_connect(up.uri("boot"))
        assert h.pread(2 * SECTOR, 0) == mbr + message_sector("NICSPLIT-BOOT tag B\n")
        h.shutdown()
