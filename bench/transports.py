#!/usr/bin/env python3
"""``make bench`` suite for issue 12 (Performance): the five ways of
protecting a write side by side, none / ring / nvme-pi / shadow / net, each
with a 0 ms and a ``--delay-ms`` (0.5) one-way emulated link to the
appliance, one table and one plot from the same run.

Set-up, fresh for every start of every transport (so each starts from the
same state: no journal left by the transport before it): a data directory
with vdisk ``a`` in CG ``cg1`` (protected) and vdisk ``n`` of the same size
in no CG (the split filter passes its IOs through: state ``unprotected``),
both pre-filled with one sequential pass. The link emulator
(``python -m nicsplit.testing.linkemu``, a process of its own so its CPU is
counted apart) sits between whoever ships (the card; the host with ``net``)
and the appliance (``[card] appliance`` and ``[splitter] appliance`` name
it). Per round, per transport (the order rotates round by round):
``nicsplit up --transport T`` (``none``: ``nicsplit up`` with the default
transport, writing to ``n``: the same deployment, nothing split), then per
link delay, once the CG is protected and caught up:

- QD1: fio 4 KiB randwrite, iodepth 1, client-side p50/p99 (``lat_ns``);
- QD16: the same unpaced, IOPS;
- per phase: the ``split`` histogram's p50/p99 over the phase (the host's
  cumulative histogram, before subtracted from after), and CPU µs per write
  from ``/proc/PID/stat`` of the host, the card (acker + worker; their
  empty-poll and doorbell-sleep time apart, as bench/keepup.py counts it),
  the appliance and the relay.

A transport this tree does not know (``nicsplit up --transport shadow``
refusing with "unknown transport") is reported as *not built*. Ratios
against ``none`` are paired per round (T's p50 / none's p50 of the same
round and link): median and spread. Targets (issue 12): ring and nvme-pi
≤ 1.10 at any link; shadow ≤ 1.3; net adds at least the link's round trip.

    .venv/bin/python bench/transports.py [--quick] [--rounds 3] [--transports none,ring,nvme-pi,shadow,net]
        [--delay-ms 0.5] [--qd1-seconds 8] [--qd16-seconds 12] [--out bench/out] [--acker-core dedicated]
        [--idle-poll auto|on|off]

``--idle-poll`` (default auto: on as root) holds /dev/cpu_dma_latency at 0
so idle CPUs poll instead of halting, as bench/run.py does: in the halting
regime a QD1 ratio favours whichever path keeps a CPU busier, and the
unprotected baseline pays the halt exits (docs/benchmarks.md).

``--acker-core dedicated`` runs every start with ``[card] acker_core =
"dedicated"`` (the acker polls a CPU of its own, as on a DPU; fio runs on
the other CPUs): the same comparison with the card on a core of its own.

Writes ``transports.json``, ``transports.md`` and ``transports.png`` into
``--out``. Nothing here asserts on speed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import FioError, add_idle_poll, cpu_seconds, idle_poll_hold, fio_cmd, free_port, git_state, loadavg, pyplot, run_fio  # noqa: E402
from keepup import card_cpu, card_stats, host_split, med, spread  # noqa: E402
from nicsplit.core.ctl import request  # noqa: E402
from nicsplit.testing.datadir import init_data  # noqa: E402
from nicsplit.testing.procs import ReadyProcess, UpProcess, run_cli, wait_for  # noqa: E402
from nicsplit.testing.recovered import cg_state  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NONE = "none"
DEFAULT_TRANSPORTS = "none,ring,nvme-pi,shadow,net"
CG, PROTECTED, UNPROTECTED = "cg1", "a", "n"
# Issue 12's targets: QD1 p50 / none's, at most (net: see `verdict`).
P50_TARGET = {"ring": 1.10, "nvme-pi": 1.10, "shadow": 1.3}


# -- pure helpers (tests/unit/test_bench_transports.py) ---------------------------------


def hist_delta_percentile(before: dict | None, after: dict | None, p: float) -> float | None:
    """The p-th percentile (µs, a bucket's upper bound) of the samples a
    ``split_hist`` (`Histogram.sparse`: ``buckets`` of ``[upper_ns, count]``)
    gained between two snapshots; None if it gained none."""
    old = {u: c for u, c in (before or {}).get("buckets", [])}
    gained = [(u, c - old.get(u, 0)) for u, c in sorted((after or {}).get("buckets", []))]
    gained = [(u, c) for u, c in gained if c > 0]
    total = sum(c for _, c in gained)
    if not total:
        return None
    want, seen = p / 100.0 * total, 0
    for u, c in gained:
        seen += c
        if seen >= want:
            return u / 1000
    return gained[-1][0] / 1000


def paired_ratios(values: list[float | None], base: list[float | None]) -> list[float]:
    """Round by round value / base, where both were measured."""
    return [v / b for v, b in zip(values, base) if v is not None and b]


def verdict(transport: str, ratio: float | None, added_us: float | None, rtt_us: float) -> str:
    """The issue's target for ``transport`` against this run's ``none``:
    a p50 ratio for ring / nvme-pi / shadow; for net, that it adds at least
    the link's round trip (the point of the card: the others do not)."""
    if transport == NONE:
        return "baseline"
    if transport == "net":
        if added_us is None:
            return "–"
        return "met (adds ≥ RTT)" if added_us >= rtt_us else "**adds < RTT**"
    limit = P50_TARGET.get(transport)
    if limit is None or ratio is None:
        return "–"
    return f"met (≤ {limit:.2f})" if ratio <= limit else f"**not met** (> {limit:.2f})"


def fmt(x: Any, spec: str = ".0f") -> str:
    return "–" if x is None else format(x, spec)


def fmt_spread(xs: list[Any], spec: str = ".0f") -> str:
    """``median (min..max)`` of the rounds, ``–`` when none was measured."""
    m, s = med(xs), spread(xs)
    if m is None:
        return "–"
    return fmt(m, spec) if s is None or len([x for x in xs if x is not None]) < 2 else \
        f"{fmt(m, spec)} ({fmt(s[0], spec)}..{fmt(s[1], spec)})"


# -- the run ------------------------------------------------------------------------------


class Link(ReadyProcess):
    """The link emulator as a process (its CPU is the relay's own cost)."""

    what = "linkemu"

    def __init__(self, work: Path, to: str) -> None:
        super().__init__(work, log_path=work / "linkemu.log")
        self.to, self.control = to, work / "link.sock"

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "nicsplit.testing.linkemu", "--listen", "127.0.0.1:0", "--to", self.to,
                "--seed", "1", "--control", str(self.control)]

    def set_delay(self, ms: float) -> None:
        r = request(self.control, {"cmd": "set", "delay_ms": ms}) or {}
        if not r.get("ok"):
            raise RuntimeError(f"link emulator refused delay {ms}: {r}")


