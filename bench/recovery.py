#!/usr/bin/env python3
"""``make bench`` (recovery part, issue 4): how fast users get data back.

Measured on this machine, in the same run:

* **export** — ``nicsplit image export CG --at <one hour back> --json`` on a
  1 GiB vdisk with 1 GiB of journal spanning two hours, for 4 KiB and 64 KiB
  records: wall time of the command, (a) with the appliance running (it
  serves the image from the block index it keeps for distribution: the
  deployment case) and (b) without one (a standalone server scans the
  journal first). Target < 1 s. The appliance's own start (journal recovery
  and index build) is reported too.
* **restore** — ``nicsplit restore VDISK --latest --to FILE`` of a 1 GiB vdisk
  whose journal holds every block (64 KiB records), wall time incl. fsync,
  against fio writing 1 GiB sequentially (1 MiB blocks, ``end_fsync=1``) to
  the same file system, rounds interleaved. Target >= 0.70x fio.

The journals are written with the appliance's own `Journal` (what ingest
writes), not through the host: this measures recovery, not capture.
Writes bench/out/recovery.{md,json,png}. Exits 0 whether or not targets are met.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
GiB = 1 << 30
HOUR_NS = 3600 * 10**9
TARGET_EXPORT_S = 1.0
TARGET_RESTORE_RATIO = 0.70


@dataclass(frozen=True, slots=True)
class Meta:  # journal.BatchMeta
    batch_id: int
    first_seq: int
    last_seq: int
    t_first_ns: int
    t_last_ns: int


def log(msg: str) -> None:
    print(f"[recovery {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cli(data: Path, *args: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess, float]:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "nicsplit", "--data", str(data), *args], capture_output=True, text=True,
                       timeout=timeout, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"nicsplit {' '.join(args)} failed ({p.returncode}): {p.stderr.strip()}")
    return p, wall


def make_data(work: Path, name: str, size: int) -> tuple[Path, Any]:
    from nicsplit.host.datastore import Datastore

    data = work / name
    data.mkdir(parents=True)
    cli(data, "init")
    cli(data, "cg", "create", "cg1")
    cli(data, "vdisk", "create", "disk", "--size", str(size), "--cg", "cg1")
    return data, Datastore.open(data / "datastore").get_vdisk("disk")


def write_journal(data: Path, vdisk: Any, total: int, rec_size: int, *, sequential: bool, seed: int,
                  t_end_ns: int, hours: float = 2.0) -> int:
    """``total`` bytes of ``rec_size`` writes in 4 MiB batches whose times span
    ``hours`` up to ``t_end_ns``; random aligned offsets, or every block in
    order. Returns the record count."""
    from nicsplit.journal.writer import Journal
    from nicsplit.core.records import Op
    from nicsplit.wire.frames import Record

    from nicsplit.storage import atrest

    # As `nicsplit appliance run` leaves it by default: at-rest encryption on.
    atrest.ensure(atrest.keyring_path(data), True)
    rng = random.Random(seed)
    pool = rng.randbytes(8 << 20)
    per_batch = max(1, (4 << 20) // rec_size)
    nrec = total // rec_size
    nblocks = vdisk.size // rec_size
    t0 = t_end_ns - int(hours * HOUR_NS)
    seq = 0
    with Journal.open(data / "appliance" / "journal" / "cg1") as j:
        batch = 0
        while seq < nrec:
            batch += 1
            t = t0 + int(seq / nrec * hours * HOUR_NS)
            recs = []
            for _ in range(min(per_batch, nrec - seq)):
                seq += 1
                off = ((seq - 1) % nblocks if sequential else rng.randrange(nblocks)) * rec_size
                start = rng.randrange(len(pool) - rec_size)
                recs.append(Record(seq, seq, vdisk.id, Op.WRITE, 0, off, rec_size, t,
                                   seq.to_bytes(8, "big") + pool[start + 8 : start + rec_size]))
            j.append_batch(Meta(batch, recs[0].seq, seq, t, t), recs, sync=False)
        j.sync()
    return seq


def measure_export(work: Path, rec_size: int, rounds: int, seed: int) -> dict[str, Any]:
    data, v = make_data(work, f"export-{rec_size >> 10}k", GiB)
    t = time.perf_counter()
    now = time.time_ns()
    n = write_journal(data, v, GiB, rec_size, sequential=False, seed=seed, t_end_ns=now)
    log(f"journal of {n} records of {rec_size >> 10} KiB written in {time.perf_counter() - t:.1f} s")
    at = f"{(now - HOUR_NS) / 1e9:.3f}"

    def exports() -> tuple[list[float], list[float], list[float], bool]:
        walls, servers, index, inapp = [], [], [], True
        for _ in range(rounds):
            p, wall = cli(data, "image", "export", "cg1", "--at", at, "--json")
            img = json.loads(p.stdout)
            info = json.loads((data / "run" / "images" / f"{img['id']}.json").read_text())
            cli(data, "image", "close", img["id"])
            walls.append(wall)
            servers.append(info["ready_seconds"])
            index.append(info["index_seconds"])
            inapp = inapp and bool(img.get("in_appliance"))
        return walls, servers, index, inapp

    walls, servers, index, _ = exports()  # standalone: no appliance runs
    from nicsplit.testing.appliance import ApplianceProcess

    t = time.perf_counter()
    app = ApplianceProcess(data).start(timeout=600)  # recovers the journal and builds its block index
    try:
        app_start = time.perf_counter() - t
        awalls, aservers, _, inapp = exports()
    finally:
        app.stop()
    if not inapp:
        raise RuntimeError("the running appliance did not serve the image")
    shutil.rmtree(data)
    return {"records": n, "record_size": rec_size, "wall_s": statistics.median(awalls), "walls": awalls,
            "server_ready_s": statistics.median(aservers), "appliance_start_s": app_start,
            "standalone_wall_s": statistics.median(walls), "standalone_walls": walls,
            "standalone_server_ready_s": statistics.median(servers), "index_s": statistics.median(index),
            "ok": statistics.median(awalls) < TARGET_EXPORT_S}


def fio_seq_write(path: Path, size: int) -> tuple[float, float]:
    """(wall seconds, fio's own bytes/s) of a sequential 1 MiB write + fsync."""
    cmd = ["fio", "--name=seqwrite", f"--filename={path}", "--rw=write", "--bs=1M", f"--size={size}",
           "--ioengine=psync", "--end_fsync=1", "--output-format=json"]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"fio failed: {p.stderr.strip()}")
    bw = json.loads(p.stdout)["jobs"][0]["write"]["bw_bytes"]
    path.unlink()
    return wall, float(bw)


