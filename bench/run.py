#!/usr/bin/env python3
"""``make bench``: nicsplit's write path against nbdkit's file plugin, and
the splitter (issue 3) against the same host without it.

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

* ``--suite split`` (in ``all``, the default): the whole system started by
  ``nicsplit up`` (appliance + card + host) with the chain
  ``["stats", "split"]`` on vdisks of one consistency group, against the
  host with ``["stats"]`` ("no protection") and nbdkit; plus the splitter's
  own latency histogram, the card process's CPU, marking, replication lag
  under ``--lag-seconds`` of QD16, and bytes on the wire for a partly
  compressible, partly duplicate workload (see bench/split.py).

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

from harness import GiB, MiB, add_idle_poll, cpu_seconds, idle_poll_hold, FioError, cpuidle_info, NbdkitServer, NicsplitServer, Server, have_tools, git_state, loadavg, measure, pin_process, prefill  # noqa: E402
from split import LAG_VDISK, SplitSystem, lag_run, wire_run  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "out"
BASELINE = "nbdkit"
PRIMARY = "nicsplit"  # the default chain; the acceptance lines are about it
NOFILTER = "nicsplit-nofilters"
SPLIT = "nicsplit-split"  # nicsplit up: appliance + card + host, chain ["stats", "split"]
SUITES = {"host": [BASELINE, PRIMARY, NOFILTER], "split": [BASELINE, PRIMARY, SPLIT],
          "all": [BASELINE, PRIMARY, NOFILTER, SPLIT]}

TARGET_IOPS_QD16 = 0.85  # IOPS at QD16 >= 0.85x nbdkit
TARGET_P50_QD1 = 1.2  # p50 at QD1 <= 1.2x nbdkit
# Issue 3: the splitter against the same host without it ("no protection").
SPLIT_P50_QD1 = 1.10  # p50 at QD1 <= 1.10x
SPLIT_IOPS_QD16 = 0.90  # IOPS at QD16 >= 0.90x
SPLIT_CPU_PER_WRITE = 1.15  # host-process CPU per write <= 1.15x (QD16)
SPLIT_LAT_P50_US = 5.0  # the splitter's own added latency
SPLIT_LAT_P99_US = 50.0
LAG_MAX_S = 1.0  # replication lag under QD16 load


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", type=float, default=8.0, help="seconds of fio per point (default 8)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 s per point (overrides --runtime)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported (default 3)")
    ap.add_argument("--qd", default="1,16", help="comma-separated queue depths (default 1,16)")
    ap.add_argument("--size", default="256M", help="export size (default 256M)")
    ap.add_argument("--suite", choices=tuple(SUITES), default="all",
                    help="host: nbdkit vs nicsplit (issue 2); split: the splitter vs no protection (issue 3); all (default)")
    ap.add_argument(
        "--configs",
        default=None,
        help=f"comma-separated subset of {BASELINE},{PRIMARY},{NOFILTER},{SPLIT} (default: those of --suite)",
    )
    ap.add_argument("--split-timeout-us", type=float, default=None,
                    help="split_timeout_us of the split configuration (default: the filter's, 1000); for diagnosis")
    ap.add_argument("--lag-seconds", type=float, default=None,
                    help="seconds of the QD16 replication-lag run of the split suite (default 60; --quick 10; 0 skips)")
    ap.add_argument("--wire-seconds", type=float, default=None,
                    help="seconds of the compressible/duplicate wire-bytes run of the split suite (default 10; --quick 4; 0 skips)")
    ap.add_argument(
        "--pin",
        choices=("none", "split"),
        default="none",
        help="CPU placement: none = the scheduler decides; split = fio on CPU 0, each server on CPU 1",
    )
    add_idle_poll(ap)
    ap.add_argument("--no-sync", action="store_true", help="do not sync(2) dirty pages between points")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default bench/out)")
    ap.add_argument("--tmpdir", default=None, help="parent of the temporary work directory (default: system temp)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG")
    a = ap.parse_args(argv)
    if a.quick:
        a.runtime = 2.0
    if a.lag_seconds is None:
        a.lag_seconds = 10.0 if a.quick else 60.0
    if a.wire_seconds is None:
        a.wire_seconds = 4.0 if a.quick else 10.0
    a.qds = [int(q) for q in a.qd.split(",") if q.strip()]
    a.config_keys = [c.strip() for c in a.configs.split(",") if c.strip()] if a.configs else list(SUITES[a.suite])
    unknown = set(a.config_keys) - {BASELINE, PRIMARY, NOFILTER, SPLIT}
    if unknown:
        ap.error(f"unknown configuration(s): {', '.join(sorted(unknown))}")
    if a.rounds < 1:
        ap.error("--rounds must be >= 1")
    return a


def size_bytes(s: str) -> int:
    from nicsplit.core.config import parse_size

    n = parse_size(s, "size")
    if n % MiB:
        raise SystemExit(f"--size must be a whole number of MiB: {s}")
    return n


def make_servers(keys: list[str], work: Path, size: int, n_points: int = 0,
                 split_timeout_us: float | None = None) -> list[Server]:
    servers: list[Server] = []
    for k in keys:
        if k == BASELINE:
            servers.append(NbdkitServer(BASELINE, "nbdkit file (baseline)", work / "nbdkit", size))
        elif k == PRIMARY:
            servers.append(NicsplitServer(PRIMARY, "nicsplit (stats)", work / "nicsplit", size, ["stats"]))
        elif k == NOFILTER:
            servers.append(NicsplitServer(NOFILTER, "nicsplit, no filters", work / "nicsplit-nofilters", size, []))
        elif k == SPLIT:
            label = "nicsplit up (stats, split)" if split_timeout_us is None else f"nicsplit up (stats, split {split_timeout_us:g} us)"
            servers.append(SplitSystem(SPLIT, label, work / "nicsplit-split", size, n_points, split_timeout_us))
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
    servers = make_servers(a.config_keys, work, size, a.rounds * len(a.qds), a.split_timeout_us)
    samples: dict[str, dict[int, list[dict[str, Any]]]] = {s.key: {qd: [] for qd in a.qds} for s in servers}
    errors: dict[str, str] = {}
    extra: dict[str, Any] = {}
    prefills: dict[str, Any] = {}
    started = dt.datetime.now(dt.timezone.utc)
    hold = idle_poll_hold(a.idle_poll)
    idle_poll = hold.held
    log(f"idle CPUs {'poll (cpu_dma_latency=0)' if idle_poll else 'halt (system default)'}")
    try:
        for s in servers:
            try:
                if isinstance(s, SplitSystem):
                    log(f"{s.label}: pre-filling {len(s.points) + 2} vdisks of {a.size} through a host without "
                        "the splitter, then starting nicsplit up")
                    s.start(fio_size)
                    prefills[s.key] = s.prefill_info
                    log(f"{s.label}: serving {s.uri} (host pid {s.pid}, card pid {s.card_pid}, "
                        f"appliance pid {s.appliance_pid})")
                    settle(a)
                    continue
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
                        if isinstance(s, SplitSystem):
                            r = measure_split(s, work, qd=qd, runtime=a.runtime, size=fio_size,
                                              client_cpus={0} if a.pin == "split" else None)
                        else:
                            r = measure(s, work, qd=qd, runtime=a.runtime, size=fio_size,
                                        client_cpus={0} if a.pin == "split" else None)
                        r["server_cpu_us_per_write"] = (r["server_cpu_s"] / (r["io_bytes"] / 4096) * 1e6
                                                        if r["io_bytes"] else None)
                    except (FioError, subprocess.TimeoutExpired, OSError, RuntimeError) as e:
                        errors[s.key] = f"round {rnd + 1} QD{qd}: {e}"[:4000]
                        log(f"{s.label} QD{qd}: FAILED: {str(e).splitlines()[0]}")
                        continue
                    r["round"] = rnd + 1
                    r["sync_s"] = settle(a)
                    samples[s.key][qd].append(r)
                    log(
                        f"round {rnd + 1} {s.label:<26} QD{qd:<3} {r['iops']:>9.0f} IOPS  "
                        f"p50 {r['p50_us']:>7.1f} us  p99 {r['p99_us']:>8.1f} us  "
                        f"cpu {r['server_cpu_s_per_gib']:.1f} s/GiB  load {r['loadavg_before']:.2f}"
                        + (f"  card {r['card_cpu_s_per_gib']:.1f} s/GiB  split {r['split'].get('split')} "
                           f"marked {r['split'].get('marked')} ({r['split'].get('state')})" if "split" in r else "")
                    )
        sysm = next((s for s in live if isinstance(s, SplitSystem) and s.key not in errors), None)
        if sysm is not None and a.lag_seconds > 0:
            log(f"{sysm.label}: replication lag, QD16 for {a.lag_seconds:g} s, card stats every 0.5 s")
            try:
                extra["lag"] = lag_run(sysm, work, seconds=a.lag_seconds, size=fio_size,
                                       client_cpus={0} if a.pin == "split" else None)
                L = extra["lag"]
                log(f"lag: {L['iops']:.0f} IOPS, rpo max {_fmt(L['rpo_max_s'], '.3f')} s p99 {_fmt(L['rpo_p99_s'], '.3f')} s, "
                    f"end state {L['state_end']} (split {L['split']}, marked {L['marked']}), drained {L['drain']}")
            except Exception as e:
                errors["split-lag"] = f"{type(e).__name__}: {e}"[:4000]
                log(f"lag run FAILED: {e}")
            settle(a)
        if sysm is not None and a.wire_seconds > 0:
            log(f"{sysm.label}: wire bytes, compressible/duplicate QD16 for {a.wire_seconds:g} s")
            try:
                extra["wire"] = wire_run(sysm, work, seconds=a.wire_seconds, size=fio_size,
                                         client_cpus={0} if a.pin == "split" else None)
                W = extra["wire"]
                log(f"wire: written {W['bytes_written']} captured {W['bytes_captured_by_card']} wire out {W['wire_bytes_out']} "
                    f"({_fmt(W['wire_per_written'], '.3f')} per written byte), split {W['split']} marked {W['marked']}")
            except Exception as e:
                errors["split-wire"] = f"{type(e).__name__}: {e}"[:4000]
                log(f"wire run FAILED: {e}")
        if sysm is not None:
            extra["status_end"] = sysm.status()
            extra["card_end"] = sysm.card_stats()
    finally:
        for s in servers:
            s.stop()
        hold.close()

    results = summarise(servers, samples, a.qds)
    split_res = summarise_split(samples, a.qds, extra) if any(s.key == SPLIT for s in servers) else None
    meta = environment(a, work, started, prefills)
    meta["idle_poll"] = idle_poll
    meta["cpuidle"] = cpuidle_info()
    meta["sync_between_points"] = not a.no_sync
    doc = {"meta": meta, "configs": {s.key: {"label": s.label, "uri": s.uri, **s.info} for s in servers},
           "errors": errors, "results": results, "acceptance": acceptance(results),
           "split": split_res, "samples": samples}
    meta["suite"] = a.suite
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


def measure_split(s: SplitSystem, work: Path, **kw: Any) -> dict[str, Any]:
    """One point of the split configuration: a fresh protected vdisk, the
    host's CPU (as for every configuration) plus the card process's CPU, and
    the vdisk's splitter statistics afterwards."""
    s.refresh_pids()
    link0 = s.wait_attached()
    vd = s.begin_point()
    before = s.split_stats(vd)
    c0 = cpu_seconds(s.card_pid)
    r = measure(s, work, **kw)
    c1 = cpu_seconds(s.card_pid)
    gib = r["io_bytes"] / GiB
    r["vdisk"] = vd
    r["card_pid"] = s.card_pid
    r["card_cpu_s"] = round(c1 - c0, 3)
    r["card_cpu_s_per_gib"] = (c1 - c0) / gib if gib else None
    r["split_before"] = before
    r["split"] = s.split_stats(vd)
    link1 = s.card_link()
    r["card_link_before"] = link0
    r["card_link_losses"] = (link1.get("losses") or 0) - (link0.get("losses") or 0)
    r["card_link_last_error"] = link1.get("last_error")
    return r


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


