#!/usr/bin/env python3
"""The effect of `nicsplit up`'s CPU placement (docs/operations.md, "CPU
placement") end to end: one `nicsplit up` per round with the default
configuration (``validate = false``, as `make run`), then

1. fio 4 KiB randwrite **QD1** on one vdisk for ``--seconds``: fio's IOPS
   and p50/p99, and the host's ``split`` histogram of that vdisk (the
   splitter's added latency);
2. fio 4 KiB randwrite **QD16 paced** at ``--rate-iops`` in total on two
   vdisks of another CG (keepup's e2e phase): IOPS reached, split
   p50/p99/p99.9, states, CPU per write per process.

It reports which CPUs the host and the card's acker were allowed (from
/proc) and the load average. Run it once per tree, alternately, for a
paired before/after (PYTHONPATH selects the tree the processes run):

    PYTHONPATH=/work/main/src .venv/bin/python bench/up_placement.py --rounds 1 --tag main
    PYTHONPATH=$PWD/src       .venv/bin/python bench/up_placement.py --rounds 1 --tag new

Extra ``--set SECTION.KEY=JSON`` entries go into nicsplit.toml (e.g.
``--set 'host.cpus=[]'`` turns the placement off on a tree that has it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import fio_cmd, loadavg, run_fio  # noqa: E402
from keepup import cg_state, e2e_phase, host_split  # noqa: E402
from nicsplit.testing.datadir import init_data  # noqa: E402
from nicsplit.testing.procs import UpProcess, run_cli, wait_for  # noqa: E402


def allowed_of(pid: int) -> list[int]:
    return sorted(os.sched_getaffinity(pid))


def one_round(work: Path, seconds: float, rate: int, sections: dict) -> dict:
    data = init_data(work / "data", validate=False, sections=sections)
    for cg, vds in (("q", ["q1"]), ("paced", ["p1", "p2"])):
        run_cli(data, "cg", "create", cg)
        for v in vds:
            run_cli(data, "vdisk", "create", v, "--size", "1G", "--cg", cg)
    out: dict = {"loadavg_start": loadavg()}
    with UpProcess(data) as up:
        wait_for(lambda: cg_state(data, "paced").get("state") == "protected"
                 and cg_state(data, "q").get("state") == "protected", 60, "the CGs protected")
        out["cpus"] = {"host": allowed_of(up.pid_of("host")), "acker": allowed_of(up.pid_of("card")),
                       "appliance": allowed_of(up.pid_of("appliance"))}
        s0 = host_split(data, ["q1"])["q1"]
        job = run_fio(fio_cmd(up.uri("q1"), rw="randwrite", bs="4k", size="256m", iodepth=1,
                              out=work / "fio-qd1.json", runtime=seconds), work / "fio-qd1.json", seconds + 120)
        s1 = host_split(data, ["q1"])["q1"]
        pc = job["write"]["lat_ns"]["percentile"]
        out["qd1"] = {"iops": job["write"]["iops"], "fio_p50_us": pc["50.000000"] / 1e3, "fio_p99_us": pc["99.000000"] / 1e3,
                      "splits": s1.get("split", 0) - s0.get("split", 0), "marked": s1.get("marked", 0),
                      "split_p50_us": s1.get("split_p50_us"), "split_p99_us": s1.get("split_p99_us"),
                      "split_p999_us": s1.get("split_p999_us")}
        ph = e2e_phase(data, up, "paced", ["p1", "p2"], seconds=seconds, rate=rate, work=work)
        ph.pop("samples", None)
        out["paced"] = ph
    out["loadavg_end"] = loadavg()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--rate-iops", type=int, default=10_000)
    ap.add_argument("--tag", default="")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=JSON")
    ap.add_argument("--out", type=Path, help="append one JSON line per round here")
    a = ap.parse_args()
    sections: dict = {}
    for s in a.set:
        k, _, v = s.partition("=")
        sec, _, key = k.partition(".")
        sections.setdefault(sec, {})[key] = json.loads(v)
    for i in range(a.rounds):
        with tempfile.TemporaryDirectory(prefix="nicsplit-place-") as tmp:
            r = one_round(Path(tmp), a.seconds, a.rate_iops, sections)
        r.update(tag=a.tag, when=time.strftime("%H:%M:%S"), pythonpath=os.environ.get("PYTHONPATH", ""))
        line = json.dumps(r)
        print(line, flush=True)
        if a.out:
            with a.out.open("a") as f:
                f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
