"""Power-cut style check: fio writes with a saved verify state, the host is
killed with SIGKILL mid-run, restarted, and fio verifies every write it saw
acknowledged (TESTING.md)."""

from __future__ import annotations

import re
import signal
import subprocess

import pytest

from nicsplit.testing.datadir import vdisk
from nicsplit.testing.procs import HostProcess

pytestmark = pytest.mark.usefixtures("peers")


def _fio(uri: str, seed: int, *extra: str) -> list[str]:
    return [
        "fio", "--name=crash", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k",
        "--size=256m", "--iodepth=16", "--verify=crc32c", "--verify_fatal=1",
        f"--randseed={seed}", *extra,
    ]


@pytest.mark.parametrize("flush", [False, True], ids=["writeback", "flush-every-8"])
def test_kill9_during_fio_then_verify(data, seed, tmp_path, flush):
    vdisk(data, "disk1", "260M")
    host = HostProcess(data).start()
    extra = ["--fsync=8"] if flush else []  # nbd engine: fsync=N sends NBD_CMD_FLUSH
    try:
        p = subprocess.run(
            # Paced so the job cannot finish before the trigger (256 MiB at
            # 64 MiB/s is 4 s; unpaced it once ended in 0.65 s, before the kill).
            _fio(host.uri("disk1"), seed, "--verify_state_save=1", "--trigger-timeout=1", f"--trigger=kill -9 {host.pid}",
                 "--rate=64m", *extra),
            cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )
        assert host.proc.wait(30) == -signal.SIGKILL, f"fio's trigger did not kill the host:\n{p.stdout}{p.stderr}"
        # At the trigger fio stops its job, saves the verify state (what it
        # saw acknowledged) and runs the kill: the host dies mid-stream.
        assert "io=" in p.stdout and "io=256MiB" not in p.stdout, p.stdout
        assert list(tmp_path.glob("*crash*verify.state")), "fio saved no verify state"
    finally:
        host.kill()
    with HostProcess(data, log_path=tmp_path / "host2.log") as host2:
        v = subprocess.run(
            _fio(host2.uri("disk1"), seed, "--verify_only", "--verify_state_load=1", *extra),
            cwd=tmp_path, capture_output=True, text=True, timeout=300,
        )
        assert v.returncode == 0, v.stdout + v.stderr + host2.log()
        # It really checked data: it read back what the first run saw acked.
        m = re.search(r"READ: bw=.*io=([0-9.]+)([KMG])iB", v.stdout)
        assert m and float(m.group(1)) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)] >= 4 << 20, v.stdout