def measure_restore(work: Path, rounds: int, seed: int) -> dict[str, Any]:
    data, v = make_data(work, "restore", GiB)
    write_journal(data, v, GiB, 64 << 10, sequential=True, seed=seed, t_end_ns=time.time_ns())
    out = work / "restored.raw"
    fio_walls, fio_bws, rest = [], [], []
    for r in range(rounds):  # interleaved: both see the same disk weather
        w, bw = fio_seq_write(work / "fio.dat", v.size)
        fio_walls.append(w)
        fio_bws.append(bw)
        _, wall = cli(data, "restore", "disk", "--latest", "--to", str(out))
        if os.path.getsize(out) != v.size:
            raise RuntimeError("restore wrote the wrong size")
        out.unlink()
        rest.append(wall)
        log(f"round {r + 1}: fio {v.size / w / 2**20:.0f} MiB/s (wall), restore {v.size / wall / 2**20:.0f} MiB/s")
    shutil.rmtree(data)
    fio_mibs = v.size / statistics.median(fio_walls) / 2**20
    restore_mibs = v.size / statistics.median(rest) / 2**20
    ratio = statistics.median(fw / rw for fw, rw in zip(fio_walls, rest))  # paired per round
    return {"size": v.size, "fio_MiBps": fio_mibs, "fio_reported_MiBps": statistics.median(fio_bws) / 2**20,
            "restore_MiBps": restore_mibs, "ratio": ratio, "fio_walls": fio_walls, "restore_walls": rest,
            "ok": ratio >= TARGET_RESTORE_RATIO}


