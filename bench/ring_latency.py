#!/usr/bin/env python3
"""Ring transport round trip: host -> card -> ack, 4 KiB writes, two processes.

Starts the demo card (``python -m nicsplit.card.transports.ring_echo``) as a
real process and measures ``RingSplitter.split()`` wall time (payload copy +
checksum + descriptor + publish + card poll/verify/ack + host CQ spin):

* ``busy``     — the card busy-polls (never sleeps): the normal loaded path;
* ``doorbell`` — before each write the host waits until the card sleeps on its
  eventfd, so every write pays the doorbell + wake-up (the idle path).

Prints a markdown table (p50/p99/p99.9/max in microseconds) and, with
``--json``, writes the numbers to a file.  Never part of the test run.

    .venv/bin/python bench/ring_latency.py [--n 50000] [--size 4096] [--also-no-checksum] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nicsplit.core.records import AugmentedWrite, Op, WFlag
from nicsplit.card.transports.ring_splitter import RingSplitter
from nicsplit.wire import ring as R


def pct(sorted_ns: list[int], p: float) -> float:
    i = min(len(sorted_ns) - 1, int(round(p / 100 * (len(sorted_ns) - 1))))
    return sorted_ns[i] / 1000


def start_card(run_dir: Path, idle_us: float, cpu: int | None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "nicsplit.card.transports.ring_echo", "--run-dir", str(run_dir),
           "--idle-us", str(idle_us)]
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu), *cmd]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    line = p.stdout.readline()
    if json.loads(line).get("event") != "ready":
        raise RuntimeError(f"card did not start: {line!r}")
    return p


def stop_card(p: subprocess.Popen) -> dict:
    p.terminate()
    out, _ = p.communicate(timeout=10)
    for line in out.splitlines():
        ev = json.loads(line)
        if ev.get("event") == "stats":
            return ev
    return {}


def run(mode: str, n: int, size: int, cpus: tuple[int, int] | None, timeout_ns: int, checksum: bool = True) -> dict:
    with tempfile.TemporaryDirectory(prefix="ringbench") as d:
        card = start_card(Path(d), 1e9 if mode == "busy" else 0, cpus[1] if cpus else None)
        try:
            sp = RingSplitter.connect(os.path.join(d, "card.sock"), checksum=checksum)
            payload = os.urandom(size)
            w = AugmentedWrite(0, 1, 0, 1, Op.WRITE, WFlag.NONE, 0, size, 0, payload)
            ctr = sp._hv.counters  # bench-only peek at the card's state word
            warm = min(2000, n)
            lat: list[int] = []
            clock = time.perf_counter_ns
            for i in range(warm + n):
                w.io_id = i + 1
                w.cg_seq = i + 1
                w.voffset = (i * size) % (1 << 30)
                if mode == "doorbell":
                    deadline = time.monotonic() + 1
                    while ctr[R.Counter.CARD_STATE] != R.CardState.SLEEPING and time.monotonic() < deadline:
                        time.sleep(0.0002)
                w.timestamp_ns = time.time_ns()
                t0 = clock()
                ok = sp.split(w, timeout_ns)
                t1 = clock()
                if i >= warm:
                    lat.append(t1 - t0 if ok else -1)
            st = sp.statistics()
            sp.close()
        finally:
            card_stats = stop_card(card)
    good = sorted(x for x in lat if x >= 0)
    return {
        "mode": mode + ("" if checksum else " (no checksum)"), "n": n, "size": size, "acked": len(good), "failed": len(lat) - len(good),
        "p50_us": pct(good, 50), "p99_us": pct(good, 99), "p999_us": pct(good, 99.9), "max_us": good[-1] / 1000,
        "doorbells": st.doorbells, "timeouts": st.timeouts, "card_sleeps": card_stats.get("sleeps"),
        "card_wakeups": card_stats.get("wakeups"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50_000, help="writes in busy mode")
    ap.add_argument("--n-doorbell", type=int, default=3_000, help="writes in doorbell mode")
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--timeout-ms", type=float, default=10.0, help="split timeout (generous: we measure, not mark)")
    ap.add_argument("--no-pin", action="store_true", help="do not pin host and card to different CPUs")
    ap.add_argument("--also-no-checksum", action="store_true", help="add a busy run without payload checksums")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()
    cpus = None
    if not args.no_pin and len(os.sched_getaffinity(0)) >= 2:
        a, b = sorted(os.sched_getaffinity(0))[:2]
        os.sched_setaffinity(0, {a})
        cpus = (a, b)
    timeout_ns = int(args.timeout_ms * 1e6)
    results = [run("busy", args.n, args.size, cpus, timeout_ns),
               run("doorbell", args.n_doorbell, args.size, cpus, timeout_ns)]
    if args.also_no_checksum:
        results.append(run("busy", args.n, args.size, cpus, timeout_ns, checksum=False))
    print(f"ring round trip, {args.size} B writes, host cpu {cpus[0] if cpus else '-'}, "
          f"card cpu {cpus[1] if cpus else '-'} (microseconds)\n")
    print("| mode | n | p50 | p99 | p99.9 | max | failed | doorbells | timeouts |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['mode']} | {r['n']} | {r['p50_us']:.2f} | {r['p99_us']:.2f} | {r['p999_us']:.2f} | "
              f"{r['max_us']:.1f} | {r['failed']} | {r['doorbells']} | {r['timeouts']} |")
    print("\n(failed = split returned False; with a 10 ms timeout that means the card was descheduled)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
