#!/usr/bin/env python3
"""One paced end-to-end run with the appliance's CPU taken apart (issue 9):
`keepup.e2e_phase` (``nicsplit up``, fio 4 KiB randwrite QD16 on two 1 GiB
vdisks of one CG, paced), plus per write the appliance's event-loop thread
and its other threads (user and system CPU from ``/proc/PID/task``), the
distribution thread's CPU, its steps and records per step, the payloads it
took from ingest's handoff or read back, and the batches and group commits
(the appliance's ``status``; zero on a tree without ``counts``).

Not part of ``make bench``: run it against two trees alternately for a
before/after (``PYTHONPATH=OTHER/src``; only paired runs count on a shared
box).  One JSON line per run:

    PYTHONPATH=src .venv/bin/python bench/appliance_paced.py [--seconds 20] [--rate 4000] [--tag NAME]
        [--sections '{"appliance": {"commit_window_us": 8000}}'] [--prefill]

``--prefill`` first writes both vdisks whole, sequentially in 1 MiB writes
(as an import or an initial sync fills a disk), and waits until the
distribution has applied it all: the paced writes then land on replica
blocks that exist and are in the page cache (docs/benchmarks.md, "Large
folios").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import keepup  # noqa: E402
import nicsplit  # noqa: E402
from nicsplit.core.ctl import request  # noqa: E402
from nicsplit.core.layout import Layout  # noqa: E402
from nicsplit.testing.procs import wait_for  # noqa: E402


def appliance_status(data: Path, cg: str) -> dict:
    st = (request(Layout(data).appliance_sock, {"cmd": "status"}) or {}).get("status") or {}
    out = dict(((st.get("cgs") or {}).get(cg) or {}).get("distribution") or {})
    out.update({"c_" + k: v for k, v in (st.get("counts") or {}).items()})
    return out


def threads(pid: int) -> dict[int, tuple[int, int]]:
    """(utime, stime) in clock ticks per thread id."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            f = open(f"/proc/{pid}/task/{tid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended
        out[int(tid)] = (int(f[11]), int(f[12]))
    return out


def prefill(data: Path, up, work: Path) -> None:
    for v in ("p1", "p2"):
        out = work / f"fill-{v}.json"
        subprocess.run(keepup.fio_cmd(up.uri(v), rw="write", bs="1m", size="1G", iodepth=2, out=out, runtime=None),
                       check=True, capture_output=True, timeout=900)

    def applied() -> bool:
        d = appliance_status(data, "paced")
        return d.get("lag_records") == 0 and keepup.cg_state(data, "paced").get("state") == "protected"

    wait_for(applied, 900, "the prefill distributed", interval=0.5)


def main(argv: list[str] | None = None) -> int:
    ap = keepup.paced_args(__doc__)
    ap.add_argument("--prefill", action="store_true", help="write both vdisks whole first (see the docstring)")
    a = ap.parse_args(argv)
    with keepup.paced_up(a.sections) as (data, up, work):
        if a.prefill:
            prefill(data, up, work)
        pid = up.pid_of("appliance")
        t0, d0, la0 = threads(pid), appliance_status(data, "paced"), os.getloadavg()[0]
        r = keepup.e2e_phase(data, up, "paced", ["p1", "p2"], seconds=a.seconds, rate=a.rate, work=work)
        d1, t1, la1 = appliance_status(data, "paced"), threads(pid), os.getloadavg()[0]
    w = max(1, r["writes"])
    hz = os.sysconf("SC_CLK_TCK")

    def per_write(ticks: int) -> float:
        return round(1e6 * ticks / hz / w, 1)

    loop = [b - a for a, b in zip(t0.get(pid, (0, 0)), t1.get(pid, (0, 0)))]
    rest = [sum(v[i] - t0.get(tid, (0, 0))[i] for tid, v in t1.items() if tid != pid) for i in (0, 1)]
    c = r["cpu_us_per_write"]
    steps = d1.get("steps", 0) - d0.get("steps", 0)

    def delta(k: str) -> int:
        return d1.get(k, 0) - d0.get(k, 0)

    print(json.dumps({
        "tag": a.tag, "src": os.path.dirname(nicsplit.__file__), "iops": round(r["iops"]),
        "host": round(c["host"], 1), "host_spin": round(c["host_spin"], 1), "card_work": round(c["card_work"], 1), "card_idle": round(c["card_idle"], 1), "appliance": round(c["appliance"], 1),
        "kernel_threads": round(c.get("kernel_threads", 0), 1),
        "loop_user": per_write(loop[0]), "loop_sys": per_write(loop[1]),
        "threads_user": per_write(rest[0]), "threads_sys": per_write(rest[1]),
        "distribution": round(1e6 * (d1.get("cpu_seconds", 0) - d0.get("cpu_seconds", 0)) / w, 1),
        "steps": steps, "records_per_step": round(delta("records_applied") / max(1, steps), 1),
        "payloads_handed": delta("payloads_handed"), "payloads_read": delta("payloads_read"),
        "batches": delta("c_batches"), "group_commits": delta("c_group_commits"),
        "ratio": round(r["card_plus_appliance_over_host"], 2), "rpo_p99_s": r["rpo_p99_s"],
        "split_p99_us": r["split_p99_us"], "split_p999_us": r["split_p999_us"],
        "runq_wait": {k: round(v, 1) for k, v in (r.get("runq_wait_us_per_write") or {}).items()},
        "states": r["states_seen"], "load": [round(la0, 1), round(la1, 1)],
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