def render(doc: dict[str, Any]) -> str:
    lines = [f"# Recovery benchmark ({doc['started']}, {doc['git']})", "",
             "| measurement | value | target | verdict |", "|---|--:|--:|---|"]
    for e in doc["export"]:
        what = f"export 1 h back, 1 GiB journal of {e['record_size'] >> 10} KiB records ({e['records']})"
        lines.append(f"| {what}, appliance running: command wall time | {e['wall_s']:.3f} s (in the appliance "
                     f"{e['server_ready_s']:.3f} s) | < {TARGET_EXPORT_S:g} s | {'PASS' if e['ok'] else 'FAIL'} |")
        lines.append(f"| {what}, no appliance (standalone server scans) | {e['standalone_wall_s']:.3f} s "
                     f"(index {e['index_s']:.3f} s) | | |")
        lines.append(f"| appliance start on that journal (recovery + block index) | {e['appliance_start_s']:.2f} s | | |")
    r = doc["restore"]
    if r:
        lines.append(f"| restore 1 GiB (wall, incl. fsync) | {r['restore_MiBps']:.0f} MiB/s | | |")
        lines.append(f"| fio sequential write 1 GiB, 1 MiB blocks, end_fsync (wall) | {r['fio_MiBps']:.0f} MiB/s "
                     f"(fio says {r['fio_reported_MiBps']:.0f}) | | |")
        lines.append(f"| restore ÷ fio (paired per round) | {r['ratio']:.2f}x | >= {TARGET_RESTORE_RATIO:.2f}x | "
                     f"{'PASS' if r['ok'] else 'FAIL'} |")
    lines += ["", f"Rounds: {doc['rounds']}; medians. Work directory on the same file system as the data.", ""]
    return "\n".join(lines)


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    names = [f"{e['record_size'] >> 10} KiB records" for e in doc["export"]]
    import numpy as np

    x = np.arange(len(names))
    a1.bar(x - 0.2, [e["wall_s"] for e in doc["export"]], 0.4, label="appliance running")
    a1.bar(x + 0.2, [e["standalone_wall_s"] for e in doc["export"]], 0.4, label="standalone (scans)")
    a1.set_xticks(x, names)
    a1.axhline(TARGET_EXPORT_S, color="red", linestyle="--", label="target")
    a1.set_title("image export, 1 h back, 1 GiB journal")
    a1.set_ylabel("seconds")
    a1.legend()
    r = doc["restore"]
    if r:
        a2.bar(["fio seq write", "nicsplit restore"], [r["fio_MiBps"], r["restore_MiBps"]])
        a2.axhline(r["fio_MiBps"] * TARGET_RESTORE_RATIO, color="red", linestyle="--", label="target (0.7x fio)")
        a2.set_title("1 GiB, wall time incl. fsync")
        a2.set_ylabel("MiB/s")
        a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one round")
    ap.add_argument("--seed", type=int, default=int(os.environ.get("NICSPLIT_SEED", "20261125")))
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    rounds = 1 if a.quick else a.rounds
    print(f"seed={a.seed}", flush=True)
    if shutil.which("fio") is None:
        print("fio is missing (make system-deps)", file=sys.stderr)
        return 2
    from harness import git_state  # noqa: E402

    doc: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "git": git_state(ROOT), "rounds": rounds,
                           "seed": a.seed, "export": [], "restore": None}
    with tempfile.TemporaryDirectory(prefix="nicsplit-recovery-", dir=ROOT / "bench") as tmp:
        work = Path(tmp)
        for rec in (4 << 10, 64 << 10):
            doc["export"].append(measure_export(work, rec, rounds, a.seed))
            log(f"export ({rec >> 10} KiB records): {doc['export'][-1]['wall_s']:.3f} s")
        doc["restore"] = measure_restore(work, rounds, a.seed)
    a.out.mkdir(parents=True, exist_ok=True)
    md = render(doc)
    (a.out / "recovery.md").write_text(md)
    (a.out / "recovery.json").write_text(json.dumps(doc, indent=2))
    plot(doc, a.out / "recovery.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
