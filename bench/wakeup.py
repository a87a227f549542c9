#!/usr/bin/env python3
"""How late a sleeping real-time thread wakes on a shared core: the floor
under the card's acker when it sleeps on its doorbell (issue 9's QD16 split
tail), measured without any nicsplit code.

A *sleeper* at SCHED_FIFO priority 1 (the acker's) on the last CPU blocks
in ``eventfd_read``, as the acker's doorbell sleep does. A *waker* on
another CPU stores ``CLOCK_MONOTONIC`` in shared memory and writes the
eventfd, as the host's doorbell does; the sleeper takes the clock once it
runs. One wake-up at a time (the waker waits for the sleeper's answer), one
every ``--period-us``. Phases, each ``--seconds`` long, with on the
sleeper's CPU:

- ``idle``: nothing else (the baseline);
- ``cpu``: a normal-priority process spinning in user mode;
- ``io``: a normal-priority process writing 1 MiB buffered and calling
  fsync, in a loop (what the appliance's group commits and distribution
  steps do on a core they share with the acker).

With kernel preemption (``preempt=full``) a real-time thread woken while a
normal one is inside a system call runs at once; without it
(``preempt=none``/``voluntary``) it waits for the call to return or to
reach a rescheduling point. The kernel's model is printed (``dmesg``'s
"Dynamic Preempt" line, or ``uname -v``). Needs root (SCHED_FIFO).

Reports p50 / p99 / p99.9 / max per phase and each phase's p99 against
idle's from the same run; writes ``OUT/wakeup.{json,md,png}``. Nothing here
asserts on speed.

    .venv/bin/python bench/wakeup.py [--seconds 5] [--period-us 250] [--out bench/out]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import add_idle_poll, git_state, idle_poll_hold, percentile, pyplot  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STAMP = struct.Struct("=qq")  # (wake-up number, CLOCK_MONOTONIC ns at the doorbell)


def preempt_model() -> str:
    """The running kernel's preemption model, as far as this box tells."""
    try:
        return Path("/sys/kernel/debug/sched/preempt").read_text().strip()
    except OSError:
        pass
    try:
        out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if "Dynamic Preempt:" in line:
                return line.split("Dynamic Preempt:", 1)[1].strip() + " (dmesg)"
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "unknown (uname -v: " + os.uname().version + ")"


def sleeper(cpu: int, efd: int, back: int, shm: mmap.mmap, out_fd: int, n: int) -> None:
    """Child: SCHED_FIFO on ``cpu``; ``n`` wake-ups, latencies (ns) to ``out_fd``."""
    os.sched_setaffinity(0, {cpu})
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    lat = array("q")
    for _ in range(n):
        os.eventfd_read(efd)
        now = time.monotonic_ns()
        _, t = STAMP.unpack_from(shm, 0)
        lat.append(now - t)
        os.eventfd_write(back, 1)
    os.write(out_fd, lat.tobytes())


def load(kind: str, cpu: int, path: Path) -> int:
    """A normal-priority process on ``cpu`` doing ``kind`` until killed; its pid."""
    pid = os.fork()
    if pid:
        return pid
    try:
        os.sched_setaffinity(0, {cpu})
        if kind == "cpu":
            while True:
                pass
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        block = os.urandom(1 << 20)
        off = 0
        while True:
            os.pwrite(fd, block, off)
            os.fsync(fd)
            off = (off + len(block)) % (256 << 20)
    finally:
        os._exit(0)


def phase(kind: str, cpu: int, waker_cpus: set[int], seconds: float, period_s: float, tmp: Path) -> list[float]:
    """Wake-up latencies (µs) of one phase."""
    n = max(1, int(seconds / period_s))
    loader = load(kind, cpu, tmp / "io.bin") if kind != "idle" else 0  # first: it inherits none of the fds below
    shm = mmap.mmap(-1, mmap.PAGESIZE)
    efd, back = os.eventfd(0), os.eventfd(0)
    r, w = os.pipe()
    child = os.fork()
    if not child:
        try:
            os.close(r)
            sleeper(cpu, efd, back, shm, w, n)
        finally:
            os._exit(0)
    os.close(w)
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, waker_cpus)
    try:
        time.sleep(0.2)  # ok-sleep: the sleeper sets its policy and blocks; the load starts
        for i in range(n):
            STAMP.pack_into(shm, 0, i, time.monotonic_ns())
            os.eventfd_write(efd, 1)
            os.eventfd_read(back)  # one wake-up at a time
            time.sleep(period_s)  # ok-sleep: the pacing of the wake-ups
        data = b""
        while chunk := os.read(r, 1 << 20):
            data += chunk
        os.waitpid(child, 0)
    finally:
        os.sched_setaffinity(0, mine)
        if loader:
            os.kill(loader, signal.SIGKILL)
            os.waitpid(loader, 0)
        for fd in (efd, back, r):
            os.close(fd)
    return [x / 1000 for x in array("q", data)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--period-us", type=float, default=250)
    ap.add_argument("--phases", default="idle,cpu,io")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    add_idle_poll(ap)
    a = ap.parse_args()
    hold = idle_poll_hold(a.idle_poll)  # held until this process exits
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        print("needs two CPUs: the sleeper's and the waker's", file=sys.stderr)
        return 2
    cpu, waker = cpus[-1], set(cpus[:-1])
    model = preempt_model()
    idle = "poll (cpu_dma_latency=0)" if hold.held else "halt (system default)"
    print(f"kernel preemption: {model}; idle CPUs {idle}; sleeper on CPU {cpu}, waker on {sorted(waker)}", flush=True)
    rows: dict[str, dict] = {}
    lats: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="wakeup-") as t:
        for kind in a.phases.split(","):
            lat = phase(kind, cpu, waker, a.seconds, a.period_us / 1e6, Path(t))
            lats[kind] = lat
            rows[kind] = {"n": len(lat), **{f"p{q}": percentile(lat, q) for q in (50, 99, 99.9)}, "max": max(lat)}
            print(f"{kind:5} n {len(lat)}  p50 {rows[kind]['p50']:.1f}  p99 {rows[kind]['p99']:.1f}  "
                  f"p99.9 {rows[kind]['p99.9']:.1f}  max {rows[kind]['max']:.1f} µs", flush=True)
    base = rows.get("idle", {}).get("p99")
    lines = [f"Wake-up latency of a SCHED_FIFO sleeper on a shared core (kernel preemption: {model}; "
             f"idle CPUs {idle}; {git_state(ROOT)})", "",
             "| on the sleeper's CPU | wake-ups | p50 µs | p99 µs | p99.9 µs | max µs | p99 / idle's |",
             "|---|---|---|---|---|---|---|"]
    for kind, r in rows.items():
        ratio = f"{r['p99'] / base:.1f}" if base else "-"
        lines.append(f"| {kind} | {r['n']} | {r['p50']:.1f} | {r['p99']:.1f} | {r['p99.9']:.1f} | {r['max']:.1f} | {ratio} |")
    md = "\n".join(lines) + "\n"
    print("\n" + md)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "wakeup.json").write_text(json.dumps({"preempt": model, "idle_poll": hold.held, "cpu": cpu, "rows": rows},
                                                  indent=1))
    (a.out / "wakeup.md").write_text(md)
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(7, 4))
        for kind, lat in lats.items():
            xs = sorted(lat)
            ax.plot(xs, [1 - i / len(xs) for i in range(len(xs))], label=kind)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("wake-up latency (µs)")
        ax.set_ylabel("fraction of wake-ups later than x")
        ax.set_title(f"SCHED_FIFO sleeper, preemption {model.split()[0]}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(a.out / "wakeup.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
