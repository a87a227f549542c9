"""Power-cut style check: fio writes with a saved verify state, the host is
killed with SIGKILL mid-run, restarted, and fio verifies every write it saw
acknowledged (TESTING.md)."""

from __future__ import annotations

import signal
import subprocess

import pytest

from nicsplit.testing.datadir import vdisk
from nicsplit.testing.procs import HostProcess

pytestmark = pytest.mark.usefixtures("peers")


def _fio(uri: str, seed: int, *extra: str) -> list[str]:
    return [
        "fio", "--name=crash", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k",
        "--size=32m", "--iodepth=16", "--verify=crc32c", "--verify_fatal=1",
        f"--randseed={seed}", *extra,
    ]


@pytest.mark.parametrize("fua", [False, True], ids=["writeback", "fua"])
def test_kill9_during_fio_then_verify(data, seed, tmp_path, fua):
    vdisk(data, "disk1", "40M")
    host = HostProcess(data).start()
    extra = ["--sync=1"] if fua else []  # nbd engine: sync=1 sends FUA writes
    try:
        p = subprocess.run(
            _fio(host.uri("disk1"), seed, "--verify_state_save=1", "--time_based=1", "--runtime=30",
                 "--trigger-timeout=2", f"--trigger=kill -9 {host.pid}", *extra),
            cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )
        assert host.proc.wait(30) == -signal.SIGKILL, f"fio's trigger did not kill the host:\n{p.stdout}{p.stderr}"
        # fio must have seen the server die mid-run.
        assert p.returncode != 0
        assert list(tmp_path.glob("crash*verify.state")), "fio saved no verify state"
    finally:
        host.kill()
    with HostProcess(data, log_path=tmp_path / "host2.log") as host2:
        v = subprocess.run(
            _fio(host2.uri("disk1"), seed, "--verify_only", "--verify_state_load=1", *extra),
            cwd=tmp_path, capture_output=True, text=True, timeout=300,
        )
        assert v.returncode == 0, v.stdout + v.stderr + host2.log()
        assert "verify" in v.stdout.lower() or "crash" in v.stdout
