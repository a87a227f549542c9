#!/usr/bin/env python3
"""The kernel's CPU per 4 KiB record for the IO the appliance cannot avoid,
on this machine's file system, against the per-record budget of issue 9's
throughput targets (distribution ≥ 50,000 records/s on one core: 20 µs a
record; ingest ≥ 100,000: 10 µs).

No nicsplit code runs here: plain ``os.pwrite``/``os.write`` and
``fsync``/``fdatasync`` of the patterns the appliance's format needs,
timed with ``time.thread_time`` (user + system CPU of this thread, which
includes the writeback the sync does on its behalf; not the wall time a
sync waits for the disk):

- *distribution, random*: a step of ``--step`` 4 KiB blocks at random
  offsets of a 1 GiB sparse image (sorted, as a step applies them), then
  an fsync; and the same with each block's 32-byte tag entry written into
  the sidecar (`nicsplit.storage.sealed`), then its fsync too;
- *distribution, O_DIRECT*: the same blocks written with ``O_DIRECT`` (no
  page cache, no writeback), to show whether bypassing the cache is cheaper
  here;
- *journal append*: ``--batch`` 4 KiB records appended as one write, then
  an fdatasync (ingest's group commit), for two batch sizes;
- *host datastore write*: one 4 KiB ``pwrite`` timed alone, back to back,
  after a 50 µs sleep, and after 1 MiB of memory copied: on this VM a write
  after a gap or after other work costs several times a hot one (issue 12:
  the extra work of a protected QD1 write makes the syscalls after it
  slower too).

Medians of ``--rounds`` (spread min–max); writes ``OUT/io_floor.{json,md,png}``.

    .venv/bin/python bench/io_floor.py [--rounds 5] [--step 1024] [--dir DIR] [--out bench/out]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
BS = 4096
SPAN = 1 << 18  # blocks: a 1 GiB image
TAG = 32  # a sealed image's entry per block


def cpu_per_record(fn: Callable[[], int], rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        t0 = time.thread_time()
        n = fn()
        spent = getattr(fn, "spent", None)  # a case that times only its own syscalls
        out.append(1e6 * (spent if spent is not None else time.thread_time() - t0) / n)
    return out


def host_write(d: Path, rng: random.Random, between: str, n: int = 2000) -> Callable[[], int]:
    """The host's datastore write at QD1: a 4 KiB pwrite at a random block
    of a 64 MiB file, timed alone, with between two writes nothing
    (``hot``), a 50 µs sleep (the gap a QD1 client leaves), or 1 MiB of
    memory copied (what other work does to the caches)."""
    blocks = 1 << 14
    fd = os.open(d / "vdisk", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    for off in range(0, blocks * BS, 1 << 20):
        os.pwrite(fd, bytes(1 << 20), off)
    block, other = os.urandom(BS), bytearray(4 << 20)
    clock = time.thread_time_ns

    def run() -> int:
        spent = 0
        for i in range(n):
            if between == "sleep":
                time.sleep(50e-6)  # ok-sleep: the idle gap between two QD1 requests is what is measured
            elif between == "traffic":
                bytes(other[(i & 3) << 20 : ((i & 3) + 1) << 20])
            t0 = clock()
            os.pwrite(fd, block, rng.randrange(blocks) * BS)
            spent += clock() - t0
        run.spent = spent / 1e9  # type: ignore[attr-defined]
        return n

    run.fds = (fd,)  # type: ignore[attr-defined]
    return run


def random_step(d: Path, rng: random.Random, step: int, *, tags: bool, direct: bool) -> Callable[[], int]:
    flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
    img = os.open(d / "img", flags, 0o600)
    side = os.open(d / "img.tags", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.ftruncate(img, SPAN * BS)
    os.ftruncate(side, BS + SPAN * TAG)
    buf = mmap.mmap(-1, BS)  # page-aligned, as O_DIRECT needs
    buf.write(os.urandom(BS))
    block, entry = memoryview(buf), os.urandom(TAG)

    def run() -> int:
        for b in sorted(rng.randrange(SPAN) for _ in range(step)):
            os.pwrite(img, block, b * BS)
            if tags:
                os.pwrite(side, entry, BS + b * TAG)
        os.fsync(img)
        if tags:
            os.fsync(side)
        return step

    run.fds = (img, side)  # type: ignore[attr-defined]
    return run


def append(d: Path, batch: int) -> Callable[[], int]:
    fd = os.open(d / "seg", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
    data = os.urandom(BS * batch)

    def run() -> int:
        for _ in range(16):
            os.write(fd, data)
            os.fdatasync(fd)
        return 16 * batch

    run.fds = (fd,)  # type: ignore[attr-defined]
    return run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--step", type=int, default=1024, help="records per distribution step")
    ap.add_argument("--dir", type=Path, default=None, help="where the files go (default: a temporary folder "
                    "next to this tree, on the file system the data directory is on)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    ap.add_argument("--seed", type=int, default=None)
    a = ap.parse_args(argv)
    seed = a.seed if a.seed is not None else random.SystemRandom().randrange(1 << 32)
    print(f"seed {seed}", flush=True)
    rng = random.Random(seed)
    cases = [
        ("distribution, random: data block + fsync", lambda d: random_step(d, rng, a.step, tags=False, direct=False),
         20.0),
        ("distribution, random: data block + tag entry + fsyncs (the sealed image)",
         lambda d: random_step(d, rng, a.step, tags=True, direct=False), 20.0),
        ("distribution, random: data block with O_DIRECT", lambda d: random_step(d, rng, a.step, tags=False, direct=True),
         20.0),
        ("journal: 64 records appended + fdatasync", lambda d: append(d, 64), 10.0),
        ("journal: 256 records appended + fdatasync", lambda d: append(d, 256), 10.0),
        # No budget: these show what a QD1 write's extra work costs the syscalls after it here.
        ("host datastore write, 4 KiB, back to back", lambda d: host_write(d, rng, "hot"), None),
        ("the same after a 50 µs sleep (a QD1 gap)", lambda d: host_write(d, rng, "sleep"), None),
        ("the same after 1 MiB of memory copied", lambda d: host_write(d, rng, "traffic"), None),
    ]
    rows = []
    with tempfile.TemporaryDirectory(prefix="io-floor-", dir=a.dir or ROOT) as t:
        for name, make, budget in cases:
            d = Path(t) / f"c{len(rows)}"
            d.mkdir()
            fn = make(d)
            try:
                fn()  # warm: the files' first metadata
                xs = cpu_per_record(fn, a.rounds)
            finally:
                for fd in fn.fds:  # type: ignore[attr-defined]
                    os.close(fd)
            med = statistics.median(xs)
            rows.append({"case": name, "us_per_record": med, "min": min(xs), "max": max(xs), "budget_us": budget,
                         "share_of_budget": med / budget if budget else None})
            print(f"  {name}: {med:.1f} µs of CPU a record ({min(xs):.1f}–{max(xs):.1f}); budget "
                  f"{f'{budget:.0f}' if budget else '-'}", flush=True)
    doc = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "seed": seed, "rounds": a.rounds, "step": a.step,
           "loadavg": os.getloadavg()[0], "rows": rows}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "io_floor.json").write_text(json.dumps(doc, indent=1))
    md = ["# The kernel's CPU per 4 KiB record (bench/io_floor.py)", "",
          f"{doc['when']}, load average {doc['loadavg']:.2f}, median of {a.rounds} rounds (spread), "
          f"distribution steps of {a.step} records over a 1 GiB image. Budget: the CPU a record may cost "
          "for issue 9's target on one core (distribution 50,000 records/s, ingest 100,000).", "",
          "| IO | kernel CPU µs / record | budget µs | share of the budget |", "|---|---|---|---|"]
    md += [f"| {r['case']} | {r['us_per_record']:.1f} ({r['min']:.1f}–{r['max']:.1f}) | "
           + (f"{r['budget_us']:.0f} | {100 * r['share_of_budget']:.0f} % |" if r["budget_us"] else "– | – |")
           for r in rows]
    (a.out / "io_floor.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return 0
    fig, ax = plt.subplots(figsize=(10, 4))
    ys = range(len(rows))
    ax.barh(ys, [r["us_per_record"] for r in rows], label="kernel CPU µs / record")
    ax.scatter([r["budget_us"] or float("nan") for r in rows], ys, color="red", marker="|", s=400,
               label="target's budget")
    ax.set_yticks(list(ys), [r["case"][:60] for r in rows], fontsize=7)
    ax.set_xlabel("µs of CPU per 4 KiB record")
    ax.legend()
    fig.tight_layout()
    fig.savefig(a.out / "io_floor.png", dpi=100)
    return 0


if __name__ == "__main__":
    sys.exit(main())
