"""Marking mode: the per-vdisk dirty-region bitmap (P1, P4).

When protection cannot keep up (card slow, full or gone), the splitter stops
waiting for the card and records which regions changed instead; a later
resync copies those regions. The bitmap and the state survive a host crash.

Rules:
- A region is marked *before* the write it covers is acknowledged to the
  client: each changed bitmap byte is written with ``os.pwrite`` at once (page
  cache: survives kill -9 of the host) and fsynced with the datastore's flush,
  so a flushed write's dirty bit is as durable as its data.
- Regions are ``REGION`` bytes (64 KiB): a 1 TiB vdisk needs 2 MiB of bitmap,
  and a resync copies at most 64 KiB per stray 4 KiB write.
- The state file (``protected`` / ``marking``, since, reason) is replaced
  atomically; the bitmap file is only ever updated byte-wise in place.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from nicsplit.core.fsutil import atomic_write

REGION = 64 * 1024


class DirtyMap:
    def __init__(self, directory: Path, vdisk_uuid: str, size: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.bitmap_path = directory / f"{vdisk_uuid}.bitmap"
        self.state_path = directory / f"{vdisk_uuid}.state.json"
        self.size = size
        nbytes = (size + REGION * 8 - 1) // (REGION * 8)
        self._fd = os.open(self.bitmap_path, os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(self._fd).st_size < nbytes:
            os.ftruncate(self._fd, nbytes)
        self._bits = bytearray(os.pread(self._fd, nbytes, 0).ljust(nbytes, b"\0"))
        try:
            st = json.loads(self.state_path.read_text())
        except (FileNotFoundError, ValueError):
            st = {"state": "protected", "since": time.time(), "reason": ""}
        self.state: str = st["state"]
        self.since: float = st["since"]
        self.reason: str = st.get("reason", "")

    @property
    def marking(self) -> bool:
        return self.state == "marking"

    def enter_marking(self, reason: str) -> None:
        if self.state == "marking":
            return
        self.state, self.since, self.reason = "marking", time.time(), reason
        self._save_state()

    def _save_state(self) -> None:
        atomic_write(self.state_path, json.dumps({"state": self.state, "since": self.since, "reason": self.reason}).encode())

    def mark(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        first = offset // REGION
        last = (offset + length - 1) // REGION
        bits = self._bits
        lo_byte = first >> 3
        hi_byte = last >> 3
        changed = False
        for r in range(first, last + 1):
            b, m = r >> 3, 1 << (r & 7)
            if not bits[b] & m:
                bits[b] |= m
                changed = True
        if changed:
            os.pwrite(self._fd, bytes(bits[lo_byte : hi_byte + 1]), lo_byte)

    def is_marked(self, offset: int, length: int) -> bool:
        """True when every region touched by the range is marked."""
        first, last = offset // REGION, (offset + length - 1) // REGION
        return all(self._bits[r >> 3] & (1 << (r & 7)) for r in range(first, last + 1))

    def regions(self) -> list[tuple[int, int]]:
        """Dirty ranges (offset, length), merged, clipped to the vdisk."""
        out: list[tuple[int, int]] = []
        nregions = (self.size + REGION - 1) // REGION
        r = 0
        while r < nregions:
            if self._bits[r >> 3] & (1 << (r & 7)):
                start = r
                while r < nregions and self._bits[r >> 3] & (1 << (r & 7)):
                    r += 1
                off = start * REGION
                out.append((off, min(r * REGION, self.size) - off))
            else:
                r += 1
        return out

    def dirty_bytes(self) -> int:
        return sum(n for _, n in self.regions())

    def sync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)
