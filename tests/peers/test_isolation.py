"""Two vdisks on one datastore, written at the same time with different
patterns by two real clients, never bleed into each other."""

from __future__ import annotations

import subprocess

import pytest

from nicsplit.testing.datadir import vdisk

pytestmark = pytest.mark.usefixtures("peers")


def test_concurrent_vdisks_do_not_bleed(data, host_factory, seed, tmp_path):
    vdisk(data, "a", "48M")
    vdisk(data, "b", "48M")
    host = host_factory(data)
    procs = []
    for name, pattern in (("a", "0xaaaaaaaa"), ("b", "0x55555555")):
        procs.append(
            subprocess.Popen(
                [
                    "fio", f"--name={name}", "--ioengine=nbd", f"--uri={host.uri(name)}",
                    "--rw=randwrite", "--bs=4k,64k", "--bsrange=4k-64k", "--size=40m", "--iodepth=8",
                    f"--randseed={seed}", "--verify=pattern", f"--verify_pattern={pattern}",
                    "--verify_fatal=1", "--norandommap=0",
                ],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
            )
        )
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out
    # Every allocated byte of each vdisk holds only its own pattern (or zero
    # where fio did not write): read both whole disks back through NBD.
    for name, byte in (("a", 0xAA), ("b", 0x55)):
        raw = subprocess.run(["nbdcopy", host.uri(name), "-"], capture_output=True, check=True, timeout=120).stdout
        assert len(raw) == 48 << 20
        other = 0x55 if byte == 0xAA else 0xAA
        assert raw.count(bytes([other])) == 0, f"vdisk {name} holds the other vdisk's pattern"
        assert raw.count(bytes([byte])) >= 30 << 20
        assert set(raw) <= {0, byte}
