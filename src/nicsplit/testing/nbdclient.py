"""libnbd clients of an image export, for tests: `connect` (with
base:allocation; ``strict=False`` lets requests a read-only export must
refuse reach the server), `block_status` over a whole export, `check_extents`
against a ledger (holes only where nothing was written, ZERO only over
zeros), and `segments_digest` to show a journal never changed."""

from __future__ import annotations

import hashlib
from pathlib import Path

from nicsplit.testing.procs import import_libnbd
from nicsplit.testing.workload import BS

HOLE, ZERO = 1, 2  # NBD_STATE_*


def connect(uri: str, *, strict: bool = True):
    nbd = import_libnbd()
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    if not strict:
        h.set_strict_mode(0)  # let requests a read-only export must refuse reach the server
    h.connect_uri(uri)
    return h


def block_status(h, size: int) -> list[tuple[int, int, int]]:
    """(offset, length, flags) over the whole export."""
    out: list[tuple[int, int, int]] = []
    pos = 0
    while pos < size:
        got: list[int] = []

        def cb(meta: str, off: int, entries: list[int], err: int) -> int:
            if meta == "base:allocation":
                got.extend(entries)
            return 0

        h.block_status(size - pos, pos, cb)
        assert got, "no base:allocation extents"
        for i in range(0, len(got), 2):
            n = min(got[i], size - pos)
            out.append((pos, n, got[i + 1]))
            pos += n
            if pos >= size:
                break
    return out


def check_extents(ext: list[tuple[int, int, int]], golden: bytes, written: set[int],
                  overlay: set[int] = frozenset()) -> None:
    """Holes only where the ledger never wrote; ZERO only over zeros (blocks
    an overlay touched may be either: a zeroed overlay block is a hole)."""
    assert sum(n for _, n, _ in ext) == len(golden)
    for off, n, flags in ext:
        if flags & ZERO:
            assert golden[off : off + n].count(0) == n, (off, n, flags)
        for b in range(off // BS, (off + n - 1) // BS + 1):
            if b in overlay:
                continue
            if flags & HOLE:
                assert b not in written, (off, n, flags, b)
            else:
                assert b in written, (off, n, flags, b)


def segments_digest(jd: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(jd.iterdir())}