def summarise_split(samples: dict, qds: list[int], extra: dict[str, Any]) -> dict[str, Any]:
    """The issue-3 view: the split configuration against "no protection"
    (the host with chain ["stats"]), paired per round like the rest."""
    per_qd: dict[str, Any] = {}
    for qd in qds:
        rs = samples.get(SPLIT, {}).get(qd, [])
        if not rs:
            continue
        sp = [r.get("split") or {} for r in rs]
        marked_points = [r for r in rs if (r.get("split") or {}).get("state") == "marking"]
        per_qd[str(qd)] = {
            "n": len(rs),
            "p50_vs_noprot": _paired(samples, SPLIT, PRIMARY, qd, "p50_us"),
            "iops_vs_noprot": _paired(samples, SPLIT, PRIMARY, qd, "iops"),
            "cpu_per_write_vs_noprot": _paired(samples, SPLIT, PRIMARY, qd, "server_cpu_us_per_write"),
            "host_cpu_us_per_write": _median([r.get("server_cpu_us_per_write") for r in rs]),
            "noprot_cpu_us_per_write": _median([r.get("server_cpu_us_per_write") for r in samples.get(PRIMARY, {}).get(qd, [])]),
            "card_cpu_s_per_gib": _median([r.get("card_cpu_s_per_gib") for r in rs]),
            "split_p50_us": _median([x.get("split_p50_us") for x in sp if x.get("split")]),
            "split_p99_us": _median([x.get("split_p99_us") for x in sp if x.get("split")]),
            "split_p999_us": _median([x.get("split_p999_us") for x in sp if x.get("split")]),
            "split_writes": sum(x.get("split") or 0 for x in sp),
            "marked_writes": sum(x.get("marked") or 0 for x in sp),
            "points_marking": len(marked_points),
            "card_link_losses": sum(r.get("card_link_losses") or 0 for r in rs),
            "split_before_marking": [(r.get("split") or {}).get("split") for r in marked_points],
            "reasons": sorted({(r.get("split") or {}).get("reason") or "" for r in marked_points} - {""}),
        }
    out: dict[str, Any] = {"per_qd": per_qd, "lag": extra.get("lag"), "wire": extra.get("wire"),
                           "status_end": extra.get("status_end"), "card_end": extra.get("card_end")}
    out["acceptance"] = split_acceptance(out)
    return out


