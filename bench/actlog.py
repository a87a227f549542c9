"""What the host's activity log costs a write (nicsplit.host.actlog).

* **hot**: a write to an extent already hot — `enter` + `leave`, no IO.
  Measured in CPU time (process_time) over ``--writes`` writes spread over
  ``--working-set`` hot extents, repeated ``--repeat`` times: the median ns
  per write.
* **activation**: a write to a cold extent — one record appended and
  fdatasync'd in DATA's filesystem (``--dir``, default a temporary directory
  under the current one, i.e. the same disk as a data directory there).
  ``--activations`` sequential activations (each alone: the worst case),
  wall time each: median, p90, max.
* **group**: ``--concurrent`` writes to cold extents at once: how many
  fdatasyncs they shared.
* **dict**: the same loop doing one dict get and set per write, to read the
  numbers above against this machine's speed.

    .venv/bin/python bench/actlog.py [--writes 200000] [--repeat 5] [--activations 200] [--concurrent 64] [--dir .]

Prints one JSON document. Nothing here asserts on speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from nicsplit.host.actlog import ActivityLog

EXT = 4 << 20


def hot(d: Path, writes: int, working_set: int, repeat: int) -> dict:
    al = ActivityLog(d / "hot.al", extents=max(working_set, 1))

    async def warm():
        al.begin()
        for e in range(working_set):
            if not al.enter(1, e * EXT, 4096):
                await al.activate(1, e * EXT, 4096)
            al.leave(1, e * EXT, 4096)
    asyncio.run(warm())
    offs = [(i * 7919 % working_set) * EXT + (i % 1024) * 4096 for i in range(writes)]
    runs = []
    for _ in range(repeat):
        t0 = time.process_time_ns()
        for off in offs:
            al.enter(1, off, 4096)
            al.leave(1, off, 4096)
        runs.append((time.process_time_ns() - t0) / writes)
    base, dic = [], []
    for _ in range(repeat):  # the loop alone
        t0 = time.process_time_ns()
        for off in offs:
            pass
        base.append((time.process_time_ns() - t0) / writes)
    table: dict[int, int] = {}
    for _ in range(repeat):  # one dict get + set per write
        t0 = time.process_time_ns()
        for off in offs:
            table[off] = table.get(off, 0) + 1
        dic.append((time.process_time_ns() - t0) / writes)
    return {"ns_per_write_median": round(statistics.median(runs), 1), "runs_ns": [round(x, 1) for x in runs],
            "loop_overhead_ns": round(statistics.median(base), 1), "dict_get_set_ns": round(statistics.median(dic), 1), "working_set_extents": working_set,
            "disk_commits_during_hot_writes": al.commits - working_set}


def activations(d: Path, n: int, concurrent: int) -> dict:
    async def main():
        al = ActivityLog(d / "act.al", extents=n + concurrent + 1)
        al.begin()
        each = []
        for e in range(n):
            al.enter(2, e * EXT, 4096)
            t0 = time.perf_counter_ns()
            await al.activate(2, e * EXT, 4096)
            each.append(time.perf_counter_ns() - t0)
            al.leave(2, e * EXT, 4096)
        c0 = al.commits
        base = n * EXT
        for e in range(concurrent):
            al.enter(2, base + e * EXT, 4096)
        t0 = time.perf_counter_ns()
        await asyncio.gather(*(al.activate(2, base + e * EXT, 4096) for e in range(concurrent)))
        group_ns = time.perf_counter_ns() - t0
        each.sort()
        return {"activations": n, "us_median": round(each[n // 2] / 1000, 1),
                "us_p90": round(each[n * 9 // 10] / 1000, 1), "us_max": round(each[-1] / 1000, 1),
                "group": {"writes": concurrent, "fdatasyncs": al.commits - c0, "us_total": round(group_ns / 1000, 1)}}
    return asyncio.run(main())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--writes", type=int, default=200000)
    ap.add_argument("--working-set", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--activations", type=int, default=200)
    ap.add_argument("--concurrent", type=int, default=64)
    ap.add_argument("--dir", default=".")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="actlog-bench-", dir=a.dir) as t:
        d = Path(t)
        print(json.dumps({"hot": hot(d, a.writes, a.working_set, a.repeat),
                          "activation": activations(d, a.activations, a.concurrent)}, indent=1))


if __name__ == "__main__":
    main()
