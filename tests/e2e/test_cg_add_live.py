"""Issue 10, build item 4: a vdisk that already holds data joins a CG with
`nicsplit cg add` while the host runs and a client writes to it. From that
call on its writes are split; what it held is copied by the initial sync
(*initializing*), and it is then protected by itself, with no restart; the
latest PIT equals production. Real processes (`nicsplit up`), real clients
(fio with crc32c verify before and during the join; qemu-img compare)."""

from __future__ import annotations

import json
import subprocess

import pytest

from nicsplit.testing.procs import UpProcess, journal, run_cli, wait_for
from nicsplit.testing.stack import cg_data, latest_pit_equals_production

pytestmark = pytest.mark.usefixtures("peers")

SIZE = 32 << 20


def vdisk(data, name: str) -> dict:
    st = json.loads(run_cli(data, "status", "--json").stdout)
    return next(v for c in st["cgs"] for v in c["vdisks"] if v["name"] == name)


@pytest.mark.timeout(600)
def test_cg_add_while_the_host_runs_syncs_and_protects_without_a_restart(tmp_path, seed):
    data = cg_data(tmp_path, SIZE, names=("a",))
    run_cli(data, "vdisk", "create", "z", "--size", str(SIZE))  # in no CG yet
    with UpProcess(data) as up:
        fill = ["fio", "--name=fill", "--ioengine=nbd", f"--uri={up.uri('z')}", "--rw=write", "--bs=1m",
                f"--size={SIZE // 2}", "--iodepth=4"]
        subprocess.run(fill, check=True, capture_output=True, timeout=300, cwd=tmp_path)
        load = subprocess.Popen(
            ["fio", "--name=z", "--ioengine=nbd", f"--uri={up.uri('z')}", "--rw=randwrite", "--bs=4k",
             f"--size={SIZE}", "--iodepth=8", "--verify=crc32c", "--verify_fatal=1", f"--randseed={seed}",
             "--rate_iops=500"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
        try:
            n0 = len(journal(data, "cg1"))
            out = run_cli(data, "cg", "add", "cg1", "z").stdout
            print(out.strip())
            assert "joins consistency group cg1: initializing" in out, out
            wait_for(lambda: vdisk(data, "z")["state"] == "protected", 180,
                     "z protected by itself after its initial sync", interval=0.2)
        finally:
            fio_out = load.communicate(timeout=600)[0]
        assert load.returncode == 0, fio_out
        assert any(r.get("vdisk") == "z" for r in journal(data, "cg1")[n0:]), "no write of z was journaled"
        latest_pit_equals_production(data, "cg1", "z", up.uri("z"), tmp_path)
        latest_pit_equals_production(data, "cg1", "a", up.uri("a"), tmp_path)