def setup(work: Path, size: int, appliance: str, relay: str, acker_core: str = "shared") -> Path:
    data = init_data(work / "data", validate=False,
                     sections={"card": {"appliance": relay, "transport_options": {"data_size": "256M"},
                                        "acker_core": acker_core},
                               "splitter": {"appliance": relay}})
    run_cli(data, "cg", "create", CG)
    run_cli(data, "vdisk", "create", PROTECTED, "--size", str(size), "--cg", CG)
    run_cli(data, "vdisk", "create", UNPROTECTED, "--size", str(size))
    return data


def caught_up(data: Path) -> bool:
    """cg1 protected with nothing acknowledged that the appliance does not hold yet (RPO 0)."""
    c = cg_state(data, CG)
    return c["state"] == "protected" and not c.get("rpo_bytes") and (c.get("rpo_seconds") or 0.0) < 0.1


def prefill(data: Path, appliance: str, work: Path, size: int) -> None:
    """One sequential 1 MiB pass over both vdisks (block allocation is not
    what is measured), the CG then caught up."""
    with UpProcess(data, "--appliance-listen", appliance) as up:
        wait_for(lambda: cg_state(data, CG)["state"] == "protected", 120, "cg1 protected", interval=0.2)
        for v in (PROTECTED, UNPROTECTED):
            out = work / f"prefill-{v}.json"
            run_fio(fio_cmd(up.uri(v), rw="write", bs="1m", size=f"{size >> 20}m", iodepth=8, out=out,
                            runtime=None), out, 600)
        wait_for(lambda: caught_up(data), 300, "the pre-fill journaled", interval=0.5)


def pids_of(up: UpProcess, data: Path, link: Link) -> tuple[dict[str, int], bool]:
    procs = {k: (v or {}).get("pid") for k, v in (up.ready.get("processes") or {}).items()}
    pids = {"host": procs["host"], "appliance": procs["appliance"], "relay": link.pid}
    card = procs.get("card")
    if card:
        pids["acker"] = card
        worker = card_stats(data).get("worker_pid")
        if worker and worker != card:  # the ring's fast path: acker and worker are two processes
            pids["worker"] = worker
    return pids, bool(card)


