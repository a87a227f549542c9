"""qemu-io and qemu-img against nicsplit (QEMU's own NBD client)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from nicsplit.testing.datadir import vdisk

pytestmark = pytest.mark.usefixtures("peers")

QEMU_IO_SCRIPT = [
    "write -P 0xab 0 64k",
    "read -P 0xab 0 64k",
    "write -z 64k 64k",
    "read -P 0 64k 64k",
    "discard 128k 64k",
    "read -P 0 128k 64k",
    "write -f -P 0xcd 1M 4k",
    "read -P 0xcd 1M 4k",
    "flush",
    "aio_write -P 0x11 2M 64k",
    "aio_flush",
    "read -P 0x11 2M 64k",
    "write -P 0x22 3M 1536k",  # crosses a 1 MiB extent boundary
    "read -P 0x22 3M 1536k",
    "read -P 0 5M 1M",  # never written: zeros
]


def qemu_io(uri: str, cmds: list[str], *opts: str) -> str:
    args = ["qemu-io", "-f", "raw", *opts]
    for c in cmds:
        args += ["-c", c]
    p = subprocess.run(args + [uri], capture_output=True, text=True, timeout=120)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert "fail" not in out.lower() and "error" not in out.lower(), out
    return out


@pytest.mark.parametrize("cache", ["writeback", "default-fua"])
def test_qemu_io_script(data, host_factory, cache):
    vdisk(data, "disk1", "8M")
    host = host_factory(data)
    opts = ("-t", "writeback") if cache == "writeback" else ()
    qemu_io(host.uri("disk1"), QEMU_IO_SCRIPT, *opts)
    # A second session sees what the first wrote.
    qemu_io(host.uri("disk1"), ["read -P 0xab 0 64k", "read -P 0xcd 1M 4k", "read -P 0x22 3M 1536k"])


def test_qemu_io_detects_a_wrong_pattern(data, host_factory):
    """The check above can fail: a wrong expected pattern is reported."""
    vdisk(data, "disk1", "1M")
    host = host_factory(data)
    p = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 0x01 0 4k", "-c", "read -P 0x02 0 4k", host.uri("disk1")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Pattern verification failed" in p.stdout + p.stderr


def test_qemu_img_convert_and_compare(data, host_factory, rng, tmp_path: Path):
    vdisk(data, "disk1", "16M")
    img = tmp_path / "img.raw"
    buf = bytearray(16 << 20)
    # Random data in scattered 64 KiB chunks, zeros elsewhere (so holes, data
    # and extent boundaries are all exercised).
    for _ in range(40):
        off = rng.randrange(0, (16 << 20) - 65536)
        buf[off : off + 65536] = rng.randbytes(65536)
    img.write_bytes(buf)
    host = host_factory(data)
    uri = host.uri("disk1")
    subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(img), uri], check=True, timeout=120)
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(img), uri], check=True, timeout=120)
    # compare must be able to fail: change one byte of the reference.
    buf[12345] ^= 0xFF
    img.write_bytes(buf)
    p = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(img), uri], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stdout + p.stderr
