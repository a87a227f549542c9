#!/usr/bin/env python3
"""What each card transport costs a QD1 write against no protection, paired
in the same ``nicsplit up`` (issue 12 targets: ring and nvme-pi within
1.10x, shadow within 1.3x of none).

One data directory with two vdisks: ``a`` in CG cg1 (protected through the
transport under test) and ``n`` in no CG (no protection: the "none" column,
the same chain without a split). Per round, ``nicsplit up --transport T``
is started once per transport (the order rotates by round); in each run,
blocks of ``--writes`` 4 KiB libnbd writes one at a time alternate between
``n`` and ``a`` (client-side latency), and the host's and the card's CPU
time over each block (utime+stime from /proc, the card's acker and worker
together) is divided by its writes. Each round's ratio is a's p50 over n's
in the same run (transport ``none``: a second unprotected vdisk ``m``
against ``n``, an A/A run: how far the ratio of two identical paths strays
on this machine). ``--before SRC`` runs every transport a second time per
round with the ``nicsplit`` package of another tree (PYTHONPATH=SRC for the
processes `nicsplit up` starts), labelled ``@before``: a change measured
against its parent in the same run. Reported: medians over the rounds of
p50 / p99, CPU per write, the host's ``split`` p50 (publish + the wait for
the ack after the datastore write) and the acker's doorbell sleeps per
write, and the ratio, with the spread (min..max). Nothing here asserts on
speed.

Where the card's cores are (issue 12: what this 2-core box can show):

- ``--acker-core dedicated``: ``[card] acker_core = "dedicated"``, the
  acker polls on CPU 1 and never sleeps, everything else on CPU 0 (the
  client too, as a VM runs on its host's cores), as on a DPU;
- ``--isolate``: the card's pipeline worker and the appliance are stopped
  (SIGSTOP) for each measured block, of ``n`` and of ``a`` alike, and
  continued after it (they catch up between blocks; the acker acks
  meanwhile, the handoff queue holds the block). On a DPU the pipeline has
  cores of its own and the appliance is another machine: this is the
  host's QD1 with neither on its cores. The block's card CPU is then the
  acker's alone.

    .venv/bin/python bench/qd1_paired.py [--transports ring,nvme-pi,shadow] [--rounds 3] [--writes 2000]
        [--blocks 2] [--before /path/to/other/tree/src] [--acker-core dedicated] [--isolate]
        [--idle-poll auto|on|off]

``--idle-poll`` (default auto: on as root): idle CPUs poll instead of
halting during the run (bench/harness.py `idle_poll_hold`; see
bench/transports.py).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import add_idle_poll, cpu_seconds as cpu_s, idle_poll_hold, percentile as pct  # noqa: E402
from keepup import card_stats  # noqa: E402
from transports import caught_up, hist_delta_percentile  # noqa: E402
from keepup import host_split  # noqa: E402
from nicsplit.testing.datadir import init_data  # noqa: E402
from nicsplit.testing.procs import UpProcess, nbd_connect, run_cli, wait_for  # noqa: E402
from nicsplit.testing.recovered import cg_state  # noqa: E402

SIZE = 64 << 20


def qd1(h, n: int, base: int) -> list[float]:
    out = []
    for i in range(n):
        buf = bytes([i & 0xFF]) * 4096
        off = ((base + i * 7919) % (SIZE // 4096)) * 4096
        t = time.perf_counter()
        h.pwrite(buf, off)
        out.append((time.perf_counter() - t) * 1e6)
    return out


def acker_sleeps(data: Path) -> int:
    """The acker's doorbell sleeps so far (0 for a card without an acker)."""
    return ((card_stats(data).get("endpoint") or {}).get("handoff") or {}).get("acker_sleeps") or 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--writes", type=int, default=2000)
    ap.add_argument("--blocks", type=int, default=2, help="blocks per vdisk per run (alternating n / a)")
    ap.add_argument("--transports", default="ring,nvme-pi,shadow")
    ap.add_argument("--before", help="another tree's src directory: each transport again with its nicsplit")
    ap.add_argument("--acker-core", choices=("shared", "dedicated"), default="shared",
                    help="[card] acker_core; dedicated also pins this client off the acker's CPU")
    ap.add_argument("--isolate", action="store_true",
                    help="stop the card's worker and the appliance during each measured block")
    add_idle_poll(ap)
    args = ap.parse_args()
    hold = idle_poll_hold(args.idle_poll)  # held until this process exits
    print(f"idle CPUs {'poll (cpu_dma_latency=0)' if hold.held else 'halt (system default)'}", flush=True)
    card_section = {"transport_options": {"data_size": "256M"}, "acker_core": args.acker_core}
    allowed = sorted(os.sched_getaffinity(0))
    # dedicated: the client runs on the host's CPUs, not the card's (set once up has started: its children inherit)
    client_cpus = allowed[:-1] or allowed if args.acker_core == "dedicated" else allowed
    runs = [(t, "") for t in args.transports.split(",")]
    if args.before:
        runs += [(t, "@before") for t in args.transports.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="shadow-qd1-"))
    data = init_data(tmp / "data", filters=["stats", {"name": "split", "split_timeout_us": 1_000_000}],
                     sections={"card": card_section})
    run_cli(data, "cg", "create", "cg1")
    run_cli(data, "vdisk", "create", "a", "--size", str(SIZE), "--cg", "cg1")
    run_cli(data, "vdisk", "create", "n", "--size", str(SIZE))
    run_cli(data, "vdisk", "create", "m", "--size", str(SIZE))  # "none" as a transport: n against m (A/A)
    res: dict[str, list[tuple]] = {}  # mode -> [(p50, p99, host cpu, card cpu, split p50, acker sleeps/w)]
    ratios: dict[str, list[float]] = {}
    base = 0
    own = os.environ.get("PYTHONPATH")
    filled = False
    for r in range(args.rounds):
        order = runs[r % len(runs):] + runs[: r % len(runs)]
        for transport, tag in order:
            env = f"{args.before}:{own}" if tag and own else args.before if tag else own
            if env is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = env  # inherited by `nicsplit up` and what it starts
            with UpProcess(data, *(["--transport", transport] if transport != "none" else [])) as up:
                os.sched_setaffinity(0, client_cpus)
                hs = {v: nbd_connect(up.uri(v)) for v in ("n", "a", "m")}
                if not filled:  # every block written once: no allocation or file hole in the blocks
                    for v in ("n", "a", "m"):
                        for off in range(0, SIZE, 1 << 20):
                            hs[v].pwrite(b"\0" * (1 << 20), off)
                    filled = True
                wait_for(lambda: caught_up(data), 120, "cg1 protected and caught up", interval=0.2)
                host, card = up.pid_of("host"), up.pid_of("card")
                worker = card_stats(data).get("worker_pid")
                cards = [card] + ([worker] if worker and worker != card else [])
                p50s = {}
                paused = [worker, up.pid_of("appliance")] if args.isolate and worker and worker != card else []
                for _ in range(args.blocks):
                    other = "m" if transport == "none" else "a"
                    for v, mode in (("n", f"none@{transport}{tag}"), (other, f"{transport}{tag}")):
                        qd1(hs[v], 100, base)  # warm
                        wait_for(lambda: caught_up(data), 120, "cg1 caught up", interval=0.05)
                        s0, sp0 = acker_sleeps(data), host_split(data, ["a"])["a"].get("split_hist")
                        for pid in paused:
                            os.kill(pid, signal.SIGSTOP)
                        try:
                            h0, c0 = cpu_s(host), sum(map(cpu_s, cards))
                            lat = qd1(hs[v], args.writes, base)
                            h1, c1 = cpu_s(host), sum(map(cpu_s, cards))
                        finally:
                            for pid in paused:
                                os.kill(pid, signal.SIGCONT)
                        base += args.writes
                        sleeps = (acker_sleeps(data) - s0) / args.writes
                        split = hist_delta_percentile(sp0, host_split(data, ["a"])["a"].get("split_hist"), 50)
                        row = (pct(lat, 50), pct(lat, 99), (h1 - h0) / args.writes * 1e6,
                               (c1 - c0) / args.writes * 1e6, split or 0.0, sleeps)
                        res.setdefault(mode, []).append(row)
                        p50s.setdefault(v, []).append(row[0])
                        print(f"round {r} {mode:<20} p50 {row[0]:.1f} us  p99 {row[1]:.1f} us  "
                              f"host {row[2]:.1f} us/w  card {row[3]:.1f} us/w  split p50 {row[4]:.1f} us  "
                              f"acker sleeps/w {row[5]:.2f}", flush=True)
                ratios.setdefault(f"{transport}{tag}", []).append(
                    statistics.median(p50s[other]) / statistics.median(p50s["n"]))
                state = cg_state(data)["state"]
                for h in hs.values():
                    h.shutdown()
                os.sched_setaffinity(0, allowed)
                if state != "protected":
                    print(f"  note: cg1 ended {state}", flush=True)
    print(f"\nacker_core = {args.acker_core}{', worker and appliance stopped during blocks' if args.isolate else ''}")
    print("\n| mode | QD1 p50 (us) | p50 spread | QD1 p99 (us) | p99 spread | host CPU/write (us) | card CPU/write (us) "
          "| split p50 (us) | acker sleeps/write |")
    print("|---|---|---|---|---|---|---|---|---|")
    out = {}
    for mode, rows in sorted(res.items()):
        col = list(zip(*rows))
        med = [statistics.median(c) for c in col]
        out[mode] = {"p50_us": med[0], "p99_us": med[1], "host_cpu_us": med[2], "card_cpu_us": med[3],
                     "split_p50_us": med[4], "acker_sleeps_per_write": med[5], "rounds": rows}
        print(f"| {mode} | {med[0]:.1f} | {min(col[0]):.1f}..{max(col[0]):.1f} | {med[1]:.1f} | "
              f"{min(col[1]):.1f}..{max(col[1]):.1f} | {med[2]:.1f} | {med[3]:.1f} | {med[4]:.1f} | {med[5]:.2f} |")
    print("\n| transport | QD1 p50 / none's, same run (median of rounds) | spread |")
    print("|---|---|---|")
    for t, rs in ratios.items():
        print(f"| {t} | {statistics.median(rs):.2f} | {min(rs):.2f}..{max(rs):.2f} |")
    print(json.dumps({"modes": {k: {kk: vv for kk, vv in v.items() if kk != "rounds"} for k, v in out.items()},
                      "ratios": ratios, "idle_poll": hold.held}))
    hold.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
