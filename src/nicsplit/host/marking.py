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
- The state file (``protected`` / ``marking`` / ``resyncing`` /
  ``initializing``, since, reason, and ``cg``: the consistency group this
  vdisk's protection was established for, with ``initial`` while its first
  full copy is not done) is replaced atomically; the bitmap file is only ever updated
  byte-wise in place. Every state change is logged with its reason and told
  to the listeners (the host context's per-CG gap count).
- A resync (`nicsplit.host.resync`) *claims* the regions it copies and
  releases them once the card acked the copy: a region marked again while
  claimed (a client write the card refused, a card loss) keeps its bit.
- Initial sync (`begin_initial`): a vdisk that joins a CG while it already
  holds data has every allocated region marked and enters ``initializing``
  (a resync of the whole vdisk); protection counts as established for the
  CG (`established`) only once it ends ``protected``. A vdisk with no
  record of its CG (no state file, or one written before the record
  existed) that holds data gets this one-time full sync too: nothing proves
  the journal has its data (docs/operations.md).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable

from nicsplit.core.dirtymap import DirtyMap
from nicsplit.core.fsutil import atomic_write

log = logging.getLogger(__name__)

STATES = ("protected", "marking", "resyncing", "initializing")
COPYING = ("resyncing", "initializing")  # a resync copies the dirty regions


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
        self.state: str = st["state"] if st.get("state") in STATES else "marking"
        self.since: float = st["since"]
        self.reason: str = st.get("reason", "")
        self.cg: str | None = st.get("cg")  # the CG protection was established for (None: no record)
        self.initial: bool = bool(st.get("initial"))  # the initial sync for self.cg is not done
        self.recorded = "cg" in st  # a record of the CG (None: in none), not a file from before it
        self.name = vdisk_uuid  # for log lines; the splitter sets the vdisk's name
        self.listeners: list[Callable[["MarkingMap", str, str], None]] = []  # (map, old, new)
        self._claims: dict[int, bool] = {}  # region -> marked again while claimed

    @property
    def bitmap_path(self) -> Path:
        return self.bitmap.path

    @property
    def marking(self) -> bool:
        return self.state == "marking"

    @property
    def in_gap(self) -> bool:
        """Marking, resyncing or initializing: the journal lacks some acknowledged writes."""
        return self.state != "protected"

    @property
    def copying(self) -> bool:
        """Resyncing or initializing: a resync copies the dirty regions."""
        return self.state in COPYING

    def established(self, cg: str) -> bool:
        """True when this vdisk's protection was established for ``cg``: its
        initial sync for it ended (or it had nothing to copy)."""
        return self.cg == cg and not self.initial

    def begin_initial(self, cg: str, allocated: list[tuple[int, int]]) -> None:
        """The vdisk joins ``cg`` (or has no record of it) holding the
        ``allocated`` ranges: mark them all and enter ``initializing``; with
        nothing allocated it is protected for ``cg`` at once. The bitmap is
        durable before the state file says so (a crash in between redoes it)."""
        allocated = [(o, n) for o, n in allocated if n > 0]
        if not allocated:
            self.cg, self.initial = cg, False
            self._save_state()
            log.info("vdisk %s: protected for consistency group %s (no data to copy)", self.name, cg)
            return
        for off, n in allocated:
            self.mark(off, n)
        self.sync()
        self.cg, self.initial = cg, True
        why = (f"joined consistency group {cg}" if self.recorded else f"no record of consistency group {cg}") + \
            f": copying {self.dirty_bytes() / 2**20:.1f} MiB of allocated data"
        if self.state == "protected" or self.state == "resyncing":
            self._set("initializing", why)
        else:  # marking: the resync that follows is the initial sync
            self.reason = why
            self._save_state()

    def forget_cg(self) -> None:
        """The vdisk left every CG: its writes are no longer journalled, so
        joining again needs a full sync."""
        if self.cg is not None or not self.recorded:
            self.cg, self.initial = None, False
            self._save_state()

    def enter_marking(self, reason: str) -> None:
        if self.state == "marking":
            return
        self._set("marking", reason)

    def enter_resyncing(self, reason: str) -> None:
        """Marking -> resyncing (or initializing, while the initial sync is not done)."""
        if self.state != "marking":
            return
        self._set("initializing" if self.initial else "resyncing", reason)

    def enter_protected(self, reason: str) -> None:
        if self.state == "protected":
            return
        self.initial = False  # saved with the state: the CG's protection is established
        self._set("protected", reason)

    def _set(self, state: str, reason: str) -> None:
        old = self.state
        self.state, self.since, self.reason = state, time.time(), reason
        self._save_state()
        (log.warning if state == "marking" else log.info)(
            "vdisk %s: %s -> %s: %s (%.1f MiB dirty)", self.name, old, state, reason or "-", self.dirty_bytes() / 2**20)
        for f in self.listeners:
            f(self, old, state)

    def _save_state(self) -> None:
        st = {"state": self.state, "since": self.since, "reason": self.reason, "cg": self.cg}
        if self.initial:
            st["initial"] = True
        atomic_write(self.state_path, json.dumps(st).encode())
        self.recorded = True

    def mark(self, offset: int, length: int) -> None:
        """Mark the range and write the changed bitmap bytes at once (rule 1)."""
        self.bitmap.mark_and_write(offset, length)
        if self._claims and length > 0:
            region = self.bitmap.region
            for r in range(offset // region, (offset + length - 1) // region + 1):
                if r in self._claims:
                    self._claims[r] = True

    def claim(self, offset: int, length: int) -> None:
        """A resync is about to copy these regions (see `release`)."""
        region = self.bitmap.region
        for r in range(offset // region, (offset + length - 1) // region + 1):
            self._claims[r] = False

    def release(self, offset: int, length: int, copied: bool) -> int:
        """End a claim; with ``copied`` (the card acked the copy) clear every
        region not marked again meanwhile. Returns the regions cleared."""
        region = self.bitmap.region
        n = 0
        for r in range(offset // region, (offset + length - 1) // region + 1):
            again = self._claims.pop(r, True)
            if copied and not again and self.bitmap.clear_and_write(r * region, region):
                n += 1
        return n

    @property
    def claimed(self) -> int:
        """Regions a resync copies now (claimed, not yet released)."""
        return len(self._claims)

    def dirty_regions(self) -> int:
        return self.bitmap.count()

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


def forget(directory: Path, vdisk_uuid: str) -> list[Path]:
    """Remove a deleted vdisk's ``UUID.bitmap`` and ``UUID.state.json`` under
    ``directory``; the paths removed. Call it after the vdisk left the
    catalog (a crash in between leaves files no vdisk uses, never a vdisk
    without its dirty bitmap)."""
    gone = []
    for p in (directory / f"{vdisk_uuid}.bitmap", directory / f"{vdisk_uuid}.state.json"):
        try:
            p.unlink()
            gone.append(p)
        except FileNotFoundError:
            pass
    return gone
