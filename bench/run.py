#!/usr/bin/env python3
"""``make bench``: nicsplit's write path against nbdkit's file plugin.

One run measures, on this machine and in the same run (ratios, not absolute
numbers, are the point — see docs/benchmarks.md and
/work/shared/design/PERFORMANCE.md):

* configurations: nbdkit file plugin (baseline), nicsplit with the default
  chain (``filters = ["stats"]``), nicsplit with no filters;
* load: fio's nbd engine, 4 KiB random writes at QD1 and QD16;
* per point: IOPS, p50/p99 completion latency, server CPU seconds per GiB;
* every export is pre-filled with one sequential pass first, and points are
  interleaved over several rounds (median reported; ratios paired per round)
  because the host is noisy; idle CPUs are held polling (as root) so QD1
  latency does not jump between vCPU wake-up regimes.

Writes bench/out/results.{md,json,png}. Exits 0 whether or not targets are
met; exits 2 only if a configuration could not be measured at all.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import MiB, CpuLatencyHold, FioError, cpuidle_info, NbdkitServer, NicsplitServer, Server, have_tools, git_state, loadavg, measure, pin_process, prefill  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "out"
BASELINE = "nbdkit"
PRIMARY = "nicsplit"  # the default chain; the acceptance lines are about it
NOFILTER = "nicsplit-nofilters"

TARGET_IOPS_QD16 = 0.85  # IOPS at QD16 >= 0.85x nbdkit
TARGET_P50_QD1 = 1.2  # p50 at QD1 <= 1.2x nbdkit


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", type=float, default=8.0, help="seconds of fio per point (default 8)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 s per point (overrides --runtime)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported (default 3)")
    ap.add_argument("--qd", default="1,16", help="comma-separated queue depths (default 1,16)")
    ap.add_argument("--size", default="256M", help="export size (default 256M)")
    ap.add_argument(
        "--configs",
        default=f"{BASELINE},{PRIMARY},{NOFILTER}",
        help=f"comma-separated subset of {BASELINE},{PRIMARY},{NOFILTER}",
    )
    ap.add_argument(
        "--pin",
        choices=("none", "split"),
        default="none",
        help="CPU placement: none = the scheduler decides; split = fio on CPU 0, each server on CPU 1",
    )
    ap.add_argument(
        "--idle-poll",
        choices=("auto", "on", "off"),
        default="auto",
        help="hold /dev/cpu_dma_latency at 0 during the run so idle CPUs poll instead of halting "
        "(auto: when writable, i.e. as root); see docs/benchmarks.md",
    )
    ap.add_argument("--no-sync", action="store_true", help="do not sync(2) dirty pages between points")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default bench/out)")
    ap.add_argument("--tmpdir", default=None, help="parent of the temporary work directory (default: system temp)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG")
    a = ap.parse_args(argv)
    if a.quick:
        a.runtime = 2.0
    a.qds = [int(q) for q in a.qd.split(",") if q.strip()]
    a.config_keys = [c.strip() for c in a.configs.split(",") if c.strip()]
    unknown = set(a.config_keys) - {BASELINE, PRIMARY, NOFILTER}
    if unknown:
        ap.error(f"unknown configuration(s): {', '.join(sorted(unknown))}")
    if a.rounds < 1:
        ap.error("--rounds must be >= 1")
    return a


def size_bytes(s: str) -> int:
    from nicsplit.control.config import parse_size

    n = parse_size(s, "size")
    if n % MiB:
        raise SystemExit(f"--size must be a whole number of MiB: {s}")
    return n


def make_servers(keys: list[str], work: Path, size: int) -> list[Server]:
    servers: list[Server] = []
    for k in keys:
        if k == BASELINE:
            servers.append(NbdkitServer(BASELINE, "nbdkit file (baseline)", work / "nbdkit", size))
        elif k == PRIMARY:
            servers.append(NicsplitServer(PRIMARY, "nicsplit (stats)", work / "nicsplit", size, ["stats"]))
        elif k == NOFILTER:
            servers.append(NicsplitServer(NOFILTER, "nicsplit, no filters", work / "nicsplit-nofilters", size, []))
    return servers


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    missing = have_tools("fio", "nbdkit")
    if missing:
        print(f"missing tools: {', '.join(missing)} (make system-deps installs them)", file=sys.stderr)
        return 2
    size = size_bytes(a.size)
    fio_size = f"{size // MiB}m"
    work = Path(tempfile.mkdtemp(prefix="nicsplit-bench-", dir=a.tmpdir))
    log(f"work dir {work}; {a.rounds} round(s) x QD {a.qds} x {len(a.config_keys)} config(s), {a.runtime:g} s each")
    servers = make_servers(a.config_keys, work, size)
    samples: dict[str, dict[int, list[dict[str, Any]]]] = {s.key: {qd: [] for qd in a.qds} for s in servers}
    errors: dict[str, str] = {}
    prefills: dict[str, Any] = {}
    started = dt.datetime.now(dt.timezone.utc)
    hold = CpuLatencyHold()
    idle_poll = False
    if a.idle_poll != "off":
        idle_poll = hold.open()
        if not idle_poll and a.idle_poll == "on":
            print(f"--idle-poll on: cannot write {hold.PATH} (needs root)", file=sys.stderr)
            return 2
    log(f"idle CPUs {'poll (cpu_dma_latency=0)' if idle_poll else 'halt (system default)'}")
    try:
        for s in servers:
            try:
                s.start()
                if a.pin == "split":
                    pin_process(s.pid, {1})
                log(f"{s.label}: serving {s.uri} (pid {s.pid}); pre-filling {a.size} sequentially")
                prefills[s.key] = prefill(s, work, fio_size)
                settle(a)
            except Exception as e:  # keep measuring the others; report this one
                tail = s.log_tail() if isinstance(s, NicsplitServer) else ""
                errors[s.key] = f"{type(e).__name__}: {e}".strip()[:4000]
                log(f"{s.label}: could not start/pre-fill: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
                if tail:
                    (work / f"{s.key}-host.log").write_text(tail)
                s.stop()
        live = [s for s in servers if s.key not in errors]
        for rnd in range(a.rounds):
            # Rotate the order each round so no configuration always runs
            # first (or right after the most CPU-hungry one).
            order = live[rnd % len(live) :] + live[: rnd % len(live)] if live else []
            for qd in a.qds:
                for s in order:
                    if s.key in errors:
                        continue
                    if not s.alive():
                        errors[s.key] = "server process died during the run"
                        continue
                    try:
                        r = measure(s, work, qd=qd, runtime=a.runtime, size=fio_size,
                                    client_cpus={0} if a.pin == "split" else None)
                    except (FioError, subprocess.TimeoutExpired, OSError) as e:
                        errors[s.key] = f"round {rnd + 1} QD{qd}: {e}"[:4000]
                        log(f"{s.label} QD{qd}: FAILED: {str(e).splitlines()[0]}")
                        continue
                    r["round"] = rnd + 1
                    r["sync_s"] = settle(a)
                    samples[s.key][qd].append(r)
                    log(
                        f"round {rnd + 1} {s.label:<24} QD{qd:<3} {r['iops']:>9.0f} IOPS  "
                        f"p50 {r['p50_us']:>7.1f} us  p99 {r['p99_us']:>8.1f} us  "
                        f"cpu {r['server_cpu_s_per_gib']:.1f} s/GiB  load {r['loadavg_before']:.2f}"
                    )
    finally:
        for s in servers:
            s.stop()
        hold.close()

    results = summarise(servers, samples, a.qds)
    meta = environment(a, work, started, prefills)
    meta["idle_poll"] = idle_poll
    meta["cpuidle"] = cpuidle_info()
    meta["sync_between_points"] = not a.no_sync
    doc = {"meta": meta, "configs": {s.key: {"label": s.label, "uri": s.uri, **s.info} for s in servers},
           "errors": errors, "results": results, "acceptance": acceptance(results),
           "samples": samples}
    a.out.mkdir(parents=True, exist_ok=True)
    md = render_markdown(doc, servers, a.qds)
    (a.out / "results.md").write_text(md)
    (a.out / "results.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    if not a.no_plot:
        try:
            plot(doc, servers, a.qds, a.out / "results.png")
        except Exception as e:  # matplotlib missing: still a useful run
            log(f"plot skipped: {e}")
    print()
    print(md)
    log(f"wrote {a.out / 'results.md'}, results.json{'' if a.no_plot else ', results.png'}")
    if a.keep:
        log(f"kept work dir {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 2 if errors else 0


def settle(a: argparse.Namespace) -> float | None:
    """Write back the page cache dirtied by the last point, so the kernel's
    flusher threads do not run during the next point (usually another
    configuration's): 8 s of 4 KiB random writes dirty most of the export,
    and dirty pages expire after 30 s."""
    if a.no_sync:
        return None
    t = time.monotonic()
    os.sync()
    return round(time.monotonic() - t, 3)


# -- summary ---------------------------------------------------------------------


def _median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarise(servers: list[Server], samples: dict, qds: list[int]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for s in servers:
        out[s.key] = {}
        for qd in qds:
            rs = samples[s.key][qd]
            if not rs:
                continue
            iops = [r["iops"] for r in rs]
            med = _median(iops)
            out[s.key][str(qd)] = {
                "n": len(rs),
                "iops": med,
                "iops_spread_pct": (max(iops) - min(iops)) / med * 100 if med else None,
                "p50_us": _median([r["p50_us"] for r in rs]),
                "p99_us": _median([r["p99_us"] for r in rs]),
                "p999_us": _median([r["p999_us"] for r in rs]),
                "server_cpu_s_per_gib": _median([r["server_cpu_s_per_gib"] for r in rs]),
            }
    # Ratios are paired: each sample is divided by the baseline's sample of
    # the same round and queue depth (taken seconds apart), then the median
    # of those per-round ratios is reported. The machine drifts between
    # rounds (other tenants of the hypervisor), and a ratio of medians would
    # mix samples from different regimes.
    for key, per_qd in out.items():
        for qd, m in per_qd.items():
            m["iops_vs_nbdkit"] = _paired(samples, key, BASELINE, int(qd), "iops")
            m["p50_vs_nbdkit"] = _paired(samples, key, BASELINE, int(qd), "p50_us")
            m["iops_vs_nofilters"] = _paired(samples, key, NOFILTER, int(qd), "iops")
    return out


def _paired(samples: dict, key: str, base: str, qd: int, metric: str) -> float | None:
    if base not in samples:
        return None
    by_round = {r["round"]: r[metric] for r in samples[base][qd]}
    ratios = [r[metric] / by_round[r["round"]] for r in samples[key][qd] if by_round.get(r["round"])]
    return _median(ratios)


def acceptance(results: dict) -> dict[str, Any]:
    acc: dict[str, Any] = {}
    for key in (PRIMARY, NOFILTER):
        r = results.get(key, {})
        iops_ratio = r.get("16", {}).get("iops_vs_nbdkit")
        p50_ratio = r.get("1", {}).get("p50_vs_nbdkit")
        acc[key] = {
            "iops_qd16_ratio": iops_ratio,
            "iops_qd16_pass": None if iops_ratio is None else iops_ratio >= TARGET_IOPS_QD16,
            "p50_qd1_ratio": p50_ratio,
            "p50_qd1_pass": None if p50_ratio is None else p50_ratio <= TARGET_P50_QD1,
        }
    return acc


def acceptance_lines(acc: dict, key: str) -> list[str]:
    a = acc.get(key, {})

    def verdict(ok: bool | None, ratio: float | None, target: float) -> str:
        if ok is None:
            return "n/a (not measured)"
        # Two decimals, or three when two would print the target itself.
        shown = f"{ratio:.2f}" if round(ratio, 2) != target else f"{ratio:.3f}"
        return f"{'PASS' if ok else 'FAIL'} ({shown})"

    return [
        f"IOPS at QD16 >= {TARGET_IOPS_QD16}x nbdkit: "
        f"{verdict(a.get('iops_qd16_pass'), a.get('iops_qd16_ratio'), TARGET_IOPS_QD16)}",
        f"p50 at QD1 <= {TARGET_P50_QD1}x nbdkit: {verdict(a.get('p50_qd1_pass'), a.get('p50_qd1_ratio'), TARGET_P50_QD1)}",
    ]


def environment(a: argparse.Namespace, work: Path, started: dt.datetime, prefills: dict) -> dict[str, Any]:
    fio_v = subprocess.run(["fio", "--version"], capture_output=True, text=True).stdout.strip()
    nbdkit_v = subprocess.run(["nbdkit", "--version"], capture_output=True, text=True).stdout.strip()
    return {
        "started_utc": started.isoformat(timespec="seconds"),
        "runtime_s": a.runtime,
        "rounds": a.rounds,
        "pin": a.pin,
        "queue_depths": a.qds,
        "size": a.size,
        "workload": "fio nbd engine, randwrite, bs=4k, time_based",
        "prefill": {"how": "fio --rw=write --bs=1m --iodepth=8 over the whole export, once per server", **prefills},
        "work_dir": str(work),
        "cpus": os.cpu_count(),
        "loadavg_end": loadavg(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "fio": fio_v,
        "nbdkit": nbdkit_v,
        "git": git_state(ROOT),
    }


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def render_markdown(doc: dict, servers: list[Server], qds: list[int]) -> str:
    m, res = doc["meta"], doc["results"]
    lines = [
        "# nicsplit write-path benchmark",
        "",
        f"{m['started_utc']} · git {m['git']} · {m['cpus']} CPUs · Python {m['python']} · {m['fio']} · {m['nbdkit']}",
        "",
        f"fio nbd engine, 4 KiB randwrite over a {m['size']} export, {m['runtime_s']:g} s per point, "
        f"{m['rounds']} interleaved round(s): medians, and ratios are medians of per-round paired ratios. Every export was pre-filled once with a "
        "sequential 1 MiB write pass (nbdkit's file too), so block allocation is not in the steady state. "
        f"Idle CPUs {'polled (cpu_dma_latency held at 0)' if m.get('idle_poll') else 'halted (system default)'}; "
        f"CPU placement: {'fio on CPU 0, servers on CPU 1' if m.get('pin') == 'split' else 'scheduler'}; "
        f"{'sync(2) between points' if m.get('sync_between_points') else 'no sync between points'}.",
        "",
        "| configuration | QD | IOPS | p50 µs | p99 µs | IOPS ×nbdkit | p50 ×nbdkit | host CPU s/GiB | IOPS spread |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for qd in qds:
        for s in servers:
            r = res.get(s.key, {}).get(str(qd))
            if not r:
                lines.append(f"| {s.label} | {qd} | not measured | | | | | | |")
                continue
            lines.append(
                f"| {s.label} | {qd} | {r['iops']:,.0f} | {r['p50_us']:.1f} | {r['p99_us']:.1f} | "
                f"{_fmt(r['iops_vs_nbdkit'], '.2f')} | {_fmt(r['p50_vs_nbdkit'], '.2f')} | "
                f"{_fmt(r['server_cpu_s_per_gib'], '.1f')} | ±{_fmt((r['iops_spread_pct'] or 0) / 2, '.0f')}% |"
            )
    lines += ["", f"## Acceptance ({next((s.label for s in servers if s.key == PRIMARY), 'nicsplit')}, default chain)", ""]
    lines += [f"- {l}" for l in acceptance_lines(doc["acceptance"], PRIMARY)]
    if any(s.key == NOFILTER for s in servers):
        lines += ["", "For reference, nicsplit with no filters:", ""]
        lines += [f"- {l}" for l in acceptance_lines(doc["acceptance"], NOFILTER)]
    if doc["errors"]:
        lines += ["", "## Not measured", ""]
        for k, e in doc["errors"].items():
            first = e.splitlines()[0] if e else "?"
            lines.append(f"- **{k}**: {first}")
    lines += [
        "",
        "Host CPU s/GiB is the server process's utime+stime (all threads, /proc/PID/stat) over the fio run, "
        "divided by GiB written. IOPS spread is half the max–min range across rounds, relative to the median. "
        f"Load average at the end: {m['loadavg_end']:.2f}.",
        "",
    ]
    return "\n".join(lines)


def plot(doc: dict, servers: list[Server], qds: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = doc["results"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / max(1, len(servers))
    colors = ["#7f7f7f", "#1f77b4", "#9ecae1", "#ff7f0e", "#2ca02c"]
    for i, s in enumerate(servers):
        xs = [j + (i - (len(servers) - 1) / 2) * width for j in range(len(qds))]
        iops = [res.get(s.key, {}).get(str(q), {}).get("iops") or 0 for q in qds]
        p50 = [res.get(s.key, {}).get(str(q), {}).get("p50_us") or 0 for q in qds]
        p99 = [res.get(s.key, {}).get(str(q), {}).get("p99_us") or 0 for q in qds]
        c = colors[i % len(colors)]
        bars = axes[0].bar(xs, iops, width, label=s.label, color=c)
        for b, v in zip(bars, iops):
            if v:
                axes[0].annotate(f"{v / 1000:.1f}k", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
        bars = axes[1].bar(xs, p50, width, label=s.label, color=c)
        axes[1].scatter(xs, p99, marker="_", s=200, color="k", zorder=3, label="p99" if i == 0 else None)
        for b, v in zip(bars, p50):
            if v:
                axes[1].annotate(f"{v:.0f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    for ax in axes:
        ax.set_xticks(range(len(qds)), [f"QD{q}" for q in qds])
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_title("4 KiB random write IOPS (higher is better)")
    axes[0].set_ylabel("IOPS")
    axes[0].legend(fontsize=8)
    axes[1].set_title("write latency p50 bars, p99 ticks (lower is better)")
    axes[1].set_ylabel("µs")
    axes[1].set_yscale("log")
    axes[1].legend(fontsize=8)
    m = doc["meta"]
    fig.suptitle(f"nicsplit vs nbdkit file · {m['runtime_s']:g} s × {m['rounds']} rounds (median) · git {m['git']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
