"""Marking mode: the per-vdisk dirty-region bitmap (P1, P4).

When protection cannot keep up (card slow, full or gone), the splitter stops
waiting for the card and records which regions changed instead; a later
resync copies those regions. The bitmap and the state survive a host crash.

Rules:
- A region is marked *before* the write it covers is acknowledged to the
  client: each changed bitmap byte is written with ``os.pwrite`` at once (page
  cache: survives kill -9 of the host) and fsynced with the datastore's flush,
  so a flushed write's dirty bit is as durable as its data.
- The bitmap is `nicsplit.core.dirtymap.DirtyMap` (64 KiB regions), the same
  file format the failover site writes; failback reads both.
- The state file (``protected`` / ``marking``, since, reason) is replaced
  atomically; the bitmap file is only ever updated byte-wise in place.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from nicsplit.core.dirtymap import DirtyMap
from nicsplit.core.fsutil import atomic_write


class MarkingMap:
    """One vdisk's marking state and dirty bitmap under ``directory``
    (`nicsplit.core.layout.Layout.marking`): ``UUID.bitmap`` and ``UUID.state.json``."""

    def __init__(self, directory: Path, vdisk_uuid: str, size: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.bitmap = DirtyMap(directory / f"{vdisk_uuid}.bitmap", size)
        self.state_path = directory / f"{vdisk_uuid}.state.json"
        self.size = size
        try:
            st = json.loads(self.state_path.read_text())
        except (FileNotFoundError, ValueError):
            st = {"state": "protected", "since": time.time(), "reason": ""}
        self.state: str = st["state"]
        self.since: float = st["since"]
        self.reason: str = st.get("reason", "")

    @property
    def bitmap_path(self) -> Path:
        return self.bitmap.path

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
        """Mark the range and write the changed bitmap bytes at once (rule 1)."""
        self.bitmap.mark_and_write(offset, length)

    def is_marked(self, offset: int, length: int) -> bool:
        """True when every region touched by the range is marked."""
        return self.bitmap.is_marked(offset, length)

    def regions(self) -> list[tuple[int, int]]:
        """Dirty ranges (offset, length), merged, clipped to the vdisk."""
        return self.bitmap.runs()

    def dirty_bytes(self) -> int:
        return self.bitmap.dirty_bytes()

    def sync(self) -> None:
        self.bitmap.sync()

    def close(self) -> None:
        self.bitmap.close()
