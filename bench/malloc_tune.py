#!/usr/bin/env python3
"""What glibc's malloc thresholds cost the batch path (nicsplit.core.malloc).

Each operation the card and appliance do once per batch — encode a batch
frame, seal and unseal a batch body, join a journal write — timed on CPU in
two fresh interpreters: one with the C library's defaults, one after
`nicsplit.core.malloc.tune()` (what every nicsplit process does at start).
Alternating, ``--rounds`` (5) each; the best of 5 timing loops per round,
the median of the rounds. Minor page faults per operation alongside.

    .venv/bin/python bench/malloc_tune.py [--rounds 5] [--out bench/out]

Writes ``malloc_tune.{json,md,png}``. Nothing here asserts on speed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import git_state, loadavg, pyplot  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

PROBE = r"""
import json, os, resource, sys, time
from nicsplit.core import malloc
if sys.argv[1] == "tuned":
    assert malloc.tune()
from nicsplit.wire import envelope, frames as F
key = bytes(range(32))
half = lambda n: os.urandom(n // 2) + bytes(n - n // 2)  # zstd halves it, like the benches' payloads
small = F.Batch(1, "k", 1, 64, 1, 2, half(135_000))
out = {}


def timed(name, fn, n):
    fn()
    best, f0 = 1e9, resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        t = time.process_time()
        for _ in range(n):
            fn()
        best = min(best, (time.process_time() - t) / n)
    out[name] = {"us": best * 1e6, "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / (5 * n)}


# first, before any buffer above 128 KiB was freed (glibc has not raised its thresholds yet)
timed("encode a 135 KB batch frame, in a fresh process", lambda: F.encode(small), 400)
big = F.Batch(1, "k", 1, 256, 1, 2, half(1 << 20))
plain = half(64 * 4154)
sealed = envelope.seal(plain, key, b"aad")
parts = [half(4154) for _ in range(64)]
ops = {
    "encode a 135 KB batch frame": (lambda: F.encode(small), 400),
    "encode a 1 MiB batch frame": (lambda: F.encode(big), 100),
    "seal a 64-write batch (zstd + AES-GCM)": (lambda: envelope.seal(plain, key, b"aad"), 200),
    "unseal it": (lambda: envelope.unseal(sealed, key, b"aad"), 200),
    "join 64 journal entries for one write": (lambda: b"".join(parts), 400),
}
for name, (fn, n) in ops.items():
    timed(name, fn, n)
print(json.dumps(out))
"""


def probe(mode: str) -> dict:
    res = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, timeout=600)
    return json.loads(res.stdout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    a = ap.parse_args(argv)
    runs: dict[str, list[dict]] = {"default": [], "tuned": []}
    for i in range(a.rounds):
        for mode in ("default", "tuned") if i % 2 == 0 else ("tuned", "default"):
            runs[mode].append(probe(mode))
    names = list(runs["default"][0])
    rows = []
    for n in names:
        d = statistics.median(r[n]["us"] for r in runs["default"])
        t = statistics.median(r[n]["us"] for r in runs["tuned"])
        fd = statistics.median(r[n]["faults"] for r in runs["default"])
        ft = statistics.median(r[n]["faults"] for r in runs["tuned"])
        rows.append({"op": n, "default_us": d, "tuned_us": t, "ratio": t / d, "default_faults": fd, "tuned_faults": ft})
    doc = {"git": git_state(ROOT), "loadavg": loadavg(), "rounds": a.rounds, "rows": rows, "runs": runs}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "malloc_tune.json").write_text(json.dumps(doc, indent=1))
    md = [f"# malloc thresholds on the batch path ({doc['git']}, load {doc['loadavg']}, {a.rounds} rounds)", "",
          "| operation | default µs | tuned µs | tuned / default | page faults, default → tuned |",
          "|---|---|---|---|---|"]
    md += [f"| {r['op']} | {r['default_us']:.1f} | {r['tuned_us']:.1f} | {r['ratio']:.2f} | "
           f"{r['default_faults']:.0f} → {r['tuned_faults']:.0f} |" for r in rows]
    (a.out / "malloc_tune.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        ys = range(len(rows))
        ax.barh([y + 0.2 for y in ys], [r["default_us"] for r in rows], 0.4, label="C library defaults")
        ax.barh([y - 0.2 for y in ys], [r["tuned_us"] for r in rows], 0.4, label="nicsplit.core.malloc.tune()")
        ax.set_yticks(list(ys), [r["op"] for r in rows], fontsize=8)
        ax.set_xlabel("CPU µs per operation (median of rounds)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(a.out / "malloc_tune.png", dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
