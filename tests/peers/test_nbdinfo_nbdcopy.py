"""nbdinfo and nbdcopy (libnbd's tools) against nicsplit."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from nicsplit.testing.datadir import vdisk

pytestmark = pytest.mark.usefixtures("peers")


def run(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120, check=True, **kw)


def test_nbdinfo_json(data, host_factory):
    vdisk(data, "web1-root", "64M", "--owner", "vm:web1")
    host = host_factory(data)
    info = json.loads(run("nbdinfo", "--json", host.uri("web1-root")).stdout)
    (exp,) = info["exports"]
    assert exp["export-name"] == "web1-root"
    assert exp["export-size"] == 64 << 20
    assert exp["is_read_only"] is False
    for cap in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_multi_conn"):
        assert exp[cap] is True, cap
    assert info["protocol"] == "newstyle-fixed"
    assert exp["block_size_preferred"] == 4096
    assert "vm:web1" in exp.get("description", "")
    assert "base:allocation" in exp["contexts"]


def test_nbdinfo_list_shows_every_vdisk_and_nothing_else(data, host_factory):
    for name in ("a", "b", "c"):
        vdisk(data, name, "1M")
    host = host_factory(data)
    listing = json.loads(run("nbdinfo", "--list", "--json", host.uri("")).stdout)
    assert sorted(e["export-name"] for e in listing["exports"]) == ["a", "b", "c"]
    # A vdisk created while the host runs shows up without a restart.
    vdisk(data, "d", "1M")
    listing = json.loads(run("nbdinfo", "--list", "--json", host.uri("")).stdout)
    assert sorted(e["export-name"] for e in listing["exports"]) == ["a", "b", "c", "d"]


def test_nbdinfo_map_reports_allocation(data, host_factory):
    vdisk(data, "disk1", "8M")
    host = host_factory(data)
    uri = host.uri("disk1")
    subprocess.run(["qemu-io", "-f", "raw", "-t", "writeback", "-c", "write -P 0x55 2M 4k", uri], check=True, capture_output=True)
    entries = json.loads(run("nbdinfo", "--map", "--json", uri).stdout)
    data_ranges = [(e["offset"], e["length"]) for e in entries if e["type"] == 0]
    hole_bytes = sum(e["length"] for e in entries if e["type"] == 3)
    # Allocation is per 1 MiB extent: exactly the extent holding 2M is data.
    assert data_ranges == [(2 << 20, 1 << 20)]
    assert hole_bytes == 7 << 20
    assert sum(e["length"] for e in entries) == 8 << 20


def test_nbdcopy_four_connections_roundtrip(data, host_factory, rng, tmp_path: Path):
    vdisk(data, "disk1", "32M")
    img = tmp_path / "img.raw"
    img.write_bytes(rng.randbytes(24 << 20) + bytes(8 << 20))
    host = host_factory(data)
    uri = host.uri("disk1")
    run("nbdcopy", "--flush", "--connections=4", str(img), uri)
    out = subprocess.run(["nbdcopy", uri, "-"], capture_output=True, timeout=120, check=True).stdout
    assert hashlib.sha256(out).hexdigest() == hashlib.sha256(img.read_bytes()).hexdigest()
