#!/usr/bin/env python3
"""nvme-pi's completion latency with the real card, its pipeline on the
acker's loop (``fast_path = "inline"``) against in a worker process of its
own (``"process"``, `NvmeAcker`), paired rounds in one run.

Each round starts `nicsplit card run` (no appliance reachable: the worker
compresses, seals and moves what it cannot ship to its overflow log, which
is the heavy work an ack must not wait behind) once per mode, in
alternating order, and splits ``--n`` 4 KiB writes at QD1 through the
host's `NvmePiSplitter`, each followed by its COMMITTED outcome, as the
splitter filter does. Per round and mode: split() p50 / p99 / p99.9 and
the writes that missed a ``--timeout-us`` deadline (what would be late on
the host). Medians over rounds with the spread (min..max). Nothing here
asserts on speed.

    PYTHONPATH=src .venv/bin/python bench/nvme_fastpath.py [--rounds 3] [--n 20000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from time import monotonic_ns

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import percentile as pct  # noqa: E402
from nicsplit.card.transports.nvme_pi import NvmePiSplitter  # noqa: E402
from nicsplit.core.layout import Layout  # noqa: E402
from nicsplit.core.records import Status  # noqa: E402
from nicsplit.testing.cardproc import CardProcess, card_data, pattern_write  # noqa: E402

MODES = ("inline", "process")


def one(mode: str, n: int, timeout_ns: int, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        data = card_data(Path(tmp), transport="nvme-pi", fast_path=mode)
        card = CardProcess(data).start()
        try:
            sp = NvmePiSplitter.connect(str(Layout(data).card_sock))
            lat, late = [], 0
            try:
                for i in range(1, n + 1):
                    w = pattern_write(i, seed)
                    t = monotonic_ns()
                    ok = sp.split(w, 1_000_000_000)
                    d = monotonic_ns() - t
                    lat.append(d)
                    late += d > timeout_ns
                    if ok:
                        sp.post_outcome(i, Status.COMMITTED)
            finally:
                sp.close()
        finally:
            card.stop()
    lat.sort()
    return {"p50": pct(lat, 50) / 1000, "p99": pct(lat, 99) / 1000, "p999": pct(lat, 99.9) / 1000, "late": late}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--timeout-us", type=float, default=1000.0)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    got: dict[str, list[dict]] = {m: [] for m in MODES}
    for r in range(a.rounds):
        for m in (MODES if r % 2 == 0 else MODES[::-1]):
            got[m].append(one(m, a.n, int(a.timeout_us * 1000), a.seed + r))
            print(f"round {r + 1} {m}: {got[m][-1]}", flush=True)
    print(f"\n| fast_path | split p50 us | p99 us | p99.9 us | over {a.timeout_us:.0f} us |\n|---|---|---|---|---|")
    for m in MODES:
        cells = []
        for k in ("p50", "p99", "p999", "late"):
            xs = [g[k] for g in got[m]]
            cells.append(f"{statistics.median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})")
        print(f"| {m} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
