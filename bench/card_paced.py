#!/usr/bin/env python3
"""One paced end-to-end run with the card's CPU taken apart (issue 9):
`keepup.e2e_phase` (``nicsplit up``, fio 4 KiB randwrite QD16 on two 1 GiB
vdisks of one CG, paced), plus per write the acker's and the pipeline
worker's CPU by thread (user and system from ``/proc/PID/task``), the
acker's busy / empty-poll / sleep split, the worker's empty rounds, and per
second the worker's rounds (polls), naps, doorbell sleeps and wake-ups, the
batches it closed (by size, count, delay) and the frames it sent.

Not part of ``make bench``: run it against two trees alternately for a
before/after (``PYTHONPATH=OTHER/src``; only paired runs count on a shared
box). ``--pyspy FILE`` records the worker with ``py-spy --gil --native``
for the run (speedscope JSON). One JSON line per run:

    PYTHONPATH=src .venv/bin/python bench/card_paced.py [--seconds 20] [--rate 4000] [--tag NAME]
        [--sections '{"card": {"worker_nap_us": 4000}}'] [--pyspy out.json]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import keepup  # noqa: E402
import nicsplit  # noqa: E402
from appliance_paced import appliance_status, threads  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = keepup.paced_args(__doc__)
    ap.add_argument("--pyspy", default="", help="record the worker with py-spy into this file")
    a = ap.parse_args(argv)
    spy = None
    with keepup.paced_up(a.sections) as (data, up, work):
        st0 = keepup.card_stats(data)
        acker, worker = up.pid_of("card"), st0["worker_pid"]
        if a.pyspy:
            exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            spy = subprocess.Popen([exe, "record", "--gil", "--nonblocking", "-r", "100", "-f", "speedscope",
                                    "-o", a.pyspy, "-d", str(int(a.seconds) + 2), "-p", str(worker)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ta0, tw0, d0, la0 = threads(acker), threads(worker), appliance_status(data, "paced"), os.getloadavg()[0]
        r = keepup.e2e_phase(data, up, "paced", ["p1", "p2"], seconds=a.seconds, rate=a.rate, work=work)
        st1 = keepup.card_stats(data)
        ta1, tw1, d1, la1 = threads(acker), threads(worker), appliance_status(data, "paced"), os.getloadavg()[0]
        if spy is not None:
            spy.wait(timeout=60)
    w = max(1, r["writes"])
    hz = os.sysconf("SC_CLK_TCK")
    el = r["seconds"]

    def per_write(ticks: float) -> float:
        return round(1e6 * ticks / hz / w, 1)

    def thread_split(t0: dict, t1: dict, main_tid: int) -> dict[str, float]:
        main = [b - a for a, b in zip(t0.get(main_tid, (0, 0)), t1.get(main_tid, (0, 0)))]
        rest = [sum(v[i] - t0.get(tid, (0, 0))[i] for tid, v in t1.items() if tid != main_tid) for i in (0, 1)]
        return {"main_user": per_write(main[0]), "main_sys": per_write(main[1]),
                "others": per_write(rest[0] + rest[1])}

    def dd(path: str) -> float:
        a0, a1 = st0, st1
        for k in path.split("."):
            a0, a1 = (a0 or {}).get(k, 0), (a1 or {}).get(k, 0)
        return (a1 or 0) - (a0 or 0)

    per_s = {k: round(dd(p) / el, 1) for k, p in (
        ("polls", "poller.polls"), ("naps", "poller.naps"), ("sleeps", "poller.sleeps"),
        ("doorbells", "poller.doorbell_wakeups"), ("batches", "stages.batch.batches"),
        ("by_size", "stages.batch.closed_by_size"), ("by_count", "stages.batch.closed_by_count"),
        ("by_delay", "stages.batch.closed_by_delay"), ("sends", "stages.ship.sends"),
        ("acker_sleeps", "endpoint.handoff.acker_sleeps"), ("worker_rings", "endpoint.handoff.worker_rings"))}
    c = r["cpu_us_per_write"]
    print(json.dumps({
        "tag": a.tag, "src": os.path.dirname(nicsplit.__file__), "iops": round(r["iops"]),
        "host": round(c["host"], 1), "host_spin": round(c["host_spin"], 1), "card_work": round(c["card_work"], 1), "card_idle": round(c["card_idle"], 1),
        "appliance": round(c["appliance"], 1), "ratio": round(r["card_plus_appliance_over_host"], 2),
        "ratio_host_work": round(r["card_plus_appliance_over_host_work"] or 0, 2),
        "acker": round(c["acker"], 1), "acker_busy": round(c["acker_busy"], 1),
        "acker_empty_poll": round(c["acker_empty_poll"], 1), "acker_sleep": round(c["acker_sleep"], 1),
        "worker": round(c["worker"], 1), "worker_empty_poll": round(c["worker_empty_poll"], 1),
        "acker_threads": thread_split(ta0, ta1, acker), "worker_threads": thread_split(tw0, tw1, worker),
        "per_s": per_s, "writes_per_batch": round(dd("stages.batch.records") / max(1, dd("stages.batch.batches")), 1),
        "app_batches": d1.get("c_batches", 0) - d0.get("c_batches", 0),
        "app_group_commits": d1.get("c_group_commits", 0) - d0.get("c_group_commits", 0),
        "rpo_p99_s": r["rpo_p99_s"], "states": r["states_seen"], "split_p99_us": r["split_p99_us"],
        "load": [round(la0, 1), round(la1, 1)],
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
