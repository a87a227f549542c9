"""The one recovery scanner of a journal: entry walk, damage resync, and the
incremental read-only scanner built on them.

Theory of operation
===================
`EntryWalk` is the one parser of a segment's entries (docs/journal.md §1),
used by the writer's recovery at open (`Journal.open`) and by the read-only
`JournalScanner` behind the PIT index.  It checks the segment header, every
entry head and every entry CRC, parses record heads (in clear in sealed
segments too) and checks that seqs increase and that each COMMIT matches the
records before it.  It reports what it finds as events; what to do with them
is the caller's: the writer decodes every record in full (data blocks,
references) and cuts an uncommitted tail; the scanner hands out batches.

A **bad spot** (`BadSpot`) ends the walk of a segment.  Two kinds:

* *unchecked* — a torn or damaged entry (truncated, bad head, CRC mismatch):
  a torn tail if no valid COMMIT follows it, damage if one does;
* *checked* — an entry whose CRC verifies but whose content is inconsistent
  (seq out of order, a COMMIT that does not match its records): not a torn
  write.  The writer refuses to open on it; the scanner treats it as damage.

`find_commit` is the one **resync** routine: after a bad spot, the first
entry that is a valid COMMIT that can follow the last good PIT — its head
prefix, its CRC, ``first_seq`` after the last good seq, ``last_seq >=
first_seq``, and a well-formed entry head (or the end of the bytes) after it.
The writer uses it to tell a torn tail from corruption of acknowledged data;
the scanner to step over a damaged stretch.

`JournalScanner` reads the segments *read-only*, without the writer's lock,
without a key and without the cost of `Journal.open` (which decodes, decrypts
and fingerprints every data block).  It emits a batch only when its COMMIT
entry is complete and its CRC verifies, so a batch being written
concurrently (or a torn tail before the writer's recovery cut it) is never
seen.  It remembers (segment, offset) after the last COMMIT and the next
`scan()` goes on from there: refreshing is incremental.

**Damage** (docs/recovery.md §9).  At a bad spot the scanner resyncs: found,
the stretch from the last good COMMIT to that one is *damaged*; the scanner
records a `Damage` (segment, offset, why, seqs ``first_seq..last_seq``),
emits that COMMIT's PIT with no records and goes on after it.  Not found: it
is the tail (being written, or torn by a crash and cut at the writer's next
open) and the scan waits there.

Rules
-----
1. Nothing here writes a journal file.  Nothing after the last COMMIT whose
   CRC verifies is trusted, except across a damaged stretch closed by a
   valid COMMIT (above).
2. Every entry's CRC is checked here; payloads are decoded (and decrypted)
   only by the readers (`Journal.read_entry`, `SegmentReader`), which check
   the CRC again and authenticate sealed records: an entry altered *with* a
   matching CRC shows up there, as `JournalCorrupt` naming segment and offset.
3. A bad spot without a valid COMMIT after it stops the scanner there; its
   ``stalled`` says where and why, and the next `scan()` tries again from the
   last COMMIT (a torn tail is cut by the writer's next open).  A bad spot
   can only be called damage from bytes that are complete: in the segment
   being written, only what the first ``fstat`` showed is searched; later
   segments only once this one is final (a later segment exists — the writer
   syncs a segment before it starts the next — and its size did not change).

Example::

    sc = JournalScanner(journal_dir)
    for commit, records in sc.scan():     # later calls return only what is new
        print(commit.last_seq, len(records), commit.damage)
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Union

from nicsplit.journal.format import (
    COMMIT, COMMIT_PREFIX, ENTRY, OPS, RECORD_HEAD, SEGMENT_HEAD, TAG_COMMIT, TAG_RECORD, JournalCorrupt,
    parse_segment_head, seg_name, seg_number,
)
from nicsplit.core.crc32 import crc32

__all__ = [
    "RecordHead", "Commit", "Damage", "BadSpot", "SegmentHeader", "RecordEntry", "CommitEntry", "EntryWalk",
    "find_commit", "resync", "JournalScanner",
]

# Read-ahead of the scanner: entry heads of small records come out of one
# pread; records larger than this are skipped with a single pread of the next
# head.  4 MiB = 1024 full 4 KiB records per system call.
READ_AHEAD = 4 << 20


class RecordHead(NamedTuple):
    """A committed record as the scanner sees it: the wire head fields and
    where its entry starts (for `Journal.read_entry`).  A NamedTuple, built
    per ingested record: the writer makes one from a `WireRecord`'s fields
    with one tuple operation (a dataclass's ``__init__`` cost ~0.4 us, a
    frozen one's ~3 us)."""

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
        through = f" (the damaged stretch ends in {seg_name(self.end_segment)})" if self.end_segment != self.segment else ""
        return (f"segment {seg_name(self.segment)} of journal {self.path} is damaged at offset {self.offset} "
                f"({self.why}): seqs {self.first_seq}..{self.last_seq} are unreadable{through}")

    def to_json(self) -> dict:
        return {"segment": seg_name(self.segment), "offset": self.offset, "why": self.why,
                "first_seq": self.first_seq, "last_seq": self.last_seq,
                "end_segment": seg_name(self.end_segment), "end_offset": self.end_offset}


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


# -- the entry walk (no IO: bytes come through ``get``) -------------------------------


@dataclass(frozen=True, slots=True)
class BadSpot:
    """Where and why the walk of a segment stopped (see the module docstring)."""

    pos: int
    why: str
    wait: bool  # the bytes may still be being written (truncated): not damage yet
    checked: bool  # the entry's CRC verified: inconsistent content, not a torn write


@dataclass(frozen=True, slots=True)
class SegmentHeader:
    key_id: int  # 0: records in clear


@dataclass(frozen=True, slots=True)
class RecordEntry:
    head: RecordHead
    head8: bytes  # entry size and tag (what a sealed record authenticates)
    payload: memoryview | bytes  # valid until the walk goes on (a reused read-ahead buffer)


@dataclass(frozen=True, slots=True)
class CommitEntry:
    commit: Commit
    records: list[RecordHead]  # the batch it closes
    end: int  # offset after the COMMIT entry


Event = Union[SegmentHeader, RecordEntry, CommitEntry, BadSpot]


class EntryWalk:
    """The one parser of journal entries, across the segments of a journal:
    ``last_seq`` is the last committed seq, ``pending`` the records read
    since (a batch may span segments)."""

    def __init__(self, last_seq: int = 0) -> None:
        self.last_seq = last_seq
        self.pending: list[RecordHead] = []

    def segment(self, get: Callable[[int, int], bytes | memoryview], size: int, seg: int, pos: int,
                where: str) -> Iterator[Event]:
        """The entries of segment ``seg`` (``size`` bytes, read through
        ``get(offset, length)``) from ``pos`` (0: the header first), up to its
        end or the first `BadSpot`.  An intact header this code cannot read
        raises `JournalCorrupt` (no way past it)."""
        if pos == 0:
            head = get(0, SEGMENT_HEAD.size)
            key_id, why = parse_segment_head(head, seg, where)
            if why:
                yield BadSpot(0, why, len(head) < SEGMENT_HEAD.size, False)  # a short header: being created?
                return
            yield SegmentHeader(key_id)
            pos = SEGMENT_HEAD.size
        while pos < size:
            if pos + ENTRY.size > size:
                yield BadSpot(pos, "truncated entry head", True, False)
                return
            head8 = bytes(get(pos, ENTRY.size))
            esize, tag, pad, ecrc = ENTRY.unpack(head8)
            head8 = head8[:8]
            end = pos + ENTRY.size + esize
            if pad != b"\0\0\0" or tag not in (TAG_RECORD, TAG_COMMIT):
                yield BadSpot(pos, f"bad entry head (tag {tag})", False, False)
                return
            if end > size:
                yield BadSpot(pos, f"entry of {esize} bytes runs past the end of the segment", True, False)
                return
            payload = get(pos + ENTRY.size, esize)
            if crc32(payload, crc32(head8)) != ecrc:
                yield BadSpot(pos, "entry CRC mismatch" if tag == TAG_RECORD else "COMMIT entry fails its CRC",
                              False, False)
                return
            if tag == TAG_RECORD:
                if esize < RECORD_HEAD.size:
                    yield BadSpot(pos, "record entry shorter than a record head", False, True)
                    return
                rseq, _io, vdisk, op, flags, off, length, t_ns, _nrefs, _dlen = RECORD_HEAD.unpack_from(payload)
                prev = self.pending[-1].seq if self.pending else self.last_seq
                if rseq <= prev or op not in OPS:
                    yield BadSpot(pos, f"record seq {rseq} op {op} does not follow seq {prev}", False, True)
                    return
                rec = RecordHead(rseq, vdisk, op, flags, off, length, t_ns, seg, pos)
                self.pending.append(rec)
                yield RecordEntry(rec, head8, payload)
            else:
                if esize != COMMIT.size:
                    yield BadSpot(pos, f"COMMIT of {esize} bytes", False, True)
                    return
                bid, first, lseq, t_first, t_last, nrec = COMMIT.unpack(payload)
                batch = self.pending
                if nrec != len(batch) or lseq < first or first <= self.last_seq or any(
                        not first <= r.seq <= lseq for r in batch):
                    yield BadSpot(pos, f"COMMIT of batch {bid} (seqs {first}..{lseq}, {nrec} records) "
                                       f"does not match the {len(batch)} records before it", False, True)
                    return
                self.pending = []
                self.last_seq = lseq
                yield CommitEntry(Commit(bid, first, lseq, t_first, t_last, nrec, seg, pos), batch, end)
            pos = end

    def resynced(self, last_seq: int) -> None:
        """Go on after a damaged stretch closed by a COMMIT of ``last_seq``."""
        self.pending = []
        self.last_seq = last_seq


# -- resync after a bad spot -----------------------------------------------------------


def _plausible_next(buf: bytes | memoryview, at: int) -> bool:
    """After a candidate COMMIT: the end of what we have, or a well-formed entry head."""
    if len(buf) - at < ENTRY.size:
        return True
    size, tag, pad, _ = ENTRY.unpack_from(buf, at)
    return pad == b"\0\0\0" and (tag == TAG_RECORD or (tag == TAG_COMMIT and size == COMMIT.size))


def find_commit(buf: bytes, start: int, after_seq: int) -> tuple[int, tuple] | None:
    """(offset, COMMIT fields) of the first valid COMMIT entry in ``buf`` at
    or after ``start`` that can follow the commit of seq ``after_seq``."""
    while True:
        i = buf.find(COMMIT_PREFIX, start)
        if i < 0 or i + ENTRY.size + COMMIT.size > len(buf):
            return None
        (crc,) = struct.unpack_from(">I", buf, i + 8)
        body = buf[i + ENTRY.size : i + ENTRY.size + COMMIT.size]
        if crc32(body, crc32(buf[i : i + 8])) == crc:
            c = COMMIT.unpack(body)
            if c[1] > after_seq and c[2] >= c[1] and _plausible_next(buf, i + ENTRY.size + COMMIT.size):
                return i, c
        start = i + 1


def resync(stretch: Iterable[tuple[int, bytes, int]], after_seq: int) -> tuple[int, int, tuple] | None:
    """(segment, offset, COMMIT fields) of the first valid COMMIT (`find_commit`)
    in ``stretch``: (segment, its bytes, where to start) after a bad spot, in
    journal order; None if there is none."""
    for seg, buf, start in stretch:
        hit = find_commit(buf, start, after_seq)
        if hit is not None:
            return seg, hit[0], hit[1]
    return None


# -- the incremental read-only scanner -------------------------------------------------


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
            # No more than the file holds: a refresh after a small batch reads
            # a few KiB, not a fresh READ_AHEAD buffer (page faults per scan).
            want = max(n, min(READ_AHEAD, self.size - at))
            if len(self._mem) < want:
                self._mem = bytearray(want)
            self._base = at
            k = os.preadv(self.fd, [memoryview(self._mem)[:want]], at)
            self._buf = memoryview(self._mem)[:k]
        return self._buf[at - self._base : at - self._base + n]


def _first_segment(path: Path, after: int) -> int | None:
    """The lowest segment number > ``after`` in the journal directory."""
    try:
        nums = [n for n in map(seg_number, os.listdir(path)) if n is not None]
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
        walk = EntryWalk(self.last_seq)
        while True:
            try:
                fd = os.open(self.path / seg_name(seg), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                # Retention deletes segments from the oldest end (docs/recovery.md
                # §10): the journal now starts at a later segment; go on there.
                first = _first_segment(self.path, after=seg)
                if first is None:
                    return
                seg, pos = first, 0
                walk.pending = []
                self.segment, self.offset = seg, 0
                continue
            try:
                f = _Segment(fd)
                bad: BadSpot | None = None
                try:
                    for ev in walk.segment(f.get, f.size, seg, pos, f"journal {self.path}: {seg_name(seg)}"):
                        if isinstance(ev, CommitEntry):
                            self.last_seq = ev.commit.last_seq
                            self.segment, self.offset = seg, ev.end
                            yield ev.commit, ev.records
                        elif isinstance(ev, BadSpot):
                            bad = ev
                except JournalCorrupt as e:  # an intact header, not a format we read: no way past it
                    self.stalled = str(e)
                    return
                if bad is not None:
                    found = resync(self._stretch(f, seg, bad.pos), walk.last_seq)
                    if found is None:  # the tail: being written, or torn (rule 3)
                        if not bad.wait:
                            self._stop(seg, bad.pos, bad.why)
                        return
                    cseg, cpos, (bid, first, lseq, t_first, t_last, nrec) = found
                    d = Damage(str(self.path), seg, bad.pos, bad.why, walk.last_seq + 1, lseq, cseg, cpos)
                    self.damage.append(d)
                    walk.resynced(lseq)
                    self.last_seq = lseq
                    self.segment, self.offset = cseg, cpos + ENTRY.size + COMMIT.size
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
            next_exists = (self.path / seg_name(seg + 1)).exists()
            try:
                grown = os.stat(self.path / seg_name(seg)).st_size > f.size
            except FileNotFoundError:  # trimmed under us: the open above follows it
                grown = False
            if grown:
                pos = f.size  # the walk read every entry up to there: go on after them
                continue
            if not next_exists:
                return
            seg, pos = seg + 1, 0
            if not walk.pending:
                self.segment, self.offset = seg, 0

    def _stretch(self, f: _Segment, seg: int, pos: int) -> Iterator[tuple[int, bytes, int]]:
        """The bytes after the bad spot at (seg, pos) that may be searched
        for a COMMIT (rule 3), segment by segment."""
        yield seg, os.pread(f.fd, f.size, 0), pos + 1  # only what the first fstat showed
        # Later segments only once this one is final: the writer syncs a segment
        # before it creates the next, so then nothing is still being written here.
        if not (self.path / seg_name(seg + 1)).exists() or os.fstat(f.fd).st_size != f.size:
            return
        s = seg + 1
        while True:
            try:
                with open(self.path / seg_name(s), "rb") as g:
                    buf = g.read()
            except FileNotFoundError:
                return
            yield s, buf, 0
            s += 1

    def _stop(self, seg: int, pos: int, why: str) -> None:
        # Not sticky: after a crash this may be a torn tail that the writer cuts
        # at its next open (then the next scan goes on); committed damage makes
        # the writer's Journal.open fail loudly (docs/journal.md §3).
        self.stalled = f"journal {self.path}: {seg_name(seg)} offset {pos}: {why}"
