"""Does distribution keep up with ingest, and what does it cost production?
``nicsplit up`` on a fresh data directory, fio 4 KiB random writes at QD16 on
a fresh protected vdisk for ``--seconds`` (default 10) per run, runs in the
order ``--order`` (default PRRP, an ABBA design that cancels a drift over
time; the machine is shared):

* **P**: distribution of the CG held off the way a failover holds it
  (``DATA/appliance/failover/<cg>.json`` exists) — ingest alone, the
  baseline; then the pause is lifted and the backlog drains with nothing else
  running: distribution's own throughput;
* **R**: the same load with distribution running behind it.

During each run the appliance's status (its control socket,
DATA/run/appliance.sock) is sampled every 100 ms: durable seq, applied seq,
lag in records and seconds.  After fio: how long until the replica holds
every durable record; at the end (checked) every replica equals its
production vdisk byte for byte.

    .venv/bin/python bench/distribution.py [--seconds 10] [--qd 16] [--size 256M] [--order PRRP]
        [--split-timeout-us 100000] [--rate-iops 0] [--out bench/out]

Writes ``distribution.json``, ``distribution.md`` and ``distribution.png``
(lag over time) into ``--out``.  Nothing
here asserts on speed.

Why a 100 ms split timeout by default: at full QD16 speed on a 2-core
machine the card is descheduled for more than the default 1 ms now and then,
and a vdisk that drops to marking stops sending writes to the card (so to the
journal and the replica): the run would then measure marking, not
distribution.  ``--split-timeout-us 1000`` shows that case.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import cpu_seconds, fio_cmd, git_state, loadavg, run_fio  # noqa: E402
from nicsplit.storage import atrest  # noqa: E402
from nicsplit.storage.image import open_image  # noqa: E402
from nicsplit.core.catalog import CatalogReader  # noqa: E402
from nicsplit.core.ctl import request  # noqa: E402
from nicsplit.core.layout import Layout, vdisk_file  # noqa: E402
from nicsplit.testing.datadir import init_data  # noqa: E402
from nicsplit.testing.procs import UpProcess, run_cli, wait_for  # noqa: E402

CG = "dist"


def appliance_cg(data: Path) -> dict | None:
    reply = request(data / "run" / "appliance.sock", {"cmd": "status"}, 2.0)
    if not reply or not reply.get("ok"):
        return None
    return reply["status"]["cgs"].get(CG)


def host_cg(data: Path, vdisk: str) -> tuple[int | None, str]:
    reply = request(data / "run" / "host.sock", {"cmd": "status"}, 2.0) or {}
    st = reply.get("status") or {}
    seq = (st.get("cgs") or {}).get(CG, {}).get("last_seq")
    state = next((v.get("state", "?") for v in st.get("vdisks", []) if v.get("name") == vdisk), "?")
    return seq, state


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


class Sampler(threading.Thread):
    def __init__(self, data: Path, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.data, self.interval = data, interval
        self.samples: list[dict[str, Any]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.stop.is_set():
            c = appliance_cg(self.data)
            if c and c.get("distribution"):
                d = c["distribution"]
                self.samples.append({"t": round(time.monotonic() - t0, 3), "durable": c["durable_seq"],
                                     "applied": d["applied_seq"], "lag_records": d["lag_records"],
                                     "lag_seconds": d["lag_seconds"], "state": d["state"]})
            self.stop.wait(self.interval)


def one_run(data: Path, up: UpProcess, vdisk: str, a: argparse.Namespace, work: Path) -> dict[str, Any]:
    """fio on ``vdisk`` with the appliance sampled; then both drains."""
    apid = up.pid_of("appliance")
    out = work / f"fio-{vdisk}.json"
    cmd = fio_cmd(up.uri(vdisk), rw="randwrite", bs="4k", size=a.size, iodepth=a.qd, out=out, runtime=a.seconds)
    if a.rate_iops:
        cmd.append(f"--rate_iops={a.rate_iops}")
    c0 = appliance_cg(data)
    d0 = c0["distribution"]
    cpu0 = cpu_seconds(apid)
    sampler = Sampler(data)
    sampler.start()
    t0 = time.monotonic()
    job = run_fio(cmd, out, timeout=a.seconds + 120)
    t_fio = time.monotonic() - t0
    cpu_fio = cpu_seconds(apid) - cpu0
    # The journal holds every write the host sequenced (card → appliance).
    host_seq, vstate = host_cg(data, vdisk)
    t1 = time.monotonic()
    if vstate == "protected":  # a marking vdisk's marked writes never reach the journal
        wait_for(lambda: (c := appliance_cg(data)) and host_seq is not None and c["durable_seq"] >= host_seq, 120,
                 "the journal to hold production", interval=0.02)
    t_journal = time.monotonic() - t1
    sampler.stop.set()
    sampler.join()
    c1 = appliance_cg(data)
    load = [x for x in sampler.samples if x["t"] <= t_fio]
    lag_r = [x["lag_records"] for x in load]
    lag_s = [x["lag_seconds"] for x in load]
    records = c1["durable_seq"] - c0["durable_seq"]
    d1 = c1["distribution"]
    w = job["write"]
    return {
        "vdisk": vdisk, "vdisk_state_end": vstate,
        "fio_iops": round(w["iops"]), "fio_p50_us": round(w["lat_ns"].get("percentile", {}).get("50.000000", 0) / 1e3, 1),
        "fio_p99_us": round(w["lat_ns"].get("percentile", {}).get("99.000000", 0) / 1e3, 1),
        "journaled_records": records, "ingest_records_per_s": round(records / t_fio),
        "distributed_records_during_load": d1["records_applied"] - d0["records_applied"],
        "steps_during_load": d1["steps"] - d0["steps"],
        "lag_records": {"p50": pct(lag_r, 50), "p99": pct(lag_r, 99), "max": max(lag_r, default=0)},
        "lag_seconds": {"p50": pct(lag_s, 50), "p99": pct(lag_s, 99), "max": max(lag_s, default=0.0)},
        "caught_up_fraction": round(sum(1 for x in lag_r if x == 0) / max(1, len(lag_r)), 3),
        "journal_drain_s": round(t_journal, 3),
        "appliance_cpu_s_during_load": round(cpu_fio, 2),
        "distribution_cpu_s_during_load": round(d1["cpu_seconds"] - d0["cpu_seconds"], 3),
        "samples": sampler.samples,
    }


def wait_replica(data: Path, up: UpProcess) -> float:
    """Seconds until the replica holds every durable record."""
    t = time.monotonic()
    try:
        def done() -> bool:
            c = appliance_cg(data)
            if c and c["distribution"]["state"] == "error":
                raise TimeoutError(f"distribution failed: {c['distribution']['last_error']}")
            return bool(c) and c["distribution"]["lag_records"] == 0 and c["distribution"]["applied_seq"] >= c["durable_seq"]

        wait_for(done, 300, "the replica to catch up", interval=0.02)
    except TimeoutError as e:
        raise SystemExit(f"the replica did not catch up: {e}; {appliance_cg(data)}") from None
    return round(time.monotonic() - t, 3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--qd", type=int, default=16)
    ap.add_argument("--size", default="256M")
    ap.add_argument("--split-timeout-us", type=int, default=100_000)
    ap.add_argument("--rate-iops", type=int, default=0, help="pace fio (0: as fast as it goes)")
    ap.add_argument("--card-idle-spin-us", type=float, default=None,
                    help="[card] idle_spin_us (default: the configuration's, 2000): how long the card busy-polls "
                         "its ring after the last entry, holding a core on this 2-core machine")
    ap.add_argument("--at-rest", choices=("on", "off"), default="on",
                    help="[appliance] at_rest_encryption: sealed journal and replica (default), or in clear")
    ap.add_argument("--order", default="PRRP",
                    help="runs: P = distribution paused, R = running (default PRRP: ABBA cancels a drift over time)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    ap.add_argument("--keep", action="store_true", help="keep the data directory")
    a = ap.parse_args(argv)
    if not a.order or set(a.order) - {"P", "R"}:
        ap.error("--order: a string of P and R")
    work = Path(tempfile.mkdtemp(prefix="nicsplit-dist-"))
    data = init_data(work / "data", filters=["stats", {"name": "split", "split_timeout_us": a.split_timeout_us}],
                     sections={"card": {"transport_options": {"data_size": "512M"},
                                        **({"idle_spin_us": a.card_idle_spin_us} if a.card_idle_spin_us is not None
                                           else {})},
                               "appliance": {"at_rest_encryption": a.at_rest == "on"}})
    run_cli(data, "cg", "create", CG)
    names = [f"v{i}" for i in range(len(a.order))]
    for v in names:  # one fresh vdisk per run: every run pays thin-provisioning allocation alike
        run_cli(data, "vdisk", "create", v, "--size", a.size, "--cg", CG)
    pause = data / "appliance" / "failover" / f"{CG}.json"
    pause.parent.mkdir(parents=True, exist_ok=True)
    up = UpProcess(data)
    up.start()
    load0 = loadavg()
    runs: list[dict[str, Any]] = []
    try:
        wait_for(lambda: appliance_cg(data) is not None, 30, "the appliance's status")
        for kind, v in zip(a.order, names):
            if kind == "P":  # held off the way a failover holds it
                pause.write_text("{}")
                wait_for(lambda: appliance_cg(data)["distribution"]["state"] == "paused", 30, "distribution paused")
            r = one_run(data, up, v, a, work)
            r["distribution"] = "paused" if kind == "P" else "running"
            if kind == "P":
                backlog = appliance_cg(data)["distribution"]
                pause.unlink()
                request(data / "run" / "appliance.sock", {"cmd": "wake", "cg": CG}, 2.0)
                drain = wait_replica(data, up)
                after = appliance_cg(data)["distribution"]
                r["backlog_records"] = backlog["lag_records"]
                r["replica_drain_s"] = drain
                r["backlog_records_per_s"] = round(backlog["lag_records"] / max(drain, 1e-9))
                r["backlog_cpu_s"] = round(after["cpu_seconds"] - backlog["cpu_seconds"], 3)
            else:
                r["replica_drain_s"] = wait_replica(data, up)
            runs.append(r)
            log_run(r)
        same = {}
        ids = {v.name: v.id for v in CatalogReader(Layout(data).datastore).vdisks()}
        marking = {r["vdisk"] for r in runs if r["vdisk_state_end"] != "protected"}
        for v in names:
            if v in marking:
                continue  # its writes after the switch to marking never reached the journal: nothing to compare
            # Replicas are sealed at rest by default: compare their plaintext.
            replica = vdisk_file(data / "appliance" / "replicas" / CG, ids[v], ".img")  # keyed by vdisk id
            clear = work / f"replica-{v}.raw"
            with open_image(replica, replica.stat().st_size, atrest.keyring_in(data / "appliance"),
                            writable=False) as img, open(clear, "wb") as f:
                for pos in range(0, img.size, 16 << 20):
                    f.write(img.pread(pos, min(16 << 20, img.size - pos)))
            same[v] = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(clear), up.uri(v)],
                                     timeout=300).returncode == 0
            clear.unlink()
    finally:
        up.stop()

    def mean(kind: str, key: str) -> float:
        xs = [r[key] for r in runs if r["distribution"] == kind]
        return sum(xs) / len(xs) if xs else 0.0

    res = {"git": git_state(Path(__file__).resolve().parent.parent), "loadavg_before": load0,
           "seconds": a.seconds, "qd": a.qd, "size": a.size, "split_timeout_us": a.split_timeout_us,
           "rate_iops": a.rate_iops, "at_rest": a.at_rest, "card_idle_spin_us": a.card_idle_spin_us, "order": a.order, "runs": runs,
           "iops_ratio": round(mean("running", "fio_iops") / max(1.0, mean("paused", "fio_iops")), 3),
           "replica_equals_production": same}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "distribution.json").write_text(json.dumps(res, indent=2))
    md = [f"# Distribution under fio QD{a.qd} 4 KiB randwrite, {a.seconds:g} s per run, order {a.order}, at-rest encryption {a.at_rest} "
          f"({res['git']}, load {load0:.2f} before)", "",
          "| run | distribution | fio IOPS | p50 / p99 µs | records/s journaled | lag records p50 / p99 / max "
          "| lag s p50 / p99 / max | replica caught up after fio | appliance CPU s (distribution) | vdisk |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(runs):
        lr, ls = r["lag_records"], r["lag_seconds"]
        drain = (f"{r['replica_drain_s']} s ({r['backlog_records']} records, {r['backlog_records_per_s']}/s)"
                 if r["distribution"] == "paused" else f"{r['replica_drain_s']} s")
        md.append(f"| {i + 1} | {r['distribution']} | {r['fio_iops']} | {r['fio_p50_us']} / {r['fio_p99_us']} | "
                  f"{r['ingest_records_per_s']} | {lr['p50']} / {lr['p99']} / {lr['max']} | "
                  f"{ls['p50']} / {ls['p99']} / {ls['max']} | {drain} | {r['appliance_cpu_s_during_load']} "
                  f"({r['distribution_cpu_s_during_load']}) | {r['vdisk_state_end']} |")
    md += ["", f"IOPS running / paused (means): {res['iops_ratio']}; replica == production (qemu-img compare) "
               f"for the {len(same)} vdisk(s) that stayed protected: {all(same.values())}"
               + (f" (vdisks in marking are not compared: {', '.join(sorted(marking))})" if marking else "")]
    (a.out / "distribution.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    plot(runs, a.out / "distribution.png")
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"data directory kept: {data}")
    return 0 if all(same.values()) else 1


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    """Replica lag (records behind the durable journal) over each run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for i, r in enumerate(runs):
        xs = [p["t"] for p in r.get("samples", [])]
        ys = [p["lag_records"] for p in r.get("samples", [])]
        ax.plot(xs, ys, linestyle="--" if r["distribution"] == "paused" else "-",
                label=f"run {i + 1}: {r['distribution']}, {r['fio_iops']} IOPS")
    ax.set_xlabel("seconds of fio")
    ax.set_ylabel("records not yet in the replica")
    ax.set_title("distribution lag under QD16 4 KiB randwrite")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def log_run(r: dict[str, Any]) -> None:
    print(f"run ({r['distribution']}): {r['fio_iops']} IOPS, lag p99 {r['lag_records']['p99']} records "
          f"/ {r['lag_seconds']['p99']} s, replica caught up {r['replica_drain_s']} s after fio", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