def client_cpus(acker_core: str) -> set[int] | None:
    """Where fio runs: anywhere, but with a dedicated acker core on the host's
    CPUs (every allowed one but the acker's, the last), as a VM runs on its
    host's cores and not on the card's."""
    allowed = sorted(os.sched_getaffinity(0))
    return set(allowed[:-1]) if acker_core == "dedicated" and len(allowed) > 1 else None


def phase(data: Path, up: UpProcess, link: Link, vdisk: str, *, qd: int, seconds: float, work: Path,
          tag: str, size: int, cpus: set[int] | None = None) -> dict[str, Any]:
    """One fio run with the CPU of every process and the split histogram around it."""
    t_wait = time.monotonic()
    try:
        wait_for(lambda: caught_up(data), 60, "cg1 protected and caught up", interval=0.2)
        settled = True
    except TimeoutError:  # reported with the phase, not fatal to the run
        c = cg_state(data, CG)
        settled = {k: c.get(k) for k in ("state", "rpo_bytes", "rpo_seconds", "last_durable_seq", "host_last_seq")}
        print(f"  not caught up after 60 s: {settled}", flush=True)
    settle_s = time.monotonic() - t_wait
    pids, card = pids_of(up, data, link)
    st0 = card_stats(data) if card else {}
    h0 = host_split(data, [vdisk])[vdisk]
    c0 = {k: cpu_seconds(p) for k, p in pids.items()}
    out = work / f"fio-{tag}.json"
    cmd = fio_cmd(up.uri(vdisk), rw="randwrite", bs="4k", size=f"{size >> 20}m", iodepth=qd, out=out, runtime=seconds)
    t0 = time.monotonic()
    job = run_fio(cmd + ["--randseed=4242"], out, timeout=seconds + 120, cpus=cpus)
    wall = time.monotonic() - t0
    d = {k: cpu_seconds(p) - c0[k] for k, p in pids.items()}
    h1 = host_split(data, [vdisk])[vdisk]
    w = job["write"]
    writes = max(1, w["total_ios"])
    pct = w["lat_ns"].get("percentile", {})
    us = lambda s: 1e6 * s / writes  # noqa: E731
    cpu = {"host": us(d["host"]), "appliance": us(d["appliance"]), "relay": us(d["relay"])}
    if card:
        cc = card_cpu(st0, card_stats(data), {"acker": d["acker"], "worker": d.get("worker", 0.0)}, writes)
        cpu.update(card=cc["acker"] + cc["worker"], card_work=cc["card_work"], card_idle=cc["card_idle"])
    state = cg_state(data, CG)
    return {
        "qd": qd, "settled_before": settled, "settle_s": round(settle_s, 1), "writes": w["total_ios"], "iops": w["iops"], "wall_s": round(wall, 2),
        "p50_us": pct.get("50.000000", 0) / 1000, "p99_us": pct.get("99.000000", 0) / 1000,
        "split_p50_us": hist_delta_percentile(h0.get("split_hist"), h1.get("split_hist"), 50),
        "split_p99_us": hist_delta_percentile(h0.get("split_hist"), h1.get("split_hist"), 99),
        "marked": (h1.get("marked") or 0) - (h0.get("marked") or 0),
        "late": (h1.get("late") or 0) - (h0.get("late") or 0),
        "vdisk_state": h1.get("state"), "cg_state": state["state"], "cpu_us_per_write": cpu,
        "loadavg": loadavg(),
    }


