#!/usr/bin/env python3
"""What one 4 KiB record costs at each step of the appliance's ingest, on CPU
time: the batch unseal, the one-pass record decode, the fingerprint, the
per-record at-rest seal (and the part of it that is the AES-GCM call and the
entry CRC), the record head for the index feed, and — for a batch-sealed
journal format (docs/benchmarks.md, "version 3") — one AES-GCM call and one
checksum over the whole batch instead.  Medians of ``--rounds``.

    .venv/bin/python bench/ingest_parts.py [--records 256] [--rounds 7]
"""

from __future__ import annotations

import argparse
import itertools
from itertools import repeat
import os
import statistics
import sys
import time
import zlib

import xxhash
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from nicsplit.core.records import Op
from nicsplit.journal.format import seal_record_entries_into, seal_record_entry, sealed_entries_size
from nicsplit.journal.scan import RecordHead
from nicsplit.wire import envelope, frames as F
from nicsplit.wire.wirerecords import decode_wire_records

BS = 4096
HEAD_COLS = {0, 2, 3, 4, 5, 6, 7}  # a WireRecord's seq, vdisk_id, op, flags, offset, length, time_ns


def per_record(fn, n: int, reps: int) -> float:
    """µs of CPU per record of ``fn()`` (which handles ``n`` records)."""
    c0 = time.process_time()
    for _ in range(reps):
        fn()
    return 1e6 * (time.process_time() - c0) / (reps * n)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args(argv)
    n = a.records
    key = os.urandom(32)
    meta = F.Batch(1, "k", 1, n, 1, n, b"")
    # 16 distinct batches (16 MiB at 256 records), used in turn: one batch over
    # and over would sit in the cache, which a real stream's never does.
    bodies = []
    for _ in range(16):
        recs = [F.Record(s, s, 1, Op.WRITE, 0, s * BS, BS, s, os.urandom(BS // 2) + bytes(BS // 2))
                for s in range(1, n + 1)]  # half random, half zeros: zstd halves each
        bodies.append(envelope.seal(F.encode_records(recs), key, F.batch_aad(meta)))
    plains = [envelope.unseal(b, key, F.batch_aad(meta)) for b in bodies]
    turn = itertools.count()
    plain = plains[0]
    wires = decode_wire_records(plain)
    cipher = AESGCM(os.urandom(32))
    nonces = os.urandom(12 * n)
    sealed = [seal_record_entry(cipher, 24 + i * 4200, w.wire, nonces[12 * i : 12 * i + 12]) for i, w in enumerate(wires)]
    whole = memoryview(plain)[4:]
    batch_buf = bytearray(sealed_entries_size([w.wire for w in wires]))  # reused, as the journal writer does
    aad = bytes(74)

    steps = {
        "unseal (batch AES-GCM + zstd)": lambda: envelope.unseal(bodies[next(turn) % 16], key, F.batch_aad(meta)),
        "decode_wire_records": lambda: decode_wire_records(plains[next(turn) % 16]),
        "fingerprint (xxh3-128)": lambda: [F.fingerprint(w.data) for w in wires],
        "seal_record_entry (all of it)": lambda: [seal_record_entry(cipher, 24, w.wire, nonces[:12]) for w in wires],
        "seal_record_entries_into (batch buffer)": lambda: seal_record_entries_into(cipher, 24, [w.wire for w in wires],
                                                                                    nonces, batch_buf),
        "  the same into a fresh buffer": lambda: seal_record_entries_into(
            cipher, 24, [w.wire for w in wires], nonces, bytearray(sealed_entries_size([w.wire for w in wires]))),
        "  of which AESGCM.encrypt": lambda: [cipher.encrypt(nonces[:12], w.wire[58:], aad) for w in wires],
        "  of which entry CRC-32": lambda: [zlib.crc32(s) for s in sealed],
        "(before) join entries (one write)": lambda: b"".join(sealed),
        "RecordHeads (index feed, as the writer)": lambda: list(map(
            tuple.__new__, repeat(RecordHead), zip(*(c for i, c in enumerate(zip(*wires)) if i in HEAD_COLS),
                                                   repeat(1), range(24, 24 + 4200 * n, 4200)))),
        "v3: one AESGCM.encrypt per batch": lambda: cipher.encrypt(nonces[:12], whole, aad),
        "v3: one CRC-32 per batch": lambda: zlib.crc32(whole),
        "v3: one xxh3-64 per batch": lambda: xxhash.xxh3_64_intdigest(whole),
    }
    res: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(a.rounds):
        for k, fn in steps.items():
            res[k].append(per_record(fn, n, a.reps))
    print(f"{n} records of 4 KiB per batch; µs of CPU per record, median of {a.rounds} (min–max)")
    for k, xs in res.items():
        print(f"  {k:36s} {statistics.median(xs):7.2f} ({min(xs):.2f}–{max(xs):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
