#!/usr/bin/env python3
"""Overflow-log append cost per write (issue 10): what the card pays to move
one polled write (and its outcome) from the ring into its overflow log.

Measures, for each payload size, `Overflow.divert` of poll-sized groups of
writes + outcomes (encode, CRC, buffer, one pwrite per group) and the group
fdatasync that follows (as the card does it, once per poll round), then the
read-back (`OverflowLog.peek`/`advance`, what feeding the pipeline from the
log costs). The log lives in a temporary directory on the given file system
(``--dir``, default the system's temp dir). Prints a markdown table in
microseconds per write. Never part of the test run.

    PYTHONPATH=src .venv/bin/python bench/overflow.py [--n 20000] [--group 64] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from nicsplit.card.overflow import Overflow, OverflowLog
from nicsplit.core.records import AugmentedWrite, Op, Outcome, Status, WFlag


class _NoPipeline:
    """Hold never waits for these writes (every outcome goes to the log)."""

    def awaits(self, io_id: int) -> bool:
        return False

    def close_merge_windows(self, now_ns: int) -> None:
        pass


def bench(size: int, n: int, group: int, where: Path) -> dict[str, float]:
    payload = memoryview(os.urandom(size))
    released: list[int] = []
    with tempfile.TemporaryDirectory(dir=where) as d:
        log = OverflowLog(Path(d) / "card-overflow.log", max_bytes=1 << 40)
        ovf = Overflow(log, release_ring=released.append)
        pipe = _NoPipeline()
        groups = []
        for g in range(0, n, group):
            es: list = []
            for i in range(g, min(n, g + group)):
                es.append(AugmentedWrite(i + 1, 1, i + 1, 1, Op.WRITE, WFlag.NONE, i * size, size, 0, payload))
                es.append(Outcome(i + 1, Status.COMMITTED))
            groups.append(es)
        t_append = t_sync = 0
        for es in groups:
            t0 = time.perf_counter_ns()
            ovf.divert(es, pipe, 0)
            t1 = time.perf_counter_ns()
            ovf.sync_now()  # the card runs this off its loop thread; here it is timed on its own
            t2 = time.perf_counter_ns()
            t_append += t1 - t0
            t_sync += t2 - t1
        assert len(released) == n
        t0 = time.perf_counter_ns()
        k = 0
        while (e := log.peek()) is not None:
            log.advance()
            k += e.length if type(e) is AugmentedWrite else 0
        t_read = time.perf_counter_ns() - t0
        log.close()
    return {"append": t_append / n / 1000, "fsync": t_sync / n / 1000, "read": t_read / n / 1000,
            "MiB/s": size * n / (1 << 20) / ((t_append + t_sync) / 1e9)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--group", type=int, default=64, help="writes per poll round (one pwrite + one fdatasync)")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--sizes", default="4096,65536")
    a = ap.parse_args()
    print(f"overflow log in {a.dir}, {a.n} writes per size, {a.group} writes (+ outcomes) per group fsync\n")
    print("| write | append µs/write | group fsync µs/write | read back µs/write | MiB/s (append+fsync) |")
    print("|---|---|---|---|---|")
    for size in (int(s) for s in a.sizes.split(",")):
        r = bench(size, a.n, a.group, a.dir)
        print(f"| {size // 1024} KiB | {r['append']:.2f} | {r['fsync']:.2f} | {r['read']:.2f} | {r['MiB/s']:.0f} |")


if __name__ == "__main__":
    main()
