"""fio's nbd engine: verified random writes at queue depth 16."""

from __future__ import annotations

import json
import subprocess

import pytest

from nicsplit.testing.datadir import vdisk

pytestmark = pytest.mark.usefixtures("peers")


def test_fio_randwrite_verify_qd16(data, host_factory, tmp_path, seed):
    vdisk(data, "disk1", "80M")
    host = host_factory(data)
    out = tmp_path / "fio.json"
    p = subprocess.run(
        [
            "fio", "--name=v", "--ioengine=nbd", f"--uri={host.uri('disk1')}",
            "--rw=randwrite", "--bs=4k", "--size=64m", "--iodepth=16",
            "--verify=crc32c", "--verify_fatal=1", f"--randseed={seed}",
            "--output-format=json", f"--output={out}",
        ],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert p.returncode == 0, p.stdout + p.stderr + host.log()
    job = json.loads(out.read_text())["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 64 << 20
    # verify reads everything back once
    assert job["read"]["io_bytes"] == 64 << 20
