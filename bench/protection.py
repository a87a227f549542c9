#!/usr/bin/env python3
"""``make bench`` suite for issue 10, never silently unprotected: what the
automatic resync and the card's overflow log cost, measured on the whole
system (``nicsplit up``, the default configuration) with real fio.

1. **Resync.** fio 4 KiB randwrite QD16 paced at ``--rate-iops`` on a
   protected vdisk: a baseline window, then the card is killed (kill -9) and
   the load goes on: the supervisor restarts the card, the vdisk marks, then
   resyncs its dirty regions by itself. From fio's per-IO latency log:
   production IOPS and p99 completion latency during the resync against the
   baseline window of the same run; from the host: resync MiB/s and bytes.
2. **Appliance outage.** The same paced load while the appliance is
   stopped (SIGSTOP) for ``--outage-seconds``: RPO and state sampled every
   0.5 s through the outage and after it (the overflow log absorbs it:
   expected lagging, never marking), time until RPO < 1 s again.

The RPO of an unpaced 60 s QD16 run is in bench/keepup.py; the overflow
log's append cost per write in bench/overflow.py.

    .venv/bin/python bench/protection.py [--quick] [--rate-iops 2000] [--outage-seconds 20] [--out bench/out]

Writes ``protection.json``, ``protection.md`` and ``protection.png``.
Nothing here asserts on speed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import percentile as pct, pyplot  # noqa: E402
from nicsplit.core.ctl import request  # noqa: E402
from nicsplit.core.layout import Layout  # noqa: E402
from nicsplit.testing.datadir import init_data  # noqa: E402
from nicsplit.testing.procs import UpProcess, run_cli, wait_for  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def host_vdisk(data: Path, name: str) -> dict:
    st = (request(Layout(data).host_sock, {"cmd": "status"}) or {}).get("status") or {}
    return next((v for v in st.get("vdisks", []) if v["name"] == name), {})


def cg(data: Path, name: str) -> dict:
    st = json.loads(run_cli(data, "status", "--json").stdout)
    return next((c for c in st["cgs"] if c["name"] == name), {})


def fio(uri: str, seconds: float, rate: int, size: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        ["fio", "--name=p", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k", f"--size={size}",
         "--iodepth=16", "--time_based=1", f"--runtime={seconds:g}", f"--rate_iops={rate}",
         f"--write_lat_log={log}", "--log_avg_msec=0", "--randseed=42"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def lat_log(prefix: Path) -> list[tuple[float, float]]:
    """fio's clat log: (seconds since fio start at completion, latency µs)."""
    path = next(prefix.parent.glob(prefix.name + "_clat.*.log"))
    out = []
    for line in path.read_text().splitlines():
        parts = line.split(",")
        out.append((int(parts[0]) / 1000, int(parts[1]) / 1000))
    return out


def window(lat: list[tuple[float, float]], t0: float, t1: float) -> dict[str, Any]:
    xs = [lat_us for t, lat_us in lat if t0 <= t < t1]
    el = max(1e-9, t1 - t0)
    return {"from_s": round(t0, 2), "to_s": round(t1, 2), "ios": len(xs), "iops": len(xs) / el,
            "p50_us": pct(xs, 50), "p99_us": pct(xs, 99)}


