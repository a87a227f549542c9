#!/usr/bin/env python3
"""The floor under the QD1 ack on this box: the bare round trip of one
counter through two processes' shared memory, in Python, with the "acker"
spinning (SCHED_FIFO on the last CPU, as `nicsplit card run` places it)
and the "host" spinning for the echo, unpinned. No ring, no descriptor, no
checksum: what any submit -> ack here costs at least (docs/benchmarks.md,
"QD1: where the microseconds go").

    .venv/bin/python bench/qd1_bare.py [--n 20000] [--rounds 5] [--copy]

``--copy`` adds the host's per-write work of the real splitter (a 4 KiB
copy into the shared area and its xxh3) before each publish.
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import sys
from time import monotonic_ns

from xxhash import xxh3_64_intdigest as xxh3


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(len(s) * p / 100))]


def acker(c: memoryview) -> None:
    """Echo c[0] into c[1] as soon as it moves; stop at -1."""
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except OSError:
        pass
    last = 0
    while True:
        v = c[0]
        if v != last:
            if v < 0:
                return
            c[1] = v
            last = v


def one_round(n: int, copy: bool) -> dict[str, float]:
    m = mmap.mmap(-1, 1 << 20)
    c = memoryview(m)[:16].cast("q")
    data = memoryview(m)[4096:]
    payload = os.urandom(4096)
    pid = os.fork()
    if pid == 0:
        acker(c)
        os._exit(0)
    rtts = []
    for i in range(1, n + 1):
        t = monotonic_ns()
        if copy:
            off = (i % 64) << 12
            data[off: off + 4096] = payload
            xxh3(payload)
        c[0] = i
        while c[1] != i:
            pass
        rtts.append((monotonic_ns() - t) / 1000)
    c[0] = -1
    os.waitpid(pid, 0)
    return {"p50_us": pct(rtts, 50), "p99_us": pct(rtts, 99)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--copy", action="store_true", help="add the host's 4 KiB copy and xxh3 per write")
    a = ap.parse_args(argv)
    rs = [one_round(a.n, a.copy) for _ in range(a.rounds)]
    for r in rs:
        print(f"p50 {r['p50_us']:.2f} us  p99 {r['p99_us']:.2f} us")
    p50 = [r["p50_us"] for r in rs]
    p99 = [r["p99_us"] for r in rs]
    print(f"median of {a.rounds} rounds: p50 {statistics.median(p50):.2f} us ({min(p50):.2f}-{max(p50):.2f}), "
          f"p99 {statistics.median(p99):.2f} us ({min(p99):.2f}-{max(p99):.2f}); load {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
