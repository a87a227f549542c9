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

from nicsplit.core.fsutil import atomic_write

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
    """Host side: yields new complete lines since the last call. With
    ``state`` (a small JSON file: the log's inode and the offset read and
    acted on), a host restart goes on where the last one stopped instead of
    re-reading every line the card ever wrote; `commit` records progress once
    what was read is safely marked."""

    def __init__(self, path: Path, state: Path | None = None) -> None:
        self.path = Path(path)
        self.state = None if state is None else Path(state)
        self._offset = 0
        self._ino = 0
        self._partial = b""
        if self.state is not None:
            try:
                st = json.loads(self.state.read_text())
                cur = os.stat(self.path)
                if st.get("ino") == cur.st_ino and 0 <= int(st.get("offset", 0)) <= cur.st_size:
                    self._offset, self._ino = int(st["offset"]), cur.st_ino
            except (OSError, ValueError, TypeError, AttributeError):
                pass  # no state, or another log: read it all (marking twice is safe)

    def read_new(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                ino = os.fstat(f.fileno()).st_ino
                if ino != self._ino:  # a new log (the card's run dir was cleared): from its start
                    self._ino, self._offset, self._partial = ino, 0, b""
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

    def commit(self) -> None:
        """Record how far the lines read are acted on (call after marking them durably)."""
        if self.state is not None:
            done = self._offset - len(self._partial)
            atomic_write(self.state, json.dumps({"ino": self._ino, "offset": done}).encode(), 0o600)
