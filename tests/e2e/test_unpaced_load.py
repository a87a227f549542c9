"""Issue 10, "Unpaced load": `nicsplit up` with the default configuration
(1 ms split timeout, 256 MiB hidden volume, overflow log on, the card's fast
path), fio QD16 unpaced for 30 s on two vdisks of one CG, the card alive the
whole time, and a ledger client on a third vdisk of the CG. Asserted: fio
passes; no vdisk enters marking (no write is marked: the card acks them all
in time and its overflow log absorbs what the appliance cannot take yet);
within 30 s of the load ending the CG is protected with RPO < 1 s; the
latest PIT equals production; and random consistent PITs (seeded) restore
the ledger vdisk to exactly a prefix of the ledger's write order."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pytest

from nicsplit.core.ctl import request
from nicsplit.core.layout import Layout
from nicsplit.testing.datadir import init_data
from nicsplit.testing.ledger import Ledger, check_prefix
from nicsplit.testing.procs import UpProcess, run_cli, wait_for
from nicsplit.testing.stack import latest_pit_equals_production

pytestmark = pytest.mark.usefixtures("peers")

SIZE = 64 << 20
RUNTIME_S = 30
LEDGER_SIZE = 4 << 20


def _status(data: Path) -> dict:
    return json.loads(run_cli(data, "status", "--json").stdout)


@pytest.mark.timeout(900)
def test_unpaced_qd16_on_two_vdisks_never_marks_and_comes_back_exact(tmp_path, seed, rng):
    data = init_data(tmp_path / "data", filters=["stats", "split"])
    run_cli(data, "cg", "create", "cg1")
    for n in ("a", "b"):
        run_cli(data, "vdisk", "create", n, "--size", str(SIZE), "--cg", "cg1")
    run_cli(data, "vdisk", "create", "c", "--size", str(LEDGER_SIZE), "--cg", "cg1")
    with UpProcess(data) as up:
        ledger = Ledger(up.uri("c"), seed, LEDGER_SIZE)
        cmd = ["fio", "--ioengine=nbd", "--rw=randwrite", "--bs=4k", f"--size={SIZE}", "--iodepth=16",
               "--time_based", f"--runtime={RUNTIME_S}", f"--randseed={seed}", "--output-format=json", f"--output={tmp_path / 'fio.json'}",
               "--name=a", f"--uri={up.uri('a')}", "--name=b", f"--uri={up.uri('b')}"]
        fio = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        states: set[str] = set()
        samples = []
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                st = _status(data)
                cg = st["cgs"][0]
                states.update(v["state"] for v in cg["vdisks"])
                samples.append((time.monotonic(), cg["state"], cg["rpo_seconds"]))
                done.wait(1.0)

        sampler = threading.Thread(target=sample, name="status-sampler")
        sampler.start()
        ledger.start()
        try:
            out, err = fio.communicate(timeout=RUNTIME_S + 120)
        finally:
            done.set()
            ledger.stop.set()
            sampler.join(30)
            ledger.join(30)
        assert fio.returncode == 0, err
        assert ledger.error is None, ledger.error
        ios = sum(j["write"]["total_ios"] for j in json.loads((tmp_path / "fio.json").read_text())["jobs"])
        print(f"unpaced: {ios} writes in {RUNTIME_S} s = {ios / RUNTIME_S:.0f} IOPS; states seen {sorted(states)}")
        print("samples (t, state, rpo):", [(round(t - samples[0][0]), s, r) for t, s, r in samples])
        host = request(Layout(data).host_sock, {"cmd": "status"})["status"]
        marked = {v["name"]: v.get("marked", 0) for v in host["vdisks"]}
        parked = {v["name"]: v.get("parked", 0) for v in host["vdisks"]}
        print(f"marked writes {marked}, parked writes {parked}, card {host['card']}; ledger {len(ledger.done)} writes")
        t_end = time.monotonic()
        assert "marking" not in states and "resyncing" not in states, states
        assert set(marked.values()) == {0}, marked

        def caught_up() -> bool:
            cg = _status(data)["cgs"][0]
            return cg["state"] == "protected" and cg["rpo_seconds"] is not None and cg["rpo_seconds"] < 1

        wait_for(caught_up, 30, "the CG protected with RPO < 1 s within 30 s of the load", interval=0.5)
        print(f"protected with RPO < 1 s {time.monotonic() - t_end:.1f} s after the load ended")
        for n in ("a", "b", "c"):
            latest_pit_equals_production(data, "cg1", n, up.uri(n), tmp_path)
        pits = json.loads(run_cli(data, "pits", "cg1", "--all", "--json").stdout)["pits"]
        consistent = [p for p in pits if p["consistent"]]
        assert len(consistent) == len(pits), "no PIT may fall in a gap: nothing was marked"
        for p in sorted(rng.sample(consistent, min(4, len(consistent))), key=lambda p: p["seq"]):
            out_img = tmp_path / f"c-{p['seq']}.raw"
            run_cli(data, "restore", "c", "--seq", str(p["seq"]), "--to", str(out_img), timeout=120)
            n = check_prefix(out_img.read_bytes(), ledger)
            print(f"PIT seq {p['seq']}: exactly the ledger's first {n} writes")