def transport_round(data: Path, appliance: str, link: Link, transport: str, delays: list[float], *,
                    qd1_s: float, qd16_s: float, work: Path, r: int, size: int,
                    cpus: set[int] | None = None) -> dict[str, Any]:
    """Every (link, QD) phase of one transport in one `nicsplit up`; {"not_built": reason} when
    this tree does not know it."""
    args = ["--appliance-listen", appliance] + ([] if transport == NONE else ["--transport", transport])
    vdisk = UNPROTECTED if transport == NONE else PROTECTED
    up = UpProcess(data, *args)
    t0 = time.monotonic()
    try:
        up.start(timeout=120)
    except RuntimeError as e:
        if "unknown transport" in str(e):
            line = next((x for x in str(e).splitlines() if "unknown transport" in x), "unknown transport")
            return {"not_built": line.strip()[-200:]}
        raise
    res: dict[str, Any] = {}
    try:
        wait_for(lambda: cg_state(data, CG)["state"] == "protected", 180, "cg1 protected", interval=0.2)
        up_s = time.monotonic() - t0
        print(f"  {transport}: up and protected in {up_s:.1f} s", flush=True)
        out = work / "warm.json"  # connections made, the link attached, caches warm: not measured
        run_fio(fio_cmd(up.uri(vdisk), rw="randwrite", bs="4k", size=f"{size >> 20}m", iodepth=1, out=out, runtime=1),
                out, 120)
        for delay in delays:
            link.set_delay(delay)
            for qd, secs in ((1, qd1_s), (16, qd16_s)):
                ph = phase(data, up, link, vdisk, qd=qd, seconds=secs, work=work, tag=f"{transport}-{delay}-{qd}-{r}",
                           size=size, cpus=cpus)
                ph["up_s"] = round(up_s, 1)
                res[f"{delay}/qd{qd}"] = ph
                print(f"  round {r} {transport:<8} link {delay} ms QD{qd}: p50 {ph['p50_us']:.0f} us p99 "
                      f"{ph['p99_us']:.0f} us {ph['iops']:,.0f} IOPS split p50/p99 {fmt(ph['split_p50_us'], '.1f')}/"
                      f"{fmt(ph['split_p99_us'], '.1f')} us host {ph['cpu_us_per_write']['host']:.1f} us/w, "
                      f"{ph['cg_state']}, load {ph['loadavg']:.1f}, settled in {ph['settle_s']} s", flush=True)
        link.set_delay(0.0)
    finally:
        t1 = time.monotonic()
        up.stop()
        print(f"  {transport}: stopped in {time.monotonic() - t1:.1f} s", flush=True)
    return res


def run(a: argparse.Namespace) -> dict[str, Any]:
    transports = [t for t in a.transports.split(",") if t]
    delays = [0.0, a.delay_ms]
    doc: dict[str, Any] = {"when": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "commit": git_state(ROOT),
                           "machine": f"{os.cpu_count()} CPUs", "loadavg_start": loadavg(), "rounds": a.rounds,
                           "delays_ms": delays, "transports": transports, "qd1_s": a.qd1_seconds,
                           "qd16_s": a.qd16_seconds, "size": a.size, "results": {}, "not_built": {},
                           "acker_core": a.acker_core}
    size = a.size << 20
    with tempfile.TemporaryDirectory(prefix="nicsplit-transports-") as tmp:
        work = Path(tmp)
        appliance = f"127.0.0.1:{free_port()}"
        link = Link(work, appliance).start()
        try:
            relay = link.ready["address"]
            for r in range(a.rounds):
                order = transports[r % len(transports):] + transports[:r % len(transports)]
                print(f"round {r + 1}/{a.rounds}: {', '.join(order)}", flush=True)
                for t in order:
                    if t in doc["not_built"]:
                        continue
                    # A fresh, pre-filled data directory per start: every transport starts from the same
                    # state (the appliance's start time grows with its journal; see docs/benchmarks.md).
                    shutil.rmtree(work / "data", ignore_errors=True)
                    data = setup(work, size, appliance, relay, a.acker_core)
                    prefill(data, appliance, work, size)
                    got = transport_round(data, appliance, link, t, delays, qd1_s=a.qd1_seconds,
                                          qd16_s=a.qd16_seconds, work=work, r=r, size=size,
                                          cpus=client_cpus(a.acker_core))
                    if "not_built" in got:
                        doc["not_built"][t] = got["not_built"]
                        print(f"  {t}: not built in this tree ({got['not_built']})", flush=True)
                        continue
                    for k, v in got.items():
                        doc["results"].setdefault(f"{t}@{k}", []).append(v)
        finally:
            link.stop()
    doc["loadavg_end"] = loadavg()
    return doc


# -- report -------------------------------------------------------------------------------


def col(doc: dict, t: str, delay: float, qd: int, key: str) -> list[Any]:
    """One figure of (transport, link, QD), round by round (None where absent)."""
    out = []
    for ph in doc["results"].get(f"{t}@{delay}/qd{qd}", []):
        x: Any = ph
        for k in key.split("."):
            x = (x or {}).get(k) if isinstance(x, dict) else None
        out.append(x)
    return out


