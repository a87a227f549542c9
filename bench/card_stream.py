#!/usr/bin/env python3
"""The keep-up suite's component stream alone (`keepup.stream`): a real
appliance (ingest only) and a real card (acker + pipeline worker) driven by
a synthetic splitter through the real ring, 4 KiB half-compressible unique
writes; CPU per write per process from /proc/PID/stat, median of rounds.

For before/after comparisons on a loaded machine: ``--tree A --tree B``
runs the card and appliance of each source tree (its ``src`` on
PYTHONPATH) in alternating rounds, so both see the same load.

    .venv/bin/python bench/card_stream.py [--rounds 3] [--writes 30000] [--tree /path/to/checkout ...]

Nothing here asserts on speed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import loadavg  # noqa: E402
from keepup import BS, Appliance, Card, card_stats, durable_seq, med, payloads, spread, stream  # noqa: E402
from nicsplit.card.transports.ring_splitter import RingSplitter  # noqa: E402
from nicsplit.core.layout import Layout  # noqa: E402
from nicsplit.core.records import AugmentedWrite, Op, WFlag  # noqa: E402
from nicsplit.testing.datadir import init_data  # noqa: E402
from nicsplit.testing.procs import run_cli, wait_for  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def one_round(work: Path, n: int) -> dict[str, Any]:
    data = init_data(work / "data", sections={"card": {"transport_options": {"data_size": "256M"}}})
    run_cli(data, "cg", "create", "k")
    run_cli(data, "vdisk", "create", "v", "--size", "64G", "--cg", "k")
    (data / "appliance" / "failover").mkdir(parents=True, exist_ok=True)
    (data / "appliance" / "failover" / "k.json").write_text("{}")  # distribution held off: ingest alone
    with Appliance(data) as app:
        card = Card(data, app.ready["address"]).start()
        try:
            pids = {"acker": card.pid, "worker": card.ready["worker_pid"], "appliance": app.pid}
            r = RingSplitter.connect(str(Layout(data).card_sock))
            try:
                seq = [0]
                small = payloads(256, BS)

                def w() -> AugmentedWrite:
                    seq[0] += 1
                    s = seq[0]
                    return AugmentedWrite(s, 1, s, 1, Op.WRITE, WFlag.NONE, (s % 4096) * BS, BS, time.time_ns(),
                                          s.to_bytes(8, "little") + small[s % 256][8:])

                warm = stream(r, data, pids, w, 2048, seq)  # imports, first batches, TLS: not measured
                del warm
                wait_for(lambda: durable_seq(data, "k") >= seq[0], 120, "the warm-up writes durable")
                out = stream(r, data, pids, w, n, seq)
                o = card_stats(data).get("overflow") or {}
                out["overflow"] = {k: o.get(k) for k in ("diverted", "fed", "spilled", "syncs")}
                return out
            finally:
                r.close()
        finally:
            card.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--writes", type=int, default=30_000)
    ap.add_argument("--tree", action="append", type=Path, help="a source checkout (default: this one); repeat to compare")
    a = ap.parse_args(argv)
    trees = [t.resolve() for t in (a.tree or [ROOT])]
    results: dict[str, list[dict]] = {str(t): [] for t in trees}
    load0 = loadavg()
    base_env = os.environ.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory(prefix="nicsplit-cardstream-") as tmp:
        for i in range(a.rounds):
            for t in trees:  # alternating: each tree sees the same load
                os.environ["PYTHONPATH"] = str(t / "src") + (os.pathsep + base_env if base_env else "")
                s = one_round(Path(tmp) / f"{i}-{trees.index(t)}", a.writes)
                results[str(t)].append(s)
                c = s["cpu_us_per_write"]
                print(f"round {i + 1} {t}: worker {c['worker']:.1f} µs/write, acker busy {c['acker_busy']:.1f}, "
                      f"appliance {c['appliance']:.1f}, overflow {s['overflow']}", flush=True)
    os.environ["PYTHONPATH"] = base_env
    out = {"loadavg_before": load0, "loadavg_after": loadavg(), "writes": a.writes, "rounds": a.rounds, "trees": {}}
    for t, rs in results.items():
        keys = rs[0]["cpu_us_per_write"].keys()
        out["trees"][t] = {k: {"median": med([r["cpu_us_per_write"][k] for r in rs]),
                               "spread": spread([r["cpu_us_per_write"][k] for r in rs])} for k in keys}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