def resync_run(work: Path, *, rate: int, size: str, base_s: float, quick: bool) -> dict[str, Any]:
    data = init_data(work / "data")
    run_cli(data, "cg", "create", "r")
    run_cli(data, "vdisk", "create", "v", "--size", size, "--cg", "r")
    samples = []
    with UpProcess(data) as up:
        wait_for(lambda: host_vdisk(data, "v").get("state") == "protected", 60, "v protected")
        total = base_s + (40 if not quick else 20)
        log = work / "resync-lat"
        t_start = time.monotonic()
        p = fio(up.uri("v"), total, rate, size, log)
        wait_for(lambda: time.monotonic() - t_start >= base_s, base_s + 5, "the baseline window", interval=0.1)
        card = up.pid_of("card")
        t_kill = time.monotonic() - t_start
        os.kill(card, signal.SIGKILL)
        t_resync0 = t_resync1 = None
        peak: dict[str, Any] = {}
        while p.poll() is None:
            v = host_vdisk(data, "v")
            t = time.monotonic() - t_start
            samples.append({"t": round(t, 2), "state": v.get("state")})
            if v.get("state") == "resyncing" and t_resync0 is None:
                t_resync0 = t
            if v.get("resync"):
                peak = v["resync"]
            if t_resync0 is not None and t_resync1 is None and v.get("state") == "protected":
                t_resync1 = t
            time.sleep(0.1)  # ok-sleep: sampling cadence
        err = p.stderr.read()
        if p.returncode:
            raise RuntimeError(f"fio failed: {err[-1000:]}")
        lat = lat_log(log)
        hostlog = (data / "run" / "host.log").read_text()
        done = re.findall(r"resync done: ([\d.]+) MiB in ([\d.]+) s", hostlog)
        mib, secs = (float(done[-1][0]), float(done[-1][1])) if done else (None, None)
    # fio's clock starts a little after ours: align on the kill (the first marked writes)
    res = {"rate_iops": rate, "vdisk_size": size, "kill_at_s": round(t_kill, 2),
           "resync_from_s": t_resync0, "resync_to_s": t_resync1, "resync_mib": mib, "resync_s": secs,
           "resync_mib_s": (mib / secs) if mib and secs else None, "resync_status_last": peak,
           "baseline": window(lat, 1.0, t_kill), "samples": samples}
    if t_resync0 is not None and t_resync1 is not None:
        res["during_resync"] = window(lat, t_resync0, t_resync1)
    return res


def outage_run(work: Path, *, rate: int, size: str, outage_s: float) -> dict[str, Any]:
    data = init_data(work / "data2")
    run_cli(data, "cg", "create", "o")
    run_cli(data, "vdisk", "create", "w", "--size", size, "--cg", "o")
    samples = []
    with UpProcess(data) as up:
        wait_for(lambda: host_vdisk(data, "w").get("state") == "protected", 60, "w protected")
        total = 5 + outage_s + 25
        t_start = time.monotonic()
        p = fio(up.uri("w"), total, rate, size, work / "outage-lat")
        app = up.pid_of("appliance")
        stopped_at = resumed_at = back_at = None
        while p.poll() is None:
            t = time.monotonic() - t_start
            if stopped_at is None and t >= 5:
                os.kill(app, signal.SIGSTOP)
                stopped_at = t
            if stopped_at is not None and resumed_at is None and t >= stopped_at + outage_s:
                os.kill(app, signal.SIGCONT)
                resumed_at = t
            if stopped_at is None or resumed_at is not None:  # the CLI's status asks the appliance too
                c = cg(data, "o")
                rpo = c.get("rpo_seconds")
                states = sorted({v["state"] for v in c.get("vdisks", [])})
            else:
                card = (request(Layout(data).card_ctl_sock, {"cmd": "stats"}) or {}).get("stats") or {}
                rpo = ((card.get("cgs") or {}).get("o") or {}).get("rpo_seconds")
                states = [host_vdisk(data, "w").get("state")]
            samples.append({"t": round(t, 2), "rpo_s": rpo, "states": states})
            if resumed_at is not None and back_at is None and rpo is not None and rpo < 1:
                back_at = t
            time.sleep(0.5)  # ok-sleep: sampling cadence
        if p.returncode:
            raise RuntimeError(f"fio failed: {p.stderr.read()[-1000:]}")
    rpos = [s["rpo_s"] for s in samples if s["rpo_s"] is not None]
    return {"rate_iops": rate, "outage_s": outage_s, "stopped_at_s": stopped_at, "resumed_at_s": resumed_at,
            "rpo_below_1s_after_s": None if back_at is None else round(back_at - resumed_at, 1),
            "rpo_max_s": max(rpos) if rpos else None, "states_seen": sorted({x for s in samples for x in s["states"] if x}),
            "samples": samples}