def split_acceptance(sr: dict[str, Any]) -> dict[str, Any]:
    q1, q16 = sr["per_qd"].get("1", {}), sr["per_qd"].get("16", {})
    lag = sr.get("lag") or {}

    def le(x: float | None, t: float) -> bool | None:
        return None if x is None else x <= t

    lat_p50 = max((q.get("split_p50_us") for q in sr["per_qd"].values() if q.get("split_p50_us") is not None), default=None)
    lat_p99 = max((q.get("split_p99_us") for q in sr["per_qd"].values() if q.get("split_p99_us") is not None), default=None)
    marked = sum(q.get("marked_writes") or 0 for q in sr["per_qd"].values()) + (lag.get("marked") or 0)
    total_points = sum(q.get("n") or 0 for q in sr["per_qd"].values())
    marking_points = sum(q.get("points_marking") or 0 for q in sr["per_qd"].values())
    # A point whose vdisk went to marking early measured marking, not
    # splitting: its ratios say nothing about the splitter's cost.
    def invalid(q: dict) -> bool:
        return bool(q.get("points_marking")) and (q.get("marked_writes") or 0) > (q.get("split_writes") or 0)

    lag_ok = None
    if lag:
        lag_ok = (lag.get("rpo_max_s") is not None and lag["rpo_max_s"] < LAG_MAX_S and lag.get("state_end") != "marking"
                  and not lag.get("marked"))
    return {
        "p50_qd1_invalid": invalid(q1), "iops_qd16_invalid": invalid(q16),
        "p50_qd1_ratio": q1.get("p50_vs_noprot"), "p50_qd1_pass": le(q1.get("p50_vs_noprot"), SPLIT_P50_QD1),
        "iops_qd16_ratio": q16.get("iops_vs_noprot"),
        "iops_qd16_pass": None if q16.get("iops_vs_noprot") is None else q16["iops_vs_noprot"] >= SPLIT_IOPS_QD16,
        "cpu_per_write_ratio": q16.get("cpu_per_write_vs_noprot"),
        "cpu_per_write_pass": le(q16.get("cpu_per_write_vs_noprot"), SPLIT_CPU_PER_WRITE),
        "split_p50_us": lat_p50, "split_p50_pass": le(lat_p50, SPLIT_LAT_P50_US),
        "split_p99_us": lat_p99, "split_p99_pass": le(lat_p99, SPLIT_LAT_P99_US),
        "marking_points": marking_points, "points": total_points, "marked_writes": marked,
        "no_marking_pass": (marking_points == 0 and marked == 0) if total_points or lag else None,
        "lag_max_s": lag.get("rpo_max_s"), "lag_pass": lag_ok,
    }


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
        "suite": a.suite,
        "lag_seconds": a.lag_seconds,
        "wire_seconds": a.wire_seconds,
        "split_timeout_us": a.split_timeout_us,
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
    lines += [f"- {line}" for line in acceptance_lines(doc["acceptance"], PRIMARY)]
    if any(s.key == NOFILTER for s in servers):
        lines += ["", "For reference, nicsplit with no filters:", ""]
        lines += [f"- {line}" for line in acceptance_lines(doc["acceptance"], NOFILTER)]
    if doc.get("split"):
        lines += render_split_markdown(doc["split"], m)
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


