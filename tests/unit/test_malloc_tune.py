"""nicsplit.core.malloc: after `tune`, a batch-sized buffer made and freed
over and over is not faulted in again each time (glibc would otherwise
give it back to the kernel at every free). Counted as the process's minor
page faults in a fresh interpreter, with and without `tune`."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = r"""
import json, os, resource, sys
from nicsplit.core import malloc
tuned = malloc.tune() if sys.argv[1] == "tune" else None
from nicsplit.wire import frames as F
batch = F.Batch(1, "k", 1, 64, 1, 2, os.urandom(1 << 20))
F.encode(batch)
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    F.encode(batch)  # a 1 MiB frame: two transient 1 MiB buffers each
print(json.dumps({"tuned": tuned, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0}))
"""


def probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, timeout=60)
    return json.loads(out.stdout)


def test_tuned_process_keeps_batch_buffers_mapped() -> None:
    tuned, plain = probe("tune"), probe("plain")
    print(tuned, plain)
    assert tuned["tuned"] is True  # glibc (Debian): mallopt exists and takes both thresholds
    assert plain["faults"] > 50 * 256  # the untuned process faults each 4 KiB page of each buffer in again
    assert tuned["faults"] < 500
