"""Points in time (PITs) of a CG journal.

A **PIT** is a committed batch boundary of a CG's journal: its seq is the
COMMIT's ``last_seq`` and its time the COMMIT's ``t_last_ns``.  The image of
every vdisk of the CG at a PIT is the journal prefix up to that seq, a prefix
of the CG's one write order (P2), hence crash-consistent across the CG — unless
the PIT falls inside a merge window of the card (docs/pipeline.md): then the
last record at or before it carries ``RFLAG_IN_WINDOW`` and the PIT is listed
with ``consistent=False`` (restore and image access refuse it).  The same
holds inside a protection gap: while a vdisk of the CG is marking or
resyncing the host sets ``WFlag.GAP`` on every record it ships, since the
journal lacks some acknowledged writes until the resync ends; a PIT whose
last record carries it is listed ``consistent=False`` with ``gap=True``.
The last PIT before the gap carries no flag and stays consistent.

Names for PITs (bookmarks) are `nicsplit.recovery.bookmarks`'.

Theory of operation
===================
`PitIndex` keeps every PIT of one journal in compact arrays, fed by the
journal's read-only scanner (`nicsplit.journal.scan.JournalScanner`: it
checks every entry's CRC, needs no key and no writer lock, and goes on
incrementally from the last COMMIT it saw).  A COMMIT that closes a damaged
stretch (docs/recovery.md §9) comes from the scanner with its `Damage`.

**Usable PITs.**  A PIT is *usable* iff its seq is below the first damaged
seq.  The lost records are unknown — their heads are among the damaged bytes
— so no later PIT can be shown not to need them: every PIT from the first
damage on is unusable (`PitIndex.check_usable` says why in one line), every
PIT before it is complete and byte-exact.

Rules
-----
1. Nothing here reads or writes journal bytes itself: the scanner does
   (its rules 1–3: committed batches only; a bad spot with no valid COMMIT
   after it stops the refresh there, ``PitIndex.stalled`` says where and why,
   and the next refresh tries again).
2. Damage found by any scan of this process is published (`known_damage`) so
   the record readers (`replica._RecordSource`) refuse records at or after
   it: a distributor or reader never silently skips lost records.

Example::

    idx = PitIndex(Layout(data).journal("cg1"))   # scans; idx.refresh() scans only what is new
    idx.latest(); idx.pit_at(time_ns); idx.pit_for_seq(1234)
"""

from __future__ import annotations

import bisect
import threading
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from nicsplit.core.records import RFLAG_IN_WINDOW, WFlag
from nicsplit.journal.format import SEGMENT_HEAD
from nicsplit.journal.scan import Commit, Damage, JournalScanner, RecordHead

__all__ = [
    "Pit", "PitError", "NoSuchPit", "UnusablePit", "PitIndex", "known_damage", "list_pits", "fmt_time",
]

T = TypeVar("T")

_GAP = int(WFlag.GAP)
_IN_WINDOW, _OK, _IN_GAP = 0, 1, 2  # PitIndex._consistent values


class PitError(Exception):
    """A point in time cannot be resolved or used (one clear line)."""


class NoSuchPit(PitError):
    """No PIT matches the request (seq, time, empty journal)."""


class UnusablePit(PitError):
    """The PIT needs records of a damaged stretch of the journal."""


@dataclass(frozen=True, slots=True)
class Pit:
    seq: int  # the COMMIT's last_seq
    time_ns: int  # the COMMIT's t_last_ns
    batch_id: int
    consistent: bool  # False inside a merge window (RFLAG_IN_WINDOW) or a protection gap (WFlag.GAP)
    usable: bool = True  # False at and after the first damaged stretch of the journal
    gap: bool = False  # inside a protection gap: a vdisk of the CG was marking or resyncing

    @property
    def time(self) -> float:
        return self.time_ns / 1e9