def _v(ok: bool | None, shown: str) -> str:
    return "n/a (not measured)" if ok is None else f"{'PASS' if ok else 'FAIL'} ({shown})"


def _r(x: float | None, target: float) -> str:
    if x is None:
        return "–"
    return f"{x:.2f}" if round(x, 2) != target else f"{x:.3f}"


def _vi(ok: bool | None, shown: str, invalid: bool | None, q: dict | None) -> str:
    """A verdict, or INVALID when the points measured marking, not splitting."""
    if not invalid or not q:
        return _v(ok, shown)
    tot = (q.get("split_writes") or 0) + (q.get("marked_writes") or 0)
    pct = (q.get("marked_writes") or 0) / tot * 100 if tot else 0
    return (f"INVALID ({shown}, would be {'PASS' if ok else 'FAIL'}): not a measurement of the splitter, "
            f"{q['points_marking']} of {q['n']} points went to marking and {pct:.1f}% of their writes skipped the card")


def render_split_markdown(sr: dict[str, Any], m: dict[str, Any]) -> list[str]:
    pq = sr["per_qd"]
    qds = [q for q in ("1", "16") if q in pq] + [q for q in pq if q not in ("1", "16")]
    lines = [
        "",
        "## Splitter (issue 3): `nicsplit up` with chain [\"stats\", \"split\"] vs the host with [\"stats\"]",
        "",
        "Same rounds and points as the table above: *split* is row “nicsplit up (stats, split)” (appliance + card + host, "
        "vdisks in one CG, default `split_timeout_us` 1000), *no protection* is row “nicsplit (stats)”. "
        "Every split point runs on its own fresh, pre-filled, protected vdisk, because marking is sticky until a resync.",
        *(["", f"**This run set `split_timeout_us = {m['split_timeout_us']:g}`** (`--split-timeout-us`), not the default 1000."]
          if m.get("split_timeout_us") else []),
        "",
        "| metric | " + " | ".join(f"QD{q}" for q in qds) + " | target |",
        "|---|" + "--:|" * len(qds) + "---|",
    ]

    def row(name: str, key: str, spec: str, target: str) -> None:
        lines.append(f"| {name} | " + " | ".join(_fmt(pq[q].get(key), spec) for q in qds) + f" | {target} |")

    row("p50 latency ×no protection", "p50_vs_noprot", ".2f", f"≤ {SPLIT_P50_QD1} at QD1")
    row("IOPS ×no protection", "iops_vs_noprot", ".2f", f"≥ {SPLIT_IOPS_QD16} at QD16")
    row("host CPU per write ×no protection", "cpu_per_write_vs_noprot", ".2f", f"≤ {SPLIT_CPU_PER_WRITE} (QD16)")
    row("host CPU µs/write, split", "host_cpu_us_per_write", ".1f", "")
    row("host CPU µs/write, no protection", "noprot_cpu_us_per_write", ".1f", "")
    row("card process CPU s/GiB", "card_cpu_s_per_gib", ".1f", "(offload; context)")
    row("splitter added latency p50 µs", "split_p50_us", ".1f", f"≤ {SPLIT_LAT_P50_US:g}")
    row("splitter added latency p99 µs", "split_p99_us", ".1f", f"≤ {SPLIT_LAT_P99_US:g}")
    row("splitter added latency p99.9 µs", "split_p999_us", ".1f", "")
    row("points that went to marking", "points_marking", "d", "0")
    row("host lost the card link (heartbeat stale), times", "card_link_losses", "d", "0")
    lines.append("| writes split (handed to the card) / marked | "
                 + " | ".join(f"{pq[q]['split_writes']:,} / {pq[q]['marked_writes']:,}" for q in qds) + " | no marked writes |")
    acc = sr["acceptance"]
    marking_note = (f"{acc['marking_points']} of {acc['points']} points marking, "
                    f"{acc['marked_writes']:,} writes marked incl. the lag run")
    lines += [
        "",
        "### Acceptance (issue 3)",
        "",
        f"- p50 at QD1 <= {SPLIT_P50_QD1}x no protection: "
        f"{_vi(acc['p50_qd1_pass'], _r(acc['p50_qd1_ratio'], SPLIT_P50_QD1), acc.get('p50_qd1_invalid'), pq.get('1'))}",
        f"- IOPS at QD16 >= {SPLIT_IOPS_QD16}x no protection: "
        f"{_vi(acc['iops_qd16_pass'], _r(acc['iops_qd16_ratio'], SPLIT_IOPS_QD16), acc.get('iops_qd16_invalid'), pq.get('16'))}",
        f"- host CPU per write (QD16) <= {SPLIT_CPU_PER_WRITE}x no protection: "
        f"{_vi(acc['cpu_per_write_pass'], _r(acc['cpu_per_write_ratio'], SPLIT_CPU_PER_WRITE), acc.get('iops_qd16_invalid'), pq.get('16'))}",
        f"- splitter added latency p50 <= {SPLIT_LAT_P50_US:g} µs (worst QD): {_v(acc['split_p50_pass'], _fmt(acc['split_p50_us'], '.1f') + ' µs')}",
        f"- splitter added latency p99 <= {SPLIT_LAT_P99_US:g} µs (worst QD): {_v(acc['split_p99_pass'], _fmt(acc['split_p99_us'], '.1f') + ' µs')}",
        f"- no vdisk in marking: {_v(acc['no_marking_pass'], marking_note)}",
    ]
    lag = sr.get("lag")
    if lag:
        lines.append(f"- replication lag < {LAG_MAX_S:g} s under {lag['seconds']:g} s of QD16, no marking: "
                     + _v(acc["lag_pass"], f"max {_fmt(lag['rpo_max_s'], '.3f')} s, end state {lag['state_end']}"))
    else:
        lines.append(f"- replication lag < {LAG_MAX_S:g} s: n/a (not measured)")
    reasons = sorted({r for q in pq.values() for r in q.get("reasons", [])} | ({lag["reason"]} if lag and lag.get("reason") else set()))
    if reasons:
        lines += ["", "Marking reasons: " + "; ".join(f"“{r}”" for r in reasons) + ". Split writes before a point's vdisk went "
                  "marking: " + ", ".join(f"QD{q}: {pq[q]['split_before_marking']}" for q in qds) + "."]
    if lag:
        lines += [
            "",
            f"### Replication lag: {lag['seconds']:g} s of QD16 randwrite on vdisk `{LAG_VDISK}` (alone in CG `{lag.get('cg')}`), "
            f"card `rpo_seconds` every {lag['interval_s']:g} s",
            "",
            "| IOPS | samples | lag max s | lag p99 s | lag p50 s | lag at end s | marking from | writes split / marked | state at end | drained after | card link losses |",
            "|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|--:|",
            f"| {lag['iops']:,.0f} | {lag['n_samples']} | {_fmt(lag['rpo_max_s'], '.3f')} | {_fmt(lag['rpo_p99_s'], '.3f')} | "
            f"{_fmt(lag['rpo_p50_s'], '.3f')} | {_fmt(lag['rpo_end_s'], '.3f')} | "
            f"{'–' if lag['marking_at_s'] is None else format(lag['marking_at_s'], '.1f') + ' s'} | "
            f"{lag['split'] or 0:,} / {lag['marked'] or 0:,} | {lag['state_end']} (status: CG {lag['status_end'].get('cg_state')}) | "
            f"{lag['drain']['seconds']:g} s{'' if lag['drain']['drained'] else ' (NOT drained: ' + str(lag['drain'].get('held_at_end')) + ' writes still held by the card)'} | "
            f"{lag.get('card_link_losses', '–')} |",
        ]
        if lag.get("reason"):
            lines += ["", f"The lag vdisk's marking reason: “{lag['reason']}”."]
        if lag.get("marked"):
            lines += ["", "Once a vdisk is marking its writes no longer reach the card, so the lag measured after that "
                      "point covers only what was split before it."]
    w = sr.get("wire")
    if w:
        lines += [
            "",
            f"### Bytes on the wire: fio {' '.join(w['fio_options'])}, QD16 4 KiB randwrite, {w['seconds']:g} s on vdisk `wire` (alone in its CG)",
            "",
            f"The `wire` vdisk's split timeout is {w['split_timeout_us'] / 1000:g} ms, so that a slow ack alone does not send it "
            "to marking: this run measures what dedup and compression do to the bytes, not the timeout. If it still goes "
            "marking (e.g. the card's hidden volume is full), *wire ÷ captured* is the meaningful ratio. Card counters are deltas over the run, read "
            "after the card drained (`card stats`: `payload_bytes_in`, `stages.dedup.bytes_saved`, `stages.compress.bytes_in/out`, "
            "`wire.bytes_out`).",
            "",
            "| written by fio | captured by card | dedup saved | compress in → out | wire bytes out | wire ÷ written | wire ÷ captured | split / marked | split p50/p99/p99.9/max µs |",
            "|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
            f"| {w['bytes_written'] / MiB:.1f} MiB | {w['bytes_captured_by_card'] / MiB:.1f} MiB | {w['dedup_bytes_saved'] / MiB:.1f} MiB "
            f"({w['dedup_ref_blocks']:,} of {w['dedup_blocks']:,} blocks) | {w['compress_bytes_in'] / MiB:.1f} → {w['compress_bytes_out'] / MiB:.1f} MiB | "
            f"{w['wire_bytes_out'] / MiB:.1f} MiB | {_fmt(w['wire_per_written'], '.3f')} | {_fmt(w['wire_per_captured'], '.3f')} | "
            f"{w['split'] or 0:,} / {w['marked'] or 0:,} | {_fmt(w.get('split_p50_us'), '.1f')} / {_fmt(w.get('split_p99_us'), '.1f')} / "
            f"{_fmt(w.get('split_p999_us'), '.1f')} / {_fmt(w.get('split_max_us'), '.0f')} |",
        ]
        if w.get("marked"):
            lines += ["", f"The `wire` vdisk went to marking ({w.get('reason')}); its marked writes never reached the card"
                      f" (host lost the card link {w.get('card_link_losses', '?')} time(s) during the run; "
                      f"link before the run: {w.get('card_link_before')})."]
        if not w["drain"].get("drained"):
            lines += ["", f"The card did not drain: its hold stage still held {w['drain'].get('held_at_end')} writes "
                      f"(before the run: {w.get('hold_held_before')}), so the wire bytes cover only what it shipped."]
    lines += ["", "Card CPU s/GiB is the card process's utime+stime (from /proc/PID/stat of the card pid) over the fio run, per GiB "
              "fio wrote; it is not in the host column. The appliance and card run during every configuration's points "
              "(idle when their vdisks are not written)."]
    return lines