def rows(doc: dict) -> list[dict[str, Any]]:
    """One row per (transport, link): medians, spreads, the paired ratio and the verdict."""
    out = []
    for t in doc["transports"]:
        for delay in doc["delays_ms"]:
            if t in doc["not_built"]:
                out.append({"transport": t, "delay": delay, "not_built": True})
                continue
            p50 = col(doc, t, delay, 1, "p50_us")
            base = col(doc, NONE, delay, 1, "p50_us")
            ratios = paired_ratios(p50, base) if t != NONE and base else []
            added = [v - b for v, b in zip(p50, base) if v is not None and b is not None] if base else []
            zero = col(doc, t, doc["delays_ms"][0], 1, "p50_us")
            link_cost = [v - z for v, z in zip(p50, zero) if v is not None and z is not None]
            out.append({
                "transport": t, "delay": delay, "p50": p50, "p99": col(doc, t, delay, 1, "p99_us"),
                "ratio": ratios, "added": added, "link_cost": link_cost, "iops": col(doc, t, delay, 16, "iops"),
                "split1": (col(doc, t, delay, 1, "split_p50_us"), col(doc, t, delay, 1, "split_p99_us")),
                "split16_p99": col(doc, t, delay, 16, "split_p99_us"),
                "cpu": {k: col(doc, t, delay, 16, f"cpu_us_per_write.{k}")
                        for k in ("host", "card", "card_work", "card_idle", "appliance", "relay")},
                "marked": sum(x or 0 for q in (1, 16) for x in col(doc, t, delay, q, "marked")),
                "late": sum(x or 0 for q in (1, 16) for x in col(doc, t, delay, q, "late")),
                "states": sorted({x for q in (1, 16) for x in col(doc, t, delay, q, "cg_state") if x}),
                "verdict": verdict(t, med(ratios), med(added), 2000 * delay),
            })
    return out


