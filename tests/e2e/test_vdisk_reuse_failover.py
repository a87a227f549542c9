"""A vdisk deleted and created again under its name is a new vdisk: failover
serves the new one's data, never the old one's blocks (issue 11 item 4:
replica images were keyed by name, so after `vdisk delete` + `vdisk create`
failover served the deleted disk's data). Real processes (`nicsplit up`,
failover server) and real clients (libnbd, nbdcopy, qemu-img)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from nicsplit.testing.procs import UpProcess, nbd_connect, run_cli
from nicsplit.testing.stack import cg_data, cg_status, wait_caught_up

pytestmark = pytest.mark.usefixtures("peers")

SIZE = 8 << 20


def _compare(a: str | Path, b: str | Path) -> None:
    p = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(a), str(b)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"{a} != {b}: {p.stdout.strip()} {p.stderr.strip()}"


def _write(uri: str, writes: list[tuple[int, bytes]]) -> None:
    h = nbd_connect(uri)
    for off, blob in writes:
        h.pwrite(blob, off)
    h.flush()
    h.shutdown()


def test_failover_after_delete_and_create_under_the_same_name(tmp_path: Path, rng):
    data = cg_data(tmp_path, SIZE, ("a", "b"))
    old_blocks = [(rng.randrange(0, SIZE // 4096 - 16) * 4096, rng.randbytes(64 << 10)) for _ in range(12)]
    with UpProcess(data) as up:
        _write(up.uri("a"), old_blocks)
        _write(up.uri("b"), [(0, b"\xbb" * 4096)])
        wait_caught_up(data)  # the replica holds the old a's blocks
    old_id = json.loads(run_cli(data, "vdisk", "list", "--json").stdout)
    run_cli(data, "vdisk", "delete", "a")
    run_cli(data, "vdisk", "create", "a", "--size", str(SIZE), "--cg", "cg1")
    new_id = json.loads(run_cli(data, "vdisk", "list", "--json").stdout)
    ids = {v["name"]: v["id"] for v in old_id["vdisks"]}, {v["name"]: v["id"] for v in new_id["vdisks"]}
    assert ids[0]["a"] != ids[1]["a"], ids
    with UpProcess(data) as up:
        new_off = old_blocks[0][0] + 4096  # inside an old block: the rest of that block must read as zeros
        _write(up.uri("a"), [(new_off, b"\x5a" * 4096)])
        wait_caught_up(data)
        production = tmp_path / "a-production.raw"
        subprocess.run(["nbdcopy", up.uri("a"), str(production)], check=True, timeout=120)
        want = bytearray(SIZE)
        want[new_off : new_off + 4096] = b"\x5a" * 4096
        assert production.read_bytes() == bytes(want)
        fo = json.loads(run_cli(data, "failover", "cg1", "--latest", "--json").stdout)
        try:
            served = tmp_path / "a-failover.raw"
            subprocess.run(["nbdcopy", fo["exports"]["a"], str(served)], check=True, timeout=120)
            got = served.read_bytes()
            stale = [off for off, blob in old_blocks if got[off : off + len(blob)] == blob]
            assert not stale, f"failover serves the deleted vdisk's blocks at {stale}"
            _compare(served, production)
            h = nbd_connect(fo["exports"]["b"])
            assert h.pread(4096, 0) == b"\xbb" * 4096  # the other vdisk is untouched
            h.shutdown()
        finally:
            run_cli(data, "failback", "cg1", timeout=120)
        assert cg_status(data)["role"] == "production"
    names = sorted(p.name for p in (data / "appliance" / "replicas" / "cg1").glob("*.img"))
    assert names == sorted(f"vdisk+{i}.img" for i in {ids[0]["a"], ids[0]["b"], ids[1]["a"]}), names
