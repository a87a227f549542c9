"""Issue 9 acceptance "no write is acked and then lost when the pipeline
worker dies": real host, card (acker + pipeline worker) and appliance
(`nicsplit up`), real clients (fio with crc32c verify).

The card's pipeline worker is killed with SIGKILL while fio writes. The
acker keeps the ring and the host attached, reports what the dead worker
held to the lost log and starts a new worker; the host marks those regions
and resyncs them without any command. Afterwards the CG is protected, the
card process is the same one (only the worker restarted), fio's verify
passes and the latest PIT equals production.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from nicsplit.core.ctl import request
from nicsplit.core.layout import Layout
from nicsplit.testing.procs import UpProcess, journal, run_cli, wait_for
from nicsplit.testing.stack import cg_data, latest_pit_equals_production

pytestmark = pytest.mark.usefixtures("peers")

SIZE = 16 << 20


def card_stats(data) -> dict | None:
    r = request(Layout(data).card_ctl_sock, {"cmd": "stats"})
    return None if r is None else r.get("stats")


def cg(data) -> dict:
    (c,) = json.loads(run_cli(data, "status", "--json").stdout)["cgs"]
    return c


def test_killing_the_pipeline_worker_under_load_loses_nothing(tmp_path, seed):
    data = cg_data(tmp_path, SIZE, timeout_us=1000)  # the default split timeout
    with UpProcess(data) as up:
        card = up.pid_of("card")
        worker = card_stats(data)["worker_pid"]
        assert worker != card
        fios = [subprocess.Popen(
            ["fio", f"--name={n}", "--ioengine=nbd", f"--uri={up.uri(n)}", "--rw=randwrite", "--bs=4k",
             f"--size={SIZE}", "--iodepth=16", "--verify=crc32c", "--verify_fatal=1", f"--randseed={seed + i}",
             "--rate_iops=1500"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
            for i, n in enumerate(("a", "b"))]
        try:
            wait_for(lambda: len([r for r in journal(data, "cg1") if r["op"] == "write"]) > 500, 60,
                     "500 journaled writes")
            os.kill(worker, signal.SIGKILL)
            wait_for(lambda: (s := card_stats(data)) is not None and s["worker_pid"] != worker, 60,
                     "a new pipeline worker")
        finally:
            outs = [p.communicate(timeout=600)[0] for p in fios]
        for p, out in zip(fios, outs):
            assert p.returncode == 0, out
        st = card_stats(data)
        ho = st["endpoint"]["handoff"]
        print(f"worker restarts {ho['worker_restarts']}, writes reported lost on its death "
              f"{ho['lost_on_worker_death']}")
        assert up.pid_of("card") == card, "the card process itself must not restart"
        assert ho["worker_restarts"] == 1
        # The host marks what the dead worker held and resyncs it by itself.
        wait_for(lambda: cg(data)["state"] == "protected" and
                 all(v["state"] == "protected" for v in cg(data)["vdisks"]), 120,
                 "the CG protected again by itself", interval=0.2)
        for n in ("a", "b"):
            latest_pit_equals_production(data, "cg1", n, up.uri(n), tmp_path)
