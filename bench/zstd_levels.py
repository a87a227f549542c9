#!/usr/bin/env python3
"""zstd level vs ratio and CPU on 4 KiB blocks of real files on this box,
batched as the card batches them (64 records of a 58-byte head + 4 KiB,
~256 KiB): what `compress_level` costs and saves beyond the benchmarks'
synthetic half-random data (docs/benchmarks.md). Prints a Markdown table.

    .venv/bin/python bench/zstd_levels.py [LEVEL ...]     (default: 1 -1 -3 3)

Seeded (the file order and the mixed stream); nothing asserts on speed.
"""
import glob
import os
import random
import statistics
import sys
import time

import zstandard

random.seed(20261203)
print("seed 20261203")
def blocks_of(paths, limit):
    out = []
    for p in paths:
        try:
            with open(p, 'rb') as f:
                d = f.read(1 << 20)
        except OSError:
            continue
        for i in range(0, len(d) - 4095, 4096):
            out.append(d[i:i + 4096])
            if len(out) >= limit:
                return out
    return out
sets = {
  "shared libs (.so)": sorted(glob.glob('/usr/lib/x86_64-linux-gnu/*.so*'))[:400],
  "executables (/usr/bin)": sorted(glob.glob('/usr/bin/*'))[:400],
  "python source (.py)": sorted(glob.glob('/usr/lib/python3*/**/*.py', recursive=True))[:2000],
  "python bytecode (.pyc)": sorted(glob.glob('/work/main/.venv/lib/python3*/site-packages/**/*.pyc', recursive=True))[:3000],
  "compressed (.gz/.xz/.zst/.whl/.jpg/.png)": sorted(sum((glob.glob(f'/usr/share/**/*.{e}', recursive=True) for e in ('gz','xz','png','jpg','zst')), []))[:3000],
  "docs/text (/usr/share/doc, man)": sorted(glob.glob('/usr/share/doc/**/*', recursive=True))[:3000],
}
data = {}
for k, paths in sets.items():
    paths = [p for p in paths if os.path.isfile(p)]
    random.shuffle(paths)
    b = blocks_of(paths, 4096)
    if len(b) >= 256:
        data[k] = b
print({k: len(v) for k, v in data.items()})
# a mixed "VM disk" stream: 1/5 zero blocks, the rest drawn from every set
mix = []
allb = [b for v in data.values() for b in v]
for i in range(8192):
    mix.append(bytes(4096) if random.random() < 0.2 else random.choice(allb))
data["mixed (20% zero blocks, rest of all above)"] = mix
half = [os.urandom(2048) + bytes(2048) for _ in range(4096)]
data["synthetic half random / half zero"] = half
head = os.urandom(58)
levels = [int(x) for x in (sys.argv[1:] or ["1", "-1", "-3", "3"])]
print("| data | blocks | " + " | ".join(f"level {l}: ratio, µs/4 KiB" for l in levels) + " |")
for k, bl in data.items():
    batches = [b"".join(head + x for x in bl[i:i + 64]) for i in range(0, len(bl) - 63, 64)]
    row = []
    for l in levels:
        z = zstandard.ZstdCompressor(level=l, write_content_size=True)
        ts = []
        for _ in range(3):
            t0 = time.process_time(); out = sum(len(z.compress(b)) for b in batches); ts.append(time.process_time() - t0)
        n = len(batches) * 64
        row.append(f"{sum(len(b) for b in batches) / out:.2f}, {1e6 * statistics.median(ts) / n:.1f}")
    print(f"| {k} | {len(batches) * 64} | " + " | ".join(row) + " |")