def plot(doc: dict, servers: list[Server], qds: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = doc["results"]
    sr = doc.get("split")
    if sr:
        fig, grid = plt.subplots(2, 2, figsize=(12, 8.4))
        axes = grid[0]
    else:
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
    if sr:
        plot_split(sr, grid[1][0], grid[1][1])
    m = doc["meta"]
    fig.suptitle(f"nicsplit vs nbdkit file · {m['runtime_s']:g} s × {m['rounds']} rounds (median) · git {m['git']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_split(sr: dict[str, Any], ax_ratio: Any, ax_lag: Any) -> None:
    """Issue-3 panels: split/no-protection ratios against their targets, and
    the replication lag over the lag run."""
    acc = sr["acceptance"]
    items = [("p50 QD1\n×no prot.", acc.get("p50_qd1_ratio"), SPLIT_P50_QD1, "≤"),
             ("IOPS QD16\n×no prot.", acc.get("iops_qd16_ratio"), SPLIT_IOPS_QD16, "≥"),
             ("host CPU/write\nQD16 ×no prot.", acc.get("cpu_per_write_ratio"), SPLIT_CPU_PER_WRITE, "≤")]
    invalid = [acc.get("p50_qd1_invalid"), acc.get("iops_qd16_invalid"), acc.get("iops_qd16_invalid")]
    for i, (name, v, target, sense) in enumerate(items):
        if v is None:
            continue
        ok = v <= target if sense == "≤" else v >= target
        ax_ratio.bar(i, v, 0.6, color="#bbbbbb" if invalid[i] else "#2ca02c" if ok else "#d62728",
                         hatch="//" if invalid[i] else None)
        ax_ratio.annotate(f"{v:.2f}", (i, v), ha="center", va="bottom", fontsize=9)
        ax_ratio.hlines(target, i - 0.4, i + 0.4, colors="k", linestyles="--")
        ax_ratio.annotate(f"target {sense} {target}", (i, target), xytext=(0, -12), textcoords="offset points",
                          ha="center", fontsize=7)
    ax_ratio.axhline(1.0, color="#7f7f7f", lw=0.8)
    ax_ratio.set_xticks(range(len(items)), [n for n, *_ in items], fontsize=8)
    pts = f"{acc.get('marking_points')} of {acc.get('points')} points went to marking"
    ax_ratio.set_title(f"splitter vs no protection (green = met, red = missed, grey = measured marking)\n{pts}; split p50 "
                       f"{_fmt(acc.get('split_p50_us'), '.1f')} µs, p99 {_fmt(acc.get('split_p99_us'), '.1f')} µs", fontsize=9)
    ax_ratio.grid(axis="y", alpha=0.3)
    lag = sr.get("lag")
    if lag and lag.get("samples"):
        t = [x["t"] for x in lag["samples"]]
        rpo = [x["rpo_seconds"] if isinstance(x["rpo_seconds"], (int, float)) else float("nan") for x in lag["samples"]]
        ax_lag.plot(t, rpo, marker=".", label="card rpo_seconds (CG)")
        ax_lag.axhline(LAG_MAX_S, color="#d62728", ls="--", label=f"target < {LAG_MAX_S:g} s")
        if lag.get("marking_at_s") is not None:
            ax_lag.axvline(lag["marking_at_s"], color="#ff7f0e", ls=":", label=f"vdisk marking from {lag['marking_at_s']:.1f} s")
        ax_lag.set_xlabel("s into the QD16 run")
        ax_lag.set_ylabel("replication lag, s")
        ax_lag.set_title(f"replication lag under QD16 ({lag['iops']:,.0f} IOPS): max {_fmt(lag['rpo_max_s'], '.3f')} s, "
                         f"end state {lag['state_end']}", fontsize=9)
        ax_lag.legend(fontsize=8)
        ax_lag.grid(alpha=0.3)
    else:
        ax_lag.set_axis_off()
    w = sr.get("wire")
    if w and w.get("wire_per_captured") is not None:
        ax_lag.annotate(f"wire bytes ÷ bytes the card captured (50% compressible, 30% dup): {w['wire_per_captured']:.3f}"
                        f" (÷ written: {w['wire_per_written']:.3f})",
                        (0.01, 0.02), xycoords="axes fraction", fontsize=8)


if __name__ == "__main__":
    sys.exit(main())