def fmt_time(t_ns: int) -> str:
    """A PIT time for messages: local time to the millisecond."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t_ns / 1e9)) + f".{t_ns % 10**9 // 10**6:03d}"


# Damage found by any scan of this process, per journal (rule 5): the first
# stretch (lowest first_seq) of each.  Journal files are write-once, so it is
# never cleared; a journal repaired by hand needs a new process.
_known: dict[Path, Damage] = {}
_known_lock = threading.Lock()


def _publish(journal_dir: Path, d: Damage) -> None:
    key = journal_dir.resolve()
    with _known_lock:
        cur = _known.get(key)
        if cur is None or d.first_seq < cur.first_seq:
            _known[key] = d


def known_damage(resolved_journal_dir: Path) -> Damage | None:
    """The first damaged stretch any scan of this process found in the
    journal at ``resolved_journal_dir`` (an absolute, resolved path)."""
    if not _known:
        return None
    return _known.get(resolved_journal_dir)


class PitIndex:
    """Every PIT of one journal, in seq order, in compact arrays (25 bytes
    per PIT).  `refresh()` adds what was committed since; thread-safe.

    ``on_batch(commit, records)`` is called for every committed batch as it is
    indexed (the replica block index builds itself from the same scan)."""

    def __init__(self, journal_dir: str | Path, *,
                 on_batch: Callable[[Commit, list[RecordHead]], None] | None = None) -> None:
        self.path = Path(journal_dir)
        if not self.path.is_dir():
            raise PitError(f"no journal at {self.path}")
        self._scanner = JournalScanner(self.path)
        self._on_batch = on_batch
        self._lock = threading.RLock()
        self._seq = array("Q")
        self._time = array("q")
        self._batch = array("Q")
        self._consistent = bytearray()  # per PIT: _OK, _IN_WINDOW or _IN_GAP
        self._last_in_window = False  # flag of the last record indexed
        self._last_in_gap = False  # WFlag.GAP on the last record indexed
        self._damage: list[Damage] = []
        self._unusable_from = 1 << 64  # the first damaged seq: PITs at or after it are unusable
        self.refresh()

    @property
    def stalled(self) -> str | None:
        """Why the last refresh stopped before the end of the files (rule 3), or None."""
        return self._scanner.stalled

    def refresh(self) -> int:
        """Index batches committed since the last refresh; returns how many."""
        with self._lock:
            n = 0
            for commit, recs in self._scanner.scan():
                self._index(commit, recs)
                n += 1
            return n

    def feed(self, commit: Commit, recs: list[RecordHead], start: tuple[int, int], end: tuple[int, int]) -> bool:
        """Index a batch that the journal writer of this process has just
        appended, from the writer's own record heads instead of reading the
        segment back (the appliance, after each append, under the CG's lock).
        Taken only when the scanner stands exactly where the batch's first
        entry starts (``start``, a (segment, offset)); ``end`` is the offset
        after its COMMIT.  False: nothing done, `refresh` reads it."""
        with self._lock:
            sc = self._scanner
            at = (sc.segment, sc.offset)
            if sc.stalled is not None or commit.first_seq <= sc.last_seq or not (
                    at == start or (start[1] == SEGMENT_HEAD.size and at == (start[0], 0))):
                return False
            sc.segment, sc.offset, sc.last_seq = end[0], end[1], commit.last_seq
            self._index(commit, recs)
            return True

    def _index(self, commit: Commit, recs: list[RecordHead]) -> None:
        """One committed batch into the PIT arrays (and ``on_batch``). Lock held."""
        if commit.damage is not None:
            # Its records are unknown, so is whether it ends inside a merge
            # window: not claimed consistent (it is unusable anyway).
            self._last_in_window = True
            self._damage.append(commit.damage)
            self._unusable_from = min(self._unusable_from, commit.damage.first_seq)
            _publish(self.path, commit.damage)
        if recs:
            self._last_in_window = bool(recs[-1].flags & RFLAG_IN_WINDOW)
            self._last_in_gap = bool(recs[-1].flags & _GAP)
        self._seq.append(commit.last_seq)
        self._time.append(commit.t_last_ns)
        self._batch.append(commit.batch_id)
        self._consistent.append(_IN_WINDOW if self._last_in_window else _IN_GAP if self._last_in_gap else _OK)
        if self._on_batch is not None:
            self._on_batch(commit, recs)

    def __len__(self) -> int:
        return len(self._seq)

    def newest_seq_with(self, read: Callable[[], T]) -> tuple[T, int]:
        """(``read()``, seq of the newest PIT, 0 if none), taken together under
        the lock `refresh` holds while it calls ``on_batch`` and publishes a
        PIT: what ``on_batch`` built and the PITs it built for agree."""
        with self._lock:
            return read(), (self._seq[-1] if self._seq else 0)

    def _pit(self, i: int) -> Pit:
        c = self._consistent[i]
        return Pit(self._seq[i], self._time[i], self._batch[i], c == _OK,
                   self._seq[i] < self._unusable_from, c == _IN_GAP)

    @property
    def damage(self) -> list[Damage]:
        """The damaged stretches found so far, in journal order."""
        with self._lock:
            return list(self._damage)

    def newest_usable(self, *, consistent: bool = True) -> Pit | None:
        """The newest usable (and consistent) PIT, None if there is none."""
        with self._lock:
            for i in range(bisect.bisect_left(self._seq, self._unusable_from) - 1, -1, -1):
                if self._consistent[i] == _OK or not consistent:
                    return self._pit(i)
        return None

    def check_usable(self, pit: Pit) -> None:
        """`UnusablePit` (one line: the damaged segment, the lost seqs, the
        newest usable PIT) unless every record up to ``pit`` is readable."""
        with self._lock:
            if pit.seq < self._unusable_from:
                return
            d = self._damage[0]
        ok = self.newest_usable()
        alt = (f"the newest usable point in time is seq {ok.seq} ({fmt_time(ok.time_ns)})" if ok is not None
               else "no earlier point in time is usable")
        raise UnusablePit(f"the point in time at seq {pit.seq} is unusable: {d.describe()}; {alt}")

    def list_pits(self) -> list[Pit]:
        with self._lock:
            return [self._pit(i) for i in range(len(self._seq))]

    def latest(self, *, consistent: bool = True) -> Pit:
        """The newest PIT (the newest consistent one unless ``consistent=False``)."""
        with self._lock:
            for i in range(len(self._seq) - 1, -1, -1):
                if self._consistent[i] == _OK or not consistent:
                    return self._pit(i)
        raise NoSuchPit(f"journal {self.path} holds no {'consistent ' if consistent else ''}point in time yet")

    def oldest(self) -> Pit:
        with self._lock:
            if not self._seq:
                raise NoSuchPit(f"journal {self.path} holds no point in time yet")
            return self._pit(0)

    def pit_for_seq(self, seq: int) -> Pit:
        """The PIT whose seq is exactly ``seq``, or NoSuchPit naming the nearest."""
        with self._lock:
            i = bisect.bisect_left(self._seq, seq)
            if i < len(self._seq) and self._seq[i] == seq:
                return self._pit(i)
            if not self._seq:
                raise NoSuchPit(f"no point in time at seq {seq}; the journal holds none yet")
            if i == 0:
                raise NoSuchPit(f"no point in time at seq {seq}; the oldest is {self._seq[0]}")
            if i == len(self._seq):
                raise NoSuchPit(f"no point in time at seq {seq}; the latest is {self._seq[-1]}")
            raise NoSuchPit(f"no point in time at seq {seq}; nearest are {self._seq[i - 1]} and {self._seq[i]}")

    def first_at_or_after(self, seq: int, *, consistent: bool = True) -> Pit | None:
        """The oldest (consistent) PIT with seq >= ``seq``, None if not journaled yet."""
        with self._lock:
            for i in range(bisect.bisect_left(self._seq, seq), len(self._seq)):
                if self._consistent[i] == _OK or not consistent:
                    return self._pit(i)
        return None

    def pit_at(self, time_ns: int, *, consistent: bool = True) -> Pit:
        """The latest (consistent) PIT whose time is <= ``time_ns``; NoSuchPit
        when ``time_ns`` is before the oldest PIT (outside retention)."""
        with self._lock:
            i = bisect.bisect_right(self._time, time_ns)  # times are non-decreasing across commits
            if not self._seq:
                raise NoSuchPit(f"no point in time at {fmt_time(time_ns)}; the journal holds none yet")
            if i == 0:
                raise NoSuchPit(f"time {fmt_time(time_ns)} ({time_ns / 1e9:.6f}) is before the oldest point in time "
                                f"{fmt_time(self._time[0])} ({self._time[0] / 1e9:.6f}, seq {self._seq[0]})")
            for j in range(i - 1, -1, -1):
                if self._consistent[j] == _OK or not consistent:
                    return self._pit(j)
            raise NoSuchPit(f"no consistent point in time at or before {fmt_time(time_ns)}")


def list_pits(journal_dir: str | Path) -> list[Pit]:
    """Every PIT of the journal at ``journal_dir``, oldest first."""
    return PitIndex(journal_dir).list_pits()