def f(x: Any, spec: str = ".1f") -> str:
    return "–" if x is None else format(x, spec)


def markdown(doc: dict) -> str:
    r, o = doc["resync"], doc["outage"]
    b, d = r["baseline"], r.get("during_resync") or {}
    ratio = lambda a, c: None if not a or not c else a / c  # noqa: E731
    lines = ["# Protection under faults (bench/protection.py)", "",
             f"{doc['when']}; fio 4 KiB randwrite QD16 paced at {r['rate_iops']} IOPS, default configuration.", "",
             "| measure | value |", "|---|---|",
             f"| resync: dirty data copied | {f(r['resync_mib'])} MiB in {f(r['resync_s'])} s |",
             f"| resync throughput | {f(r['resync_mib_s'])} MiB/s |",
             f"| production IOPS baseline / during resync | {f(b.get('iops'), ',.0f')} / {f(d.get('iops'), ',.0f')} "
             f"({f(ratio(d.get('iops'), b.get('iops')), '.2f')}x) |",
             f"| production p99 µs baseline / during resync | {f(b.get('p99_us'), ',.0f')} / {f(d.get('p99_us'), ',.0f')} "
             f"({f(ratio(d.get('p99_us'), b.get('p99_us')), '.2f')}x) |",
             f"| appliance stopped {o['outage_s']:g} s: states seen | {', '.join(o['states_seen'])} |",
             f"| appliance outage: RPO max | {f(o['rpo_max_s'])} s |",
             f"| RPO < 1 s again after the appliance resumed | {f(o['rpo_below_1s_after_s'])} s |"]
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4))
    o = doc["outage"]
    a2.plot([s["t"] for s in o["samples"]], [s["rpo_s"] if s["rpo_s"] is not None else float("nan") for s in o["samples"]])
    if o["stopped_at_s"] is not None:
        a2.axvspan(o["stopped_at_s"], o["resumed_at_s"] or o["stopped_at_s"], color="orange", alpha=0.3,
                   label="appliance stopped")
    a2.set_title("RPO during an appliance outage")
    a2.set_xlabel("seconds")
    a2.set_ylabel("RPO s")
    a2.legend()
    r = doc["resync"]
    states = ["protected", "lagging", "marking", "resyncing"]
    a1.plot([s["t"] for s in r["samples"]], [states.index(s["state"]) if s["state"] in states else -1
                                             for s in r["samples"]], drawstyle="steps-post")
    a1.set_yticks(range(len(states)), states)
    a1.axvline(r["kill_at_s"], color="red", label="card killed")
    a1.set_title("vdisk state: card killed, automatic resync")
    a1.set_xlabel("seconds")
    a1.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rate-iops", type=int, default=2000)
    ap.add_argument("--size", default="256M")
    ap.add_argument("--outage-seconds", type=float, default=20)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    a = ap.parse_args(argv)
    if a.quick:
        a.outage_seconds, a.size = 8, "64M"
    a.out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"when": time.strftime("%Y-%m-%d %H:%M:%S")}
    with tempfile.TemporaryDirectory(prefix="nicsplit-protection-") as tmp:
        work = Path(tmp)
        print("resync", flush=True)
        doc["resync"] = resync_run(work, rate=a.rate_iops, size=a.size, base_s=10 if not a.quick else 5, quick=a.quick)
        print("appliance outage", flush=True)
        doc["outage"] = outage_run(work, rate=a.rate_iops // 2, size=a.size, outage_s=a.outage_seconds)
    (a.out / "protection.json").write_text(json.dumps(doc, indent=1))
    md = markdown(doc)
    (a.out / "protection.md").write_text(md)
    plot(doc, a.out / "protection.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
