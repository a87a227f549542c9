"""Consistency-group sequence numbers, assigned on the host.

All vdisks of a CG share one counter; the splitter takes the next number as a
write enters the filter, so the CG's order is the order the host saw.

Rules:
- Numbers only grow, also across host restarts and crashes: the host persists
  a *reservation* (the highest number it may hand out) before handing out
  numbers under it, and a restart continues above the last reservation. A
  crash can therefore leave a gap, never a repeat; consumers must not assume
  gap-free numbering (a write the card refuses at its ack leaves one). A
  write that never reaches the card (marked, or refused at submission) takes
  no number, or gives it back at once (`unget`): the card's hold stage waits
  up to its outcome timeout for a missing seq before skipping it.
- One fsync per ``RESERVE`` numbers: 2^16 at ~100k writes/s is one fsync per
  0.65 s, noise on the write path.
"""

from __future__ import annotations

import json
from pathlib import Path

from nicsplit.core.fsutil import atomic_write

RESERVE = 1 << 16


class Sequencer:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            reserved = int(json.loads(path.read_text())["reserved"])
        except FileNotFoundError:
            reserved = 0
        self._next = reserved + 1
        self._reserved = reserved
        self._reserve()

    def _reserve(self) -> None:
        self._reserved = self._next + RESERVE - 1
        atomic_write(self.path, json.dumps({"reserved": self._reserved}).encode())

    def next(self) -> int:
        n = self._next
        if n > self._reserved:
            self._reserve()
        self._next = n + 1
        return n

    def unget(self, n: int) -> bool:
        """Give back ``n`` if it is the last number handed out (a write that
        never reached the card, in the same synchronous step): the card's hold
        stage then waits for no seq that will never come."""
        if n != self._next - 1:
            return False
        self._next = n
        return True

    @property
    def last(self) -> int:
        return self._next - 1