def markdown(doc: dict) -> str:
    lines = ["# Five transports side by side (bench/transports.py, issue 12)", "",
             f"{doc['when']}, commit {doc['commit']}, {doc['machine']}, load average {doc['loadavg_start']:.2f} at "
             f"start, {doc.get('loadavg_end', 0):.2f} at the end; median of {doc['rounds']} rounds (min..max). "
             "+link = QD1 p50 at this link − at the 0 ms link, same transport, paired per round (a round trip "
             f"is {2 * doc['delays_ms'][-1]:g} ms). "
             f"fio 4 KiB randwrite: QD1 {doc['qd1_s']:g} s, QD16 unpaced {doc['qd16_s']:g} s, {doc['size']} MiB "
             "vdisks. *none* = a vdisk in no CG under the same `nicsplit up` (default transport; its IOs pass "
             "the split filter untouched). Ratio = QD1 p50 / none's, paired per round. CPU µs per write at QD16 "
             "from /proc/PID/stat; card = acker + worker, its idle (empty polls, doorbell sleeps) also apart. "
             "late = writes whose ack came after split_timeout_us (they went on unconfirmed; all rounds, QD1 + QD16). "
             + ("**`[card] acker_core = \"dedicated\"`**: the acker polls its own CPU and never sleeps, everything "
                "else (fio too) on the other CPUs, as on a DPU (docs/operations.md)."
                if doc.get("acker_core") == "dedicated" else "`[card] acker_core = \"shared\"` (the default).")
             + (" Idle CPUs polled (cpu_dma_latency held at 0)." if doc.get("idle_poll") else
                " **Idle CPUs halted** (the system default): a QD1 ratio then favours whichever path keeps a CPU "
                "busier (docs/benchmarks.md)."),
             "",
             "| transport | link one-way | QD1 p50 µs | +link µs | QD1 p99 µs | p50 × none | verdict | QD16 IOPS | "
             "split p50 / p99 µs (QD1) | split p99 µs (QD16) | host µs/w | card µs/w (of it idle) | "
             "appliance µs/w | relay µs/w | states |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows(doc):
        head = f"| {r['transport']} | {r['delay']:g} ms |"
        if r.get("not_built"):
            lines.append(head + " not built | | | | not built | | | | | | | | |")
            continue
        c = r["cpu"]
        card = "–" if med(c["card"]) is None else f"{fmt_spread(c['card'], '.1f')} ({fmt(med(c['card_idle']), '.1f')})"
        marked = (f", {r['marked']} marked" if r["marked"] else "") + (f", {r['late']} late" if r["late"] else "")
        lines.append(
            f"{head} {fmt_spread(r['p50'])} | {fmt_spread(r['link_cost']) if r['delay'] else '–'} | {fmt_spread(r['p99'])} | {fmt_spread(r['ratio'], '.2f')} | "
            f"{r['verdict']} | {fmt_spread(r['iops'], ',.0f')} | {fmt(med(r['split1'][0]), '.1f')} / "
            f"{fmt(med(r['split1'][1]), '.1f')} | {fmt(med(r['split16_p99']), '.0f')} | {fmt_spread(c['host'], '.1f')} | "
            f"{card} | {fmt(med(c['appliance']), '.1f')} | {fmt(med(c['relay']), '.1f')} | "
            f"{', '.join(r['states'])}{marked} |")
    for t, why in doc["not_built"].items():
        lines.append(f"\n*{t}*: not built in this tree (`nicsplit up --transport {t}`: {why}).")
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    rs = [r for r in rows(doc) if not r.get("not_built")]
    ts = [t for t in doc["transports"] if t not in doc["not_built"]]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    width = 0.8 / max(1, len(doc["delays_ms"]))
    for j, delay in enumerate(doc["delays_ms"]):
        sel = {r["transport"]: r for r in rs if r["delay"] == delay}
        xs = [i + j * width for i in range(len(ts))]
        for ax, key in ((axes[0], "p50"), (axes[1], "iops")):
            vals = [med(sel[t][key]) or 0 for t in ts]
            lo = [v - ((spread(sel[t][key]) or (v, v))[0]) for v, t in zip(vals, ts)]
            hi = [((spread(sel[t][key]) or (v, v))[1]) - v for v, t in zip(vals, ts)]
            ax.bar(xs, vals, width, yerr=[lo, hi], capsize=3, label=f"link {delay:g} ms one-way")
        bottom = [0.0] * len(ts)
        for k, colour in (("host", None), ("card_work", None), ("card_idle", None), ("appliance", None), ("relay", None)):
            vals = [med(sel[t]["cpu"][k]) or 0 for t in ts]
            axes[2].bar(xs, vals, width, bottom=bottom, label=f"{k} ({delay:g} ms)", color=colour,
                        alpha=1.0 if j == 0 else 0.55)
            bottom = [b + v for b, v in zip(bottom, vals)]
    for ax, title in ((axes[0], "QD1 p50 µs (client, fio; log scale)"), (axes[1], "QD16 IOPS (unpaced)"),
                      (axes[2], "CPU µs per write at QD16")):
        ax.set_xticks([i + width * (len(doc["delays_ms"]) - 1) / 2 for i in range(len(ts))], ts)
        ax.set_title(title)
    axes[0].set_yscale("log")  # net's milliseconds next to the others' ~100 µs
    axes[0].legend()
    axes[1].legend()
    axes[2].legend(fontsize=6, ncol=2)
    fig.suptitle(f"transports, {doc['when']}, {doc['commit']}, load {doc['loadavg_start']:.1f}; "
                 f"not built: {', '.join(doc['not_built']) or 'none'}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transports", default=DEFAULT_TRANSPORTS, help=f"comma-separated (default {DEFAULT_TRANSPORTS})")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round, 3 s QD1, 4 s QD16")
    ap.add_argument("--delay-ms", type=float, default=0.5, help="the second link's one-way delay (the first is 0)")
    ap.add_argument("--qd1-seconds", type=float, default=8)
    ap.add_argument("--qd16-seconds", type=float, default=12)
    ap.add_argument("--size", type=int, default=256, help="vdisk size, MiB")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    ap.add_argument("--report", type=Path, metavar="JSON", help="no run: the table and plot again from a saved transports.json")
    ap.add_argument("--acker-core", choices=("shared", "dedicated"), default="shared",
                    help="[card] acker_core for every start (dedicated: fio off the acker's CPU too)")
    add_idle_poll(ap)
    a = ap.parse_args(argv)
    if a.quick:
        a.rounds, a.qd1_seconds, a.qd16_seconds = 1, 3, 4
    a.out.mkdir(parents=True, exist_ok=True)
    if a.report:
        doc = json.loads(a.report.read_text())
    else:
        try:
            with idle_poll_hold(a.idle_poll) as hold:
                doc = run(a)
                doc["idle_poll"] = hold.held
        except FioError as e:
            print(f"fio failed: {e}", file=sys.stderr)
            return 2
    (a.out / "transports.json").write_text(json.dumps(doc, indent=1))
    md = markdown(doc)
    (a.out / "transports.md").write_text(md)
    plot(doc, a.out / "transports.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
