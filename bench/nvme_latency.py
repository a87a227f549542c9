#!/usr/bin/env python3
"""QD1 split() latency, nvme-pi against ring, paired rounds in one run.

Each round starts the demo card (``ring_echo``) once per transport, in
alternating order, busy-polling (``--idle-us`` large: the loaded path, no
doorbell), and times ``split()`` of ``--n`` writes of ``--size`` bytes at
QD1 (submit, the card's poll + checks + ack, the host's spin), after
``--warmup`` writes. Per round and transport: p50 / p99 of the wall time
and the host thread's CPU time per split (copy + checksum or PI + publish +
spin). Prints a markdown table of the rounds, then the median over rounds
and the spread (min..max) of each figure and of the nvme-pi / ring ratio.
Never part of the test run; the box is shared, so only the paired ratios
mean much.

    PYTHONPATH=src .venv/bin/python bench/nvme_latency.py [--rounds 5] [--n 20000] [--size 4096]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nicsplit.card.transports.base import open_splitter
from nicsplit.core.records import AugmentedWrite, Op, WFlag

TRANSPORTS = ("ring", "nvme-pi")


def pct(sorted_ns: list[int], p: float) -> float:
    i = min(len(sorted_ns) - 1, int(round(p / 100 * (len(sorted_ns) - 1))))
    return sorted_ns[i] / 1000


def one(transport: str, run_dir: Path, n: int, warmup: int, size: int, cpu: str | None) -> dict:
    cmd = [sys.executable, "-m", "nicsplit.card.transports.ring_echo", "--run-dir", str(run_dir),
           "--transport", transport, "--idle-us", "10000000", "--data-size", str(64 << 20)]
    if cpu is not None:
        cmd = ["taskset", "-c", cpu, *cmd]
    card = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        if json.loads(card.stdout.readline()).get("event") != "ready":
            raise RuntimeError(f"{transport} card did not start")
        sp = open_splitter(transport, str(run_dir / "card.sock"))
        payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
        wall: list[int] = []
        cpu_ns: list[int] = []
        clock, tclock = time.perf_counter_ns, time.thread_time_ns
        try:
            for i in range(warmup + n):
                w = AugmentedWrite(i + 1, 1, i + 1, 1, Op.WRITE, WFlag.NONE, (i % 4096) * size, size, i, payload)
                c0, t0 = tclock(), clock()
                ok = sp.split(w, 1_000_000_000)
                t1, c1 = clock(), tclock()
                if not ok:
                    raise RuntimeError(f"{transport}: split {i} failed: {sp.statistics()}")
                sp.post_outcome(i + 1, 0)
                if i >= warmup:
                    wall.append(t1 - t0)
                    cpu_ns.append(c1 - c0)
        finally:
            sp.close()
    finally:
        card.terminate()
        card.communicate(timeout=30)
    wall.sort()
    return {"p50": pct(wall, 50), "p99": pct(wall, 99), "cpu": statistics.median(cpu_ns) / 1000}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--warmup", type=int, default=2000)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--card-cpu", default=None, help="taskset -c for the card (e.g. 1)")
    ap.add_argument("--json", default=None, help="write the per-round numbers here")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="nvme-bench-") as tmp:
        for r in range(args.rounds):
            order = TRANSPORTS if r % 2 == 0 else TRANSPORTS[::-1]
            got = {t: one(t, Path(tmp) / f"r{r}-{t}", args.n, args.warmup, args.size, args.card_cpu) for t in order}
            rows.append(got)
            print(f"round {r + 1}: " + ", ".join(f"{t} p50 {got[t]['p50']:.2f} p99 {got[t]['p99']:.2f} "
                                                 f"cpu {got[t]['cpu']:.2f} us" for t in TRANSPORTS),
                  file=sys.stderr, flush=True)
    print(f"\nQD1 split(), {args.size} B writes, {args.n} timed a round, {args.rounds} paired rounds (us)\n")
    print("| round | ring p50 | nvme-pi p50 | ratio | ring p99 | nvme-pi p99 | ratio | ring cpu | nvme-pi cpu |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for i, g in enumerate(rows, 1):
        a, b = g["ring"], g["nvme-pi"]
        print(f"| {i} | {a['p50']:.2f} | {b['p50']:.2f} | {b['p50'] / a['p50']:.2f} | {a['p99']:.2f} | "
              f"{b['p99']:.2f} | {b['p99'] / a['p99']:.2f} | {a['cpu']:.2f} | {b['cpu']:.2f} |")

    def summary(values: list[float]) -> str:
        return f"{statistics.median(values):.2f} ({min(values):.2f}..{max(values):.2f})"

    print("\n| figure | ring | nvme-pi | nvme-pi / ring |")
    print("|---|---:|---:|---:|")
    for k in ("p50", "p99", "cpu"):
        print(f"| {k} | {summary([g['ring'][k] for g in rows])} | {summary([g['nvme-pi'][k] for g in rows])} | "
              f"{summary([g['nvme-pi'][k] / g['ring'][k] for g in rows])} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
