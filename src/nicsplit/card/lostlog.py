"""The card's "lost writes" log: acknowledged writes the card could not ship.

The card acks a write in microseconds, so when it later has to drop one
(no outcome in time, vdisk unknown, refused while full) the host must still
learn that the region needs a resync (P1). The card appends one JSON line per
lost write to ``RUN_DIR/card-lost.jsonl`` (`Layout.card_lost_log`) *before* it releases the write's
hidden-volume space; the host reads the released watermark first and then the
log, so every write it stops tracking is either durable or listed here.

A line: ``{"io_id", "vdisk_id", "offset", "length", "reason", "time"}``.
Append-only; the host remembers how far it has read.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

class LostLog:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.count = 0

    def append(self, io_id: int, vdisk_id: int, offset: int, length: int, reason: str) -> None:
        line = json.dumps({"io_id": io_id, "vdisk_id": vdisk_id, "offset": offset, "length": length,
                           "reason": reason, "time": time.time()})
        os.write(self._fd, line.encode() + b"\n")  # one write(2) per line: never interleaved
        self.count += 1

    def close(self) -> None:
        os.close(self._fd)


class LostLogReader:
    """Host side: yields new complete lines since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._offset = 0
        self._partial = b""

    def read_new(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(chunk)
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()
        out = []
        for ln in lines:
            try:
                out.append(json.loads(ln))
            except ValueError:
                continue  # a torn line from a crashed card: its write is covered by the tracked list
        return out
