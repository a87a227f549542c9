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
§1 byte layout), without the writer's lock and without the cost of
`Journal.open` (which CRC-checks and fingerprints every data block): it reads
entry heads and record heads only and skips payloads.  It emits a batch only
when its COMMIT entry is complete and its CRC verifies, so a batch being
written concurrently (or a torn tail before the writer's recovery cut it) is
never seen.  It remembers (segment, offset) after the last COMMIT and the next
`scan()` goes on from there: refreshing is incremental.

Rules
-----
1. Nothing here writes a journal file.  The scanner never trusts anything
   after the last COMMIT whose CRC verifies.
2. Payload CRCs are *not* checked by the scanner (that would read the whole
   journal); every payload read goes through `Journal.read_entry` /
   `Journal.records`, which check them.  A damaged record thus shows up when a
   PIT that needs it is read, as `JournalCorrupt` naming segment and offset.
3. A structurally impossible entry (bad tag, a COMMIT that does not match the
   records before it, seqs not increasing) stops the scan there; the PITs
   before it stay usable, ``PitIndex.stalled`` says where and why, and the
   next refresh tries again from the last COMMIT (a torn tail is cut by the
   writer's next open; committed damage makes that open fail loudly).
4. Bookmark files are replaced atomically (tmp, fsync, rename, fsync dir)
   under an flock, read-modify-write; names are unique per CG.

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

from nicsplit.fsutil import atomic_write
from nicsplit.card.pipeline.items import RFLAG_IN_WINDOW
from nicsplit.card.records import Op
from nicsplit.wire.frames import RECORD_HEAD_SIZE

__all__ = [
    "Pit", "RecordHead", "Commit", "PitError", "NoSuchPit", "BookmarkError", "JournalScanner", "PitIndex",
    "list_pits", "Bookmark", "add_bookmark", "list_bookmarks", "get_bookmark", "bookmarks_path", "RFLAG_IN_WINDOW",
]

# -- on-disk layouts (docs/journal.md §1; journal.py holds the writer's copy) --------

_SEG_HEAD = struct.Struct(
    ">"
    "4s"  # magic: b"NSJS"
    "H"  # version: 1
    "H"  # flags: 0
    "Q"  # segment number: equals the file name
    "I"  # reserved: 0
    "I"  # crc: zlib.crc32 of the 20 bytes before it
)
assert _SEG_HEAD.size == 24
_SEG_MAGIC = b"NSJS"
_SEG_VERSION = 1

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
_READ_AHEAD = 1 << 20
_SEG_SUFFIX = ".seg"
_OPS = frozenset(int(o) for o in Op)


def _seg_name(n: int) -> str:
    return f"{n:08d}{_SEG_SUFFIX}"


class PitError(Exception):
    """A point in time cannot be resolved or used (one clear line)."""


class NoSuchPit(PitError):
    """No PIT matches the request (seq, time, empty journal)."""


class BookmarkError(PitError):
    """Unknown, duplicate or badly named bookmark; unreadable bookmark file."""


@dataclass(frozen=True, slots=True)
class Pit:
    seq: int  # the COMMIT's last_seq
    time_ns: int  # the COMMIT's t_last_ns
    batch_id: int
    consistent: bool  # False inside a merge window (RFLAG_IN_WINDOW)

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
class Commit:
    batch_id: int
    first_seq: int
    last_seq: int
    t_first_ns: int
    t_last_ns: int
    records: int
    segment: int
    pos: int


def _fmt_time(t_ns: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t_ns / 1e9)) + f".{t_ns % 10**9 // 10**6:03d}"


class JournalScanner:
    """Incremental read-only parser of a journal's segments (rules 1–3)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.segment = 1  # where the next scan starts: after the last COMMIT seen
        self.offset = 0  # 0 = the segment header is not checked yet
        self.last_seq = 0
        self.stalled: str | None = None  # rule 3: why the last scan stopped before the end of the files

    def scan(self) -> Iterator[tuple[Commit, list[RecordHead]]]:
        """Every batch committed since the previous scan, in order."""
        self.stalled = None
        seg, pos = self.segment, self.offset
        pending: list[RecordHead] = []
        last = self.last_seq
        while True:
            p = self.path / _seg_name(seg)
            try:
                fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return
            try:
                size = os.fstat(fd).st_size
                buf, base = b"", 0

                def get(at: int, n: int) -> bytes:
                    nonlocal buf, base
                    if not (base <= at and at + n <= base + len(buf)):
                        base = at
                        buf = os.pread(fd, max(n, _READ_AHEAD), at)
                    return buf[at - base : at - base + n]

                if pos == 0:
                    head = get(0, _SEG_HEAD.size)
                    if len(head) < _SEG_HEAD.size:
                        return  # being created
                    magic, version, flags, number, reserved, crc = _SEG_HEAD.unpack(head)
                    if zlib.crc32(head[:20]) != crc or magic != _SEG_MAGIC or version != _SEG_VERSION or number != seg:
                        self._stop(seg, 0, "bad segment header")
                        return
                    pos = _SEG_HEAD.size
                while pos + _ENTRY.size <= size:
                    esize, tag, pad, ecrc = _ENTRY.unpack(get(pos, _ENTRY.size))
                    end = pos + _ENTRY.size + esize
                    if pad != b"\0\0\0" or tag not in (_TAG_RECORD, _TAG_COMMIT):
                        self._stop(seg, pos, f"bad entry head (tag {tag})")
                        return
                    if end > size:
                        break  # being written (or a torn tail): wait for more
                    if tag == _TAG_RECORD:
                        if esize < _RECORD_HEAD.size:
                            self._stop(seg, pos, "record entry shorter than a record head")
                            return
                        rseq, _io, vdisk, op, flags, off, length, t_ns, nrefs, dlen = _RECORD_HEAD.unpack(
                            get(pos + _ENTRY.size, _RECORD_HEAD.size))
                        prev = pending[-1].seq if pending else last
                        if rseq <= prev or op not in _OPS:
                            self._stop(seg, pos, f"record seq {rseq} op {op} does not follow seq {prev}")
                            return
                        pending.append(RecordHead(rseq, vdisk, op, flags, off, length, t_ns, seg, pos))
                    else:
                        if esize != _COMMIT.size:
                            self._stop(seg, pos, f"COMMIT of {esize} bytes")
                            return
                        payload = get(pos + _ENTRY.size, esize)
                        if zlib.crc32(payload, zlib.crc32(get(pos, 8))) != ecrc:
                            # torn, or not yet complete in our view: the next scan retries
                            self._stop(seg, pos, "COMMIT entry fails its CRC (torn tail, or being written)")
                            return
                        bid, first, lseq, t_first, t_last, nrec = _COMMIT.unpack(payload)
                        if nrec != len(pending) or lseq < first or first <= last or any(
                                not first <= r.seq <= lseq for r in pending):
                            self._stop(seg, pos, f"COMMIT of batch {bid} (seqs {first}..{lseq}, {nrec} records) "
                                                 f"does not match the {len(pending)} records before it")
                            return
                        batch = pending
                        pending = []
                        last = self.last_seq = lseq
                        self.segment, self.offset = seg, end
                        yield Commit(bid, first, lseq, t_first, t_last, nrec, seg, pos), batch
                    pos = end
                if pos < size:
                    return  # a partial entry (head) at the end: being written, or a torn tail
            finally:
                os.close(fd)
            # End of this segment: a following one continues the journal (a batch
            # may span segments, its COMMIT in the last one).
            if not (self.path / _seg_name(seg + 1)).exists():
                return
            seg, pos = seg + 1, 0
            if not pending:
                self.segment, self.offset = seg, 0

    def _stop(self, seg: int, pos: int, why: str) -> None:
        # Not sticky: after a crash this may be a torn tail that the writer cuts
        # at its next open (then the next scan goes on); committed damage makes
        # the writer's Journal.open fail loudly (docs/journal.md §3).
        self.stalled = f"journal {self.path}: {_seg_name(seg)} offset {pos}: {why}"


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
        return Pit(self._seq[i], self._time[i], self._batch[i], bool(self._consistent[i]))

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
