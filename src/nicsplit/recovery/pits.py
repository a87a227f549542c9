"""Points in time (PITs) of a CG journal, and bookmarks.

A **PIT** is a committed batch boundary of a CG's journal: its seq is the
COMMIT's ``last_seq`` and its time the COMMIT's ``t_last_ns``.  The image of
every vdisk of the CG at a PIT is the journal prefix up to that seq, a prefix
of the CG's one write order (P2), hence crash-consistent across the CG — unless
the PIT falls inside a merge window of the card (docs/pipeline.md): then the
last record at or before it carries ``RFLAG_IN_WINDOW`` and the PIT is listed
with ``consistent=False`` (restore and image access refuse it).

A **bookmark** is a name for a PIT seq, kept per CG in
``DATA/appliance/bookmarks/<cg>.json`` (docs/recovery.md §2).

Theory of operation
===================
`JournalScanner` reads the segments of a journal *read-only* (docs/journal.md
§1 byte layout), without the writer's lock, without a key and without the
cost of `Journal.open` (which decodes, decrypts and fingerprints every data
block): it checks every entry's CRC (the read-ahead brings the payloads in
anyway; CRC-32 costs ≈ 0.3 ms per MiB) and parses entry heads and record heads
(in clear in sealed segments too).  It emits a batch only when its COMMIT
entry is complete and its CRC verifies, so a batch being written concurrently
(or a torn tail before the writer's recovery cut it) is never seen.  It
remembers (segment, offset) after the last COMMIT and the next `scan()` goes
on from there: refreshing is incremental.

**Damage** (docs/recovery.md §9).  At a bad spot (segment header, entry head,
entry CRC, a record or COMMIT that does not fit) the scanner searches on for
the next valid COMMIT entry — its head prefix, its CRC, seqs after the last
good PIT, and a well-formed entry (or the end of the file) after it.  Found:
the stretch from the last good COMMIT to that one is *damaged*; the scanner
records a `Damage` (segment, offset, why, seqs ``first_seq..last_seq``),
emits that COMMIT's PIT with no records and goes on after it, so later PITs
are still listed.  Not found: it is the tail (being written, or torn by a
crash and cut at the writer's next open) and the scan waits there.

**Usable PITs.**  A PIT is *usable* iff its seq is below the first damaged
seq.  The lost records are unknown — their heads are among the damaged bytes
— so no later PIT can be shown not to need them: every PIT from the first
damage on is unusable (`PitIndex.check_usable` says why in one line), every
PIT before it is complete and byte-exact.

Rules
-----
1. Nothing here writes a journal file.  The scanner never trusts anything
   after the last COMMIT whose CRC verifies, except across a damaged stretch
   closed by a valid COMMIT (above).
2. Every entry's CRC is checked by the scanner; payloads are decoded (and
   decrypted) only by the readers (`Journal.read_entry`,
   `journal.SegmentReader`), which check the CRC again and authenticate
   sealed records: an entry altered *with* a matching CRC shows up there, as
   `JournalCorrupt` naming segment and offset.
3. A bad spot without a valid COMMIT after it stops the scan there; the PITs
   before it stay usable, ``PitIndex.stalled`` says where and why, and the
   next refresh tries again from the last COMMIT (a torn tail is cut by the
   writer's next open).  A bad spot can only be called damage from bytes
   that are complete: in the segment being written, only what the first
   ``fstat`` showed is searched; later segments only once this one is final
   (a later segment exists — the writer syncs a segment before it starts the
   next — and its size did not change).
4. Bookmark files are replaced atomically (tmp, fsync, rename, fsync dir)
   under an flock, read-modify-write; names are unique per CG.
5. Damage found by any scan of this process is published (`known_damage`) so
   the record readers (`replica._RecordSource`) refuse records at or after
   it: a distributor or reader never silently skips lost records.

Example::

    idx = PitIndex(journal_dir)          # scans; idx.refresh() scans only what is new
    idx.latest(); idx.pit_at(time_ns); idx.pit_for_seq(1234)
    add_bookmark(data, "cg1", "before-upgrade", idx.latest().seq, locked=True)
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import json
import os
import re
import struct
import threading
import time
import zlib
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from nicsplit.core.fsutil import atomic_write
from nicsplit.journal.writer import JournalCorrupt, parse_segment_head
from nicsplit.core.records import RFLAG_IN_WINDOW
from nicsplit.core.records import Op
from nicsplit.wire.frames import RECORD_HEAD_SIZE

__all__ = [
    "Pit", "RecordHead", "Commit", "Damage", "PitError", "NoSuchPit", "UnusablePit", "BookmarkError", "JournalScanner",
    "PitIndex", "known_damage",
    "list_pits", "Bookmark", "add_bookmark", "list_bookmarks", "get_bookmark", "bookmarks_path", "RFLAG_IN_WINDOW",
]

# -- on-disk layouts (docs/journal.md §1; journal.py holds the writer's copy) --------
# The segment header is parsed by journal.parse_segment_head (versions 1 and 2).

_ENTRY = struct.Struct(
    ">"
    "I"  # size: payload bytes after the head
    "B"  # tag: 1 RECORD, 2 COMMIT
    "3s"  # padding: zero
    "I"  # crc: zlib.crc32(head[0:8] || payload)
)
assert _ENTRY.size == 12
_TAG_RECORD = 1
_TAG_COMMIT = 2

_COMMIT = struct.Struct(
    ">"
    "Q"  # batch_id
    "Q"  # first_seq: first seq this commit applies
    "Q"  # last_seq: the PIT's seq
    "Q"  # t_first_ns
    "Q"  # t_last_ns: the PIT's time
    "I"  # records: RECORD entries since the previous COMMIT
)
assert _COMMIT.size == 44

_RECORD_HEAD = struct.Struct(
    ">"
    "Q"  # seq
    "Q"  # io_id
    "Q"  # vdisk_id
    "B"  # op: Op
    "B"  # flags: WFlag | RFLAG_IN_WINDOW
    "Q"  # offset: virtual byte offset
    "Q"  # length
    "q"  # time_ns
    "I"  # nrefs
    "I"  # data_len
)  # the wire record head (docs/wire.md §3); refs and data follow
assert _RECORD_HEAD.size == RECORD_HEAD_SIZE == 58

# Read-ahead of the scanner: entry heads of small records come out of one
# pread; records larger than this are skipped with a single pread of the next
# head.  1 MiB = 256 full 4 KiB records per system call.
_READ_AHEAD = 4 << 20
_SEG_HEAD_SIZE = 24
_SEG_SUFFIX = ".seg"
# What every COMMIT entry head starts with (size 44, tag 2, zero padding):
# searched for after a bad spot to resynchronise.
_COMMIT_PREFIX = struct.pack(">IB3x", _COMMIT.size, _TAG_COMMIT)
_OPS = frozenset(int(o) for o in Op)


def _seg_name(n: int) -> str:
    return f"{n:08d}{_SEG_SUFFIX}"


class PitError(Exception):
    """A point in time cannot be resolved or used (one clear line)."""


class NoSuchPit(PitError):
    """No PIT matches the request (seq, time, empty journal)."""


class UnusablePit(PitError):
    """The PIT needs records of a damaged stretch of the journal."""


class BookmarkError(PitError):
    """Unknown, duplicate or badly named bookmark; unreadable bookmark file."""


@dataclass(frozen=True, slots=True)
class Pit:
    seq: int  # the COMMIT's last_seq
    time_ns: int  # the COMMIT's t_last_ns
    batch_id: int
    consistent: bool  # False inside a merge window (RFLAG_IN_WINDOW)
    usable: bool = True  # False at and after the first damaged stretch of the journal

    @property
    def time(self) -> float:
        return self.time_ns / 1e9


@dataclass(frozen=True, slots=True)
class RecordHead:
    """A committed record as the scanner sees it: the wire head fields and
    where its entry starts (for `Journal.read_entry`)."""

    seq: int
    vdisk_id: int
    op: int
    flags: int
    offset: int
    length: int
    time_ns: int
    segment: int
    pos: int


@dataclass(frozen=True, slots=True)
class Damage:
    """A stretch of a journal that could not be read, closed by a valid COMMIT."""

    path: str  # the journal directory
    segment: int  # where the first bad spot is
    offset: int
    why: str
    first_seq: int  # the first seq the stretch may hold: the previous PIT's seq + 1
    last_seq: int  # the seq of the COMMIT that closes it (a PIT, unusable)
    end_segment: int  # where that COMMIT is
    end_offset: int

    def describe(self) -> str:
        through = f" (the damaged stretch ends in {_seg_name(self.end_segment)})" if self.end_segment != self.segment else ""
        return (f"segment {_seg_name(self.segment)} of journal {self.path} is damaged at offset {self.offset} "
                f"({self.why}): seqs {self.first_seq}..{self.last_seq} are unreadable{through}")

    def to_json(self) -> dict:
        return {"segment": _seg_name(self.segment), "offset": self.offset, "why": self.why,
                "first_seq": self.first_seq, "last_seq": self.last_seq,
                "end_segment": _seg_name(self.end_segment), "end_offset": self.end_offset}


@dataclass(frozen=True, slots=True)
class Commit:
    batch_id: int
    first_seq: int
    last_seq: int
    t_first_ns: int
    t_last_ns: int
    records: int
    segment: int
    pos: int
    damage: Damage | None = None  # set on the COMMIT that closes a damaged stretch (its records are unknown)


def _fmt_time(t_ns: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t_ns / 1e9)) + f".{t_ns % 10**9 // 10**6:03d}"


class _Segment:
    """A segment file opened read-only: the size its first fstat showed (rule
    3 trusts nothing beyond it) and a read-ahead window."""

    __slots__ = ("fd", "size", "_mem", "_buf", "_base")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = os.fstat(fd).st_size
        self._mem = bytearray()
        self._buf = memoryview(b"")
        self._base = 0

    def get(self, at: int, n: int) -> memoryview:
        """``n`` bytes at ``at`` (fewer at the end of the file).  The view is
        valid until the next call: the window is one buffer, reused, because
        a fresh allocation per read costs more (page faults) than the copy."""
        if not (self._base <= at and at + n <= self._base + len(self._buf)):
            want = max(n, _READ_AHEAD)
            if len(self._mem) < want:
                self._mem = bytearray(want)
            self._base = at
            k = os.preadv(self.fd, [memoryview(self._mem)[:want]], at)
            self._buf = memoryview(self._mem)[:k]
        return self._buf[at - self._base : at - self._base + n]


def _plausible_next(buf: bytes, at: int) -> bool:
    """After a candidate COMMIT: the end of what we have, or a well-formed entry head."""
    if len(buf) - at < _ENTRY.size:
        return True
    size, tag, pad, _ = _ENTRY.unpack_from(buf, at)
    return pad == b"\0\0\0" and (tag == _TAG_RECORD or (tag == _TAG_COMMIT and size == _COMMIT.size))


def _find_commit(buf: bytes, start: int, last: int) -> tuple[int, tuple] | None:
    """(offset, fields) of the first valid COMMIT entry in ``buf`` at or after
    ``start`` that can follow PIT seq ``last``."""
    while True:
        i = buf.find(_COMMIT_PREFIX, start)
        if i < 0 or i + _ENTRY.size + _COMMIT.size > len(buf):
            return None
        (crc,) = struct.unpack_from(">I", buf, i + 8)
        body = buf[i + _ENTRY.size : i + _ENTRY.size + _COMMIT.size]
        if zlib.crc32(body, zlib.crc32(buf[i : i + 8])) == crc:
            c = _COMMIT.unpack(body)
            if c[1] > last and c[2] >= c[1] and _plausible_next(buf, i + _ENTRY.size + _COMMIT.size):
                return i, c
        start = i + 1


def _first_segment(path: Path, after: int) -> int | None:
    """The lowest segment number > ``after`` in the journal directory."""
    try:
        stems = [n[: -len(_SEG_SUFFIX)] for n in os.listdir(path) if n.endswith(_SEG_SUFFIX)]
        nums = [int(n) for n in stems if n.isdigit()]
    except FileNotFoundError:
        return None
    later = [n for n in nums if n > after]
    return min(later) if later else None


class JournalScanner:
    """Incremental read-only parser of a journal's segments (rules 1–3)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.segment = 1  # where the next scan starts: after the last COMMIT seen
        self.offset = 0  # 0 = the segment header is not checked yet
        self.last_seq = 0
        self.stalled: str | None = None  # rule 3: why the last scan stopped before the end of the files
        self.damage: list[Damage] = []  # damaged stretches passed so far, in journal order

    def scan(self) -> Iterator[tuple[Commit, list[RecordHead]]]:
        """Every batch committed since the previous scan, in order (a COMMIT
        closing a damaged stretch comes with no records and ``damage`` set)."""
        self.stalled = None
        seg, pos = self.segment, self.offset
        pending: list[RecordHead] = []
        last = self.last_seq
        while True:
            try:
                fd = os.open(self.path / _seg_name(seg), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                # Retention deletes segments from the oldest end (journal.py rule
                # 10): the journal now starts at a later segment; go on there.
                first = _first_segment(self.path, after=seg)
                if first is None:
                    return
                seg, pos, pending = first, 0, []
                self.segment, self.offset = seg, 0
                continue
            try:
                f = _Segment(fd)
                # (offset, why, wait): wait = the bytes may still be being written
                bad: tuple[int, str, bool] | None = None
                if pos == 0:
                    head = f.get(0, _SEG_HEAD_SIZE)
                    if len(head) < _SEG_HEAD_SIZE:
                        bad = (0, f"segment header truncated ({len(head)} bytes)", True)  # being created?
                    else:
                        try:
                            _, why = parse_segment_head(head, seg, f"journal {self.path}: {_seg_name(seg)}")
                        except JournalCorrupt as e:  # intact, but not a format we read: no way past it
                            self.stalled = str(e)
                            return
                        if why:
                            bad = (0, why, False)
                        else:
                            pos = _SEG_HEAD_SIZE
                while bad is None and pos < f.size:
                    if pos + _ENTRY.size > f.size:
                        bad = (pos, "truncated entry head", True)
                        break
                    head = bytes(f.get(pos, _ENTRY.size))
                    esize, tag, pad, ecrc = _ENTRY.unpack(head)
                    end = pos + _ENTRY.size + esize
                    if pad != b"\0\0\0" or tag not in (_TAG_RECORD, _TAG_COMMIT):
                        bad = (pos, f"bad entry head (tag {tag})", False)
                        break
                    if end > f.size:
                        bad = (pos, f"entry of {esize} bytes runs past the end of the segment", True)
                        break
                    payload = f.get(pos + _ENTRY.size, esize)
                    if zlib.crc32(payload, zlib.crc32(head[:8])) != ecrc:
                        bad = (pos, "entry CRC mismatch" if tag == _TAG_RECORD else
                               "COMMIT entry fails its CRC (torn tail, or being written)", False)
                        break
                    if tag == _TAG_RECORD:
                        if esize < _RECORD_HEAD.size:
                            bad = (pos, "record entry shorter than a record head", False)
                            break
                        rseq, _io, vdisk, op, flags, off, length, t_ns, nrefs, dlen = _RECORD_HEAD.unpack_from(payload)
                        prev = pending[-1].seq if pending else last
                        if rseq <= prev or op not in _OPS:
                            bad = (pos, f"record seq {rseq} op {op} does not follow seq {prev}", False)
                            break
                        pending.append(RecordHead(rseq, vdisk, op, flags, off, length, t_ns, seg, pos))
                    else:
                        if esize != _COMMIT.size:
                            bad = (pos, f"COMMIT of {esize} bytes", False)
                            break
                        bid, first, lseq, t_first, t_last, nrec = _COMMIT.unpack(payload)
                        if nrec != len(pending) or lseq < first or first <= last or any(
                                not first <= r.seq <= lseq for r in pending):
                            bad = (pos, f"COMMIT of batch {bid} (seqs {first}..{lseq}, {nrec} records) "
                                        f"does not match the {len(pending)} records before it", False)
                            break
                        batch = pending
                        pending = []
                        last = self.last_seq = lseq
                        self.segment, self.offset = seg, end
                        yield Commit(bid, first, lseq, t_first, t_last, nrec, seg, pos), batch
                    pos = end
                if bad is not None:
                    found = self._resync(f, seg, bad[0], last)
                    if found is None:  # the tail: being written, or torn (rule 3)
                        if not bad[2]:
                            self._stop(seg, bad[0], bad[1])
                        return
                    cseg, cpos, (bid, first, lseq, t_first, t_last, nrec) = found
                    d = Damage(str(self.path), seg, bad[0], bad[1], last + 1, lseq, cseg, cpos)
                    self.damage.append(d)
                    pending = []
                    last = self.last_seq = lseq
                    self.segment, self.offset = cseg, cpos + _ENTRY.size + _COMMIT.size
                    yield Commit(bid, first, lseq, t_first, t_last, nrec, cseg, cpos, d), []
                    seg, pos = self.segment, self.offset
                    continue
            finally:
                os.close(fd)
            # End of this segment: a following one continues the journal (a batch
            # may span segments, its COMMIT in the last one). Look for the next
            # one *before* re-checking this one's size: the writer completes (and
            # syncs) a segment before it creates the next, so if the next exists,
            # this size is final; if this one grew meanwhile, read the rest first.
            next_exists = (self.path / _seg_name(seg + 1)).exists()
            try:
                grown = os.stat(self.path / _seg_name(seg)).st_size > f.size
            except FileNotFoundError:  # trimmed under us: the open above follows it
                grown = False
            if grown:
                continue
            if not next_exists:
                return
            seg, pos = seg + 1, 0
            if not pending:
                self.segment, self.offset = seg, 0

    def _resync(self, f: _Segment, seg: int, pos: int, last: int) -> tuple[int, int, tuple] | None:
        """(segment, offset, fields) of the first valid COMMIT after the bad
        spot at (seg, pos) that can close a damaged stretch after PIT seq
        ``last``; None when there is none yet (rule 3)."""
        if f.size > pos + 1:
            buf = os.pread(f.fd, f.size - pos - 1, pos + 1)  # only what the first fstat showed
            hit = _find_commit(buf, 0, last)
            if hit is not None:
                return seg, pos + 1 + hit[0], hit[1]
        # Later segments only once this one is final: the writer syncs a segment
        # before it creates the next, so then nothing is still being written here.
        if not (self.path / _seg_name(seg + 1)).exists() or os.fstat(f.fd).st_size != f.size:
            return None
        s = seg + 1
        while True:
            try:
                with open(self.path / _seg_name(s), "rb") as g:
                    buf = g.read()
            except FileNotFoundError:
                return None
            hit = _find_commit(buf, 0, last)
            if hit is not None:
                return s, hit[0], hit[1]
            s += 1

    def _stop(self, seg: int, pos: int, why: str) -> None:
        # Not sticky: after a crash this may be a torn tail that the writer cuts
        # at its next open (then the next scan goes on); committed damage makes
        # the writer's Journal.open fail loudly (docs/journal.md §3).
        self.stalled = f"journal {self.path}: {_seg_name(seg)} offset {pos}: {why}"


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
        self._consistent = bytearray()
        self._last_in_window = False  # flag of the last record indexed
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
                if commit.damage is not None:
                    # Its records are unknown, so is whether it ends inside a merge
                    # window: not claimed consistent (it is unusable anyway).
                    self._last_in_window = True
                    self._damage.append(commit.damage)
                    self._unusable_from = min(self._unusable_from, commit.damage.first_seq)
                    _publish(self.path, commit.damage)
                if recs:
                    self._last_in_window = bool(recs[-1].flags & RFLAG_IN_WINDOW)
                self._seq.append(commit.last_seq)
                self._time.append(commit.t_last_ns)
                self._batch.append(commit.batch_id)
                self._consistent.append(0 if self._last_in_window else 1)
                if self._on_batch is not None:
                    self._on_batch(commit, recs)
                n += 1
            return n

    def __len__(self) -> int:
        return len(self._seq)

    def _pit(self, i: int) -> Pit:
        return Pit(self._seq[i], self._time[i], self._batch[i], bool(self._consistent[i]),
                   self._seq[i] < self._unusable_from)

    @property
    def damage(self) -> list[Damage]:
        """The damaged stretches found so far, in journal order."""
        with self._lock:
            return list(self._damage)

    def newest_usable(self, *, consistent: bool = True) -> Pit | None:
        """The newest usable (and consistent) PIT, None if there is none."""
        with self._lock:
            for i in range(bisect.bisect_left(self._seq, self._unusable_from) - 1, -1, -1):
                if self._consistent[i] or not consistent:
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
        alt = (f"the newest usable point in time is seq {ok.seq} ({_fmt_time(ok.time_ns)})" if ok is not None
               else "no earlier point in time is usable")
        raise UnusablePit(f"the point in time at seq {pit.seq} is unusable: {d.describe()}; {alt}")

    def list_pits(self) -> list[Pit]:
        with self._lock:
            return [self._pit(i) for i in range(len(self._seq))]

    def latest(self, *, consistent: bool = True) -> Pit:
        """The newest PIT (the newest consistent one unless ``consistent=False``)."""
        with self._lock:
            for i in range(len(self._seq) - 1, -1, -1):
                if self._consistent[i] or not consistent:
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
                if self._consistent[i] or not consistent:
                    return self._pit(i)
        return None

    def pit_at(self, time_ns: int, *, consistent: bool = True) -> Pit:
        """The latest (consistent) PIT whose time is <= ``time_ns``; NoSuchPit
        when ``time_ns`` is before the oldest PIT (outside retention)."""
        with self._lock:
            i = bisect.bisect_right(self._time, time_ns)  # times are non-decreasing across commits
            if not self._seq:
                raise NoSuchPit(f"no point in time at {_fmt_time(time_ns)}; the journal holds none yet")
            if i == 0:
                raise NoSuchPit(f"time {_fmt_time(time_ns)} ({time_ns / 1e9:.6f}) is before the oldest point in time "
                                f"{_fmt_time(self._time[0])} ({self._time[0] / 1e9:.6f}, seq {self._seq[0]})")
            for j in range(i - 1, -1, -1):
                if self._consistent[j] or not consistent:
                    return self._pit(j)
            raise NoSuchPit(f"no consistent point in time at or before {_fmt_time(time_ns)}")


def list_pits(journal_dir: str | Path) -> list[Pit]:
    """Every PIT of the journal at ``journal_dir``, oldest first."""
    return PitIndex(journal_dir).list_pits()


# -- bookmarks -------------------------------------------------------------------------

_NAME = re.compile(r"^[A-Za-z0-9._:@+-]{1,128}$")
BOOKMARKS_VERSION = 1


@dataclass(frozen=True, slots=True)
class Bookmark:
    name: str
    seq: int
    time_ns: int
    locked: bool  # retention never trims a locked bookmark's PIT
    created: float  # wall clock when it was added

    def to_json(self) -> dict:
        return {"name": self.name, "seq": self.seq, "time_ns": self.time_ns, "locked": self.locked,
                "created": self.created}


def bookmarks_path(data: str | Path, cg: str) -> Path:
    return Path(data) / "appliance" / "bookmarks" / f"{cg}.json"


def _journal_dir(data: str | Path, cg: str) -> Path:
    return Path(data) / "appliance" / "journal" / cg


def _read_bookmarks(path: Path) -> list[Bookmark]:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (ValueError, OSError) as e:
        raise BookmarkError(f"{path}: unreadable bookmark file ({e})") from None
    try:
        if raw.get("version") != BOOKMARKS_VERSION:
            raise BookmarkError(f"{path}: bookmark file version {raw.get('version')!r} not supported")
        return [Bookmark(b["name"], int(b["seq"]), int(b["time_ns"]), bool(b["locked"]), float(b["created"]))
                for b in raw["bookmarks"]]
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise BookmarkError(f"{path}: malformed bookmark file ({type(e).__name__}: {e})") from None


def _write_bookmarks(path: Path, cg: str, marks: list[Bookmark]) -> None:
    body = json.dumps({"version": BOOKMARKS_VERSION, "cg": cg, "bookmarks": [b.to_json() for b in marks]}, indent=1)
    atomic_write(path, body.encode(), 0o600)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(path.with_name(path.name + ".lock"), "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def add_bookmark(data: str | Path, cg: str, name: str, seq: int, *, locked: bool = False,
                 time_ns: int | None = None) -> Bookmark:
    """Name the PIT ``seq`` of ``cg``.  ``seq`` must be a PIT of the CG's
    journal (checked there unless ``time_ns`` is given by a caller that
    resolved the PIT already)."""
    if not _NAME.match(name):
        raise BookmarkError(f"bad bookmark name {name!r}: use 1-128 of A-Z a-z 0-9 . _ : @ + -")
    if time_ns is None:
        jd = _journal_dir(data, cg)
        if not jd.is_dir():
            raise PitError(f"no journal for CG {cg!r} (looked in {jd})")
        time_ns = PitIndex(jd).pit_for_seq(seq).time_ns
    path = bookmarks_path(data, cg)
    with _locked(path):
        marks = _read_bookmarks(path)
        for b in marks:
            if b.name == name:
                raise BookmarkError(f"bookmark {name!r} already exists in CG {cg} (seq {b.seq})")
        mark = Bookmark(name, seq, time_ns, locked, time.time())
        marks.append(mark)
        _write_bookmarks(path, cg, marks)
    return mark


def lock_bookmark(data: str | Path, cg: str, name: str, locked: bool) -> Bookmark:
    """Lock (keep whatever retention says) or unlock an existing bookmark."""
    path = bookmarks_path(data, cg)
    with _locked(path):
        marks = _read_bookmarks(path)
        for i, b in enumerate(marks):
            if b.name == name:
                marks[i] = Bookmark(b.name, b.seq, b.time_ns, locked, b.created)
                _write_bookmarks(path, cg, marks)
                return marks[i]
    known = ", ".join(b.name for b in marks) or "none"
    raise BookmarkError(f"unknown bookmark {name!r} in CG {cg} (known: {known})")


def remove_bookmarks(data: str | Path, cg: str, which: Callable[[Bookmark], bool]) -> list[Bookmark]:
    """Remove the bookmarks ``which`` selects (retention); returns them."""
    path = bookmarks_path(data, cg)
    if not path.exists():
        return []
    with _locked(path):
        marks = _read_bookmarks(path)
        gone = [b for b in marks if which(b)]
        if gone:
            _write_bookmarks(path, cg, [b for b in marks if not which(b)])
    return gone


def list_bookmarks(data: str | Path, cg: str) -> list[Bookmark]:
    """The bookmarks of ``cg`` in the order they were added."""
    return _read_bookmarks(bookmarks_path(data, cg))


def get_bookmark(data: str | Path, cg: str, name: str) -> Bookmark:
    marks = list_bookmarks(data, cg)
    for b in marks:
        if b.name == name:
            return b
    known = ", ".join(b.name for b in marks) or "none"
    raise BookmarkError(f"unknown bookmark {name!r} in CG {cg} (known: {known})")
