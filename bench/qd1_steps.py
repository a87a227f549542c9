#!/usr/bin/env python3
"""The steps of one QD1 write through the real ring, in one process (no
scheduler between the two sides): the host's `RingSplitter.submit`, the
acker's `pump` up to its ack (the ``card.acker.after-ack`` failpoint) and
in all, the host's `wait_ack` with the completion there, `post_outcome`
and the acker's pump of that OUTCOME. Median µs of ``--n`` writes per
round, medians of rounds and their range (docs/benchmarks.md, "QD1: where
the microseconds go"). Run it with PYTHONPATH naming the tree to measure.

    PYTHONPATH=src .venv/bin/python bench/qd1_steps.py [--n 8000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from time import perf_counter_ns as pc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import loadavg  # noqa: E402
from nicsplit.card.transports import ring_acker  # noqa: E402
from nicsplit.core.records import AugmentedWrite, Op, Status, WFlag  # noqa: E402
from nicsplit.testing.cardrig import CardRig  # noqa: E402

STEPS = ("submit", "pump_to_ack", "pump_write", "wait_ack", "post_outcome", "pump_outcome")


def one_round(n: int) -> dict[str, float]:
    marks: list[int] = []
    ring_acker._FP = {"armed": True}  # the failpoint marks the ack's CQ_TAIL store
    ring_acker._fp.hit = lambda name: marks.append(pc())
    with tempfile.TemporaryDirectory() as d:
        # Handoff and data area big enough for n writes and outcomes: the worker never releases here.
        rig = CardRig(d + "/run", slots=1 << 15, sq=256, data_size=64 << 20)
        try:
            pay = [os.urandom(4096) for _ in range(64)]
            t: dict[str, list[int]] = {k: [] for k in STEPS}
            for i in range(1, n + 1):
                w = AugmentedWrite(i, 1, i, 1, Op.WRITE, WFlag.NONE, (i % 4096) * 4096, 4096, time.time_ns(),
                                   pay[i % 64])
                t0 = pc()
                rig.sp.submit(w)
                t1 = pc()
                rig.acker.pump()
                t2 = pc()
                assert rig.sp.wait_ack(i, time.monotonic_ns() + 10**9)
                t3 = pc()
                rig.sp.post_outcome(i, Status.COMMITTED)
                t4 = pc()
                rig.acker.pump()
                t5 = pc()
                for k, a, b in (("submit", t0, t1), ("pump_to_ack", t1, marks[-1]), ("pump_write", t1, t2),
                                ("wait_ack", t2, t3), ("post_outcome", t3, t4), ("pump_outcome", t4, t5)):
                    t[k].append(b - a)
        finally:
            rig.close()
    return {k: statistics.median(v) / 1000 for k, v in t.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=8000, help="writes a round (at most 16,000: nothing is released)")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    rounds = [one_round(min(a.n, 16_000)) for _ in range(a.rounds)]
    for k in STEPS:
        v = [r[k] for r in rounds]
        print(f"{k:>13}: {statistics.median(v):6.2f} µs ({min(v):.2f}–{max(v):.2f})")
    print(f"load average {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
