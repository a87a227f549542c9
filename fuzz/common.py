"""Shared by the atheris targets in this directory (`make fuzz`).

Each target's rule (h11's, as the Hypothesis fuzz tests in tests/unit):
a decoder parses, or raises its protocol error — never anything else. An
exception of another type escapes the target and atheris reports it with
the input that caused it (saved as crash-<sha1> in the working directory).

Run one by hand::

    python fuzz/fuzz_frames.py -max_total_time=60 [corpus_dir]
"""

from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
from pathlib import Path

import atheris


def chunks(fdp: "atheris.FuzzedDataProvider", data_len: int) -> list[bytes]:
    """The rest of the input, cut where the input says (a stream arrives in pieces)."""
    cuts = sorted({fdp.ConsumeIntInRange(0, data_len) for _ in range(fdp.ConsumeIntInRange(0, 4))})
    body = fdp.ConsumeBytes(data_len)
    out, prev = [], 0
    for c in [*cuts, len(body)]:
        c = min(c, len(body))
        if c > prev:
            out.append(body[prev:c])
            prev = c
    return out


def run(test_one_input, seeds: list[bytes] = ()) -> None:
    """Fuzz; ``seeds`` (valid inputs, so mutations start deep in the protocol)
    go into a fresh corpus directory unless the command line names one."""
    argv = list(sys.argv)
    if seeds and not any(not a.startswith("-") for a in argv[1:]):
        corpus = tempfile.mkdtemp(prefix="fuzz-corpus-")
        atexit.register(shutil.rmtree, corpus, True)
        for i, s in enumerate(seeds):
            Path(corpus, f"seed-{i}").write_bytes(s)
        argv.append(corpus)
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()
