"""Per-CG journal: append-only segments, checksummed entries, commit markers.

Layout (docs/journal.md lists every byte)::

    DATA/appliance/journal/<cg>/00000001.seg, 00000002.seg, ...   segments
    DATA/appliance/journal/<cg>/lock                              writer lock (flock)

A segment is a 24-byte header then entries; an entry is a 12-byte head
(size, tag, CRC-32 over head and payload) then its payload:

* RECORD — one `nicsplit.wire.frames.Record` in the wire record layout, data
  blocks inline and deduplicated blocks kept as references (fingerprints);
* COMMIT — closes a batch: batch id, seq range, time range, record count.

Rules
-----
1. Write order for a batch: RECORD entries, COMMIT entry, fdatasync of the
   segment; only then does `append_batch` return (and the server ack).  A new
   segment is created only after the previous one was synced, and its name is
   made durable (directory fsync) before anything relies on it, so a torn
   write can only ever sit after the last synced COMMIT.
2. Files are never modified in place.  The one exception is at open (writer
   mode): everything after the last valid COMMIT is cut off (truncate, delete
   later segments) — that is the uncommitted tail of a crash.
3. A damaged entry (bad CRC, bad head, undecodable) followed by no valid
   COMMIT is a torn tail (rule 2).  A damaged entry with a valid COMMIT after
   it is corruption of acknowledged data: `JournalCorrupt` names the segment
   and offset and the journal does not open.
4. A failed write or fsync is fatal (durable.py rule 4): the journal turns
   *failed* and refuses every later call; the process restarts and recovers.
5. A batch whose seqs are all <= ``last_seq`` is a duplicate: acknowledged,
   not applied.  One that overlaps is applied from ``last_seq + 1`` on.  One
   that starts after ``last_seq + 1`` leaves a gap that is counted and logged
   (the card only skips seqs it marked dirty for resync).
6. A reference must name a block the journal holds (an earlier data block of
   this CG, possibly in the same batch); otherwise the batch is rejected
   (`BatchRejected`) and nothing of it is written.
7. The index (seq → entry, commit time → seq, fingerprint → block) lives in
   memory and is rebuilt by scanning the segments at open; open time is
   linear in the journal size and verifies every CRC on the way.
"""

from __future__ import annotations

import bisect
import logging
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol, Sequence

from nicsplit.appliance.durable import DurableFile, Filesystem, OsFilesystem
from nicsplit.card.records import Op
from nicsplit.wire.frames import (
    BLOCK_SIZE, RECORD_HEAD_SIZE, REF_SIZE, FrameError, Record, block_spans, decode_record, encode_record, expand, fingerprint,
)

log = logging.getLogger("nicsplit.appliance.journal")

# 64 MiB: 4 full 16 MiB batches; small enough to read whole at open, large
# enough that a busy CG creates a new file (and a directory fsync) rarely.
DEFAULT_SEGMENT_SIZE = 64 * 1024 * 1024
SEGMENT_SUFFIX = ".seg"
SEGMENT_MAGIC = b"NSJS"
JOURNAL_VERSION = 1

_SEG_HEAD = struct.Struct(
    ">"
    "4s"  # magic: b"NSJS"
    "H"  # version: JOURNAL_VERSION
    "H"  # flags: 0
    "Q"  # segment number: equals the number in the file name
    "I"  # reserved: 0
    "I"  # crc: zlib.crc32 of the 20 bytes before it
)
assert _SEG_HEAD.size == 24

_ENTRY = struct.Struct(
    ">"
    "I"  # size: payload bytes that follow the head
    "B"  # tag: TAG_RECORD or TAG_COMMIT
    "3x"  # padding: zero
    "I"  # crc: zlib.crc32 of the first 8 head bytes followed by the payload
)
assert _ENTRY.size == 12

TAG_RECORD = 1
TAG_COMMIT = 2

_COMMIT = struct.Struct(
    ">"
    "Q"  # batch_id: from the card's Batch
    "Q"  # first_seq: first seq this commit applies (after duplicate trimming)
    "Q"  # last_seq: last seq covered; the journal's last_seq after it
    "Q"  # t_first_ns: batch time range start
    "Q"  # t_last_ns: batch time range end
    "I"  # records: RECORD entries since the previous COMMIT
)
assert _COMMIT.size == 44

# What every COMMIT entry head starts with (size + tag + padding): searched for
# after a damaged entry to tell a torn tail from corruption (rule 3).
_COMMIT_PREFIX = _ENTRY.pack(_COMMIT.size, TAG_COMMIT, 0)[:8]
_MAX_ENTRY = 0x7FFFFFFF


class JournalError(Exception):
    """The journal cannot be used (IO failure, failed state, lock held)."""


class JournalCorrupt(JournalError):
    """Committed data failed its check: names the segment and offset."""


class BatchRejected(ValueError):
    """The batch is invalid for this journal; nothing was written."""


class BatchMeta(Protocol):
    batch_id: int
    first_seq: int
    last_seq: int
    t_first_ns: int
    t_last_ns: int


@dataclass(frozen=True, slots=True)
class AppendResult:
    applied: bool  # False: a duplicate, nothing written
    last_seq: int  # the journal's last durable seq after the call
    known: tuple[bytes, ...]  # fingerprints of the data blocks of this batch (unique, in order)


@dataclass(frozen=True, slots=True)
class JournalStatistics:
    path: str
    segments: int
    bytes: int  # committed bytes over all segments, headers included
    records: int
    batches: int
    last_seq: int
    last_batch_id: int
    first_time_ns: int
    last_time_ns: int
    blocks_indexed: int
    duplicates: int  # batches acknowledged without being applied (since open)
    gaps: int  # batches that started after last_seq + 1 (whole journal)
    truncated_bytes: int  # uncommitted tail cut at open
    failed: bool


@dataclass(slots=True)
class _Pending:
    """Index updates of a batch, applied only once its COMMIT is durable."""

    recs: list[tuple[int, int, int]]  # (seq, segment, entry offset)
    blocks: dict[bytes, tuple[int, int, int]]  # fp -> (segment, offset, length)


def _seg_name(n: int) -> str:
    return f"{n:08d}{SEGMENT_SUFFIX}"


def _entry(tag: int, payload: bytes) -> bytes:
    head8 = _ENTRY.pack(len(payload), tag, 0)[:8]
    return head8 + struct.pack(">I", zlib.crc32(payload, zlib.crc32(head8))) + payload


def _data_blocks(rec: Record) -> Iterator[tuple[int, int, int]]:
    """(block index, offset in rec.data, length) of the blocks carried inline."""
    if rec.op != Op.WRITE:
        return
    refs = {b for b, _ in rec.refs}
    dpos = 0
    for i in range(block_spans(rec.length)):
        n = min(BLOCK_SIZE, rec.length - i * BLOCK_SIZE)
        if i not in refs:
            yield i, dpos, n
            dpos += n


def _data_offset(rec: Record) -> int:
    """Offset of ``rec.data`` inside its encoded record (wire layout)."""
    return RECORD_HEAD_SIZE + REF_SIZE * len(rec.refs)


class Journal:
    """One CG's journal.  Thread-safe: `append_batch` and readers may run in
    different threads (the server appends from a worker thread)."""

    def __init__(self, path: Path, fs: Filesystem, segment_size: int, readonly: bool) -> None:
        self.path = Path(path)
        self._fs = fs
        self._segment_size = segment_size
        self.readonly = readonly
        self._lock = threading.Lock()
        self._files: dict[int, DurableFile] = {}
        self._segments: list[int] = []
        self._seg_sizes: dict[int, int] = {}
        self._recs: list[tuple[int, int, int]] = []  # (seq, segment, entry offset), seq ascending
        self._seqs: list[int] = []  # seqs of _recs, for bisect
        self._commits: list[tuple[int, int]] = []  # (t_last_ns, last_seq)
        self._blocks: dict[bytes, tuple[int, int, int]] = {}
        self._last_seq = 0
        self._durable_seq = 0  # highest seq made durable (group commit may lag _last_seq)
        self._last_batch_id = 0
        self._first_time = 0
        self._batches = 0
        self._duplicates = 0
        self._gaps = 0
        self._truncated = 0
        self._failed: str | None = None
        self._lockfile: object | None = None

    # -- open / recovery --------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, *, fs: Filesystem | None = None, segment_size: int = DEFAULT_SEGMENT_SIZE,
             readonly: bool = False, create: bool = True) -> "Journal":
        """Open (creating it unless readonly / not create) and recover.  In
        writer mode the uncommitted tail is cut and an exclusive lock held;
        readonly mode ignores the tail and never writes."""
        fs = fs or OsFilesystem()
        path = Path(path)
        if segment_size < _SEG_HEAD.size + 2 * _ENTRY.size + _COMMIT.size:
            raise ValueError(f"segment_size {segment_size} is too small")
        j = cls(path, fs, segment_size, readonly)
        if not fs.exists(path):
            if readonly or not create:
                raise JournalError(f"no journal at {path}")
            fs.makedirs(path)
            fs.sync_dir(path.parent)
        if not readonly:
            try:
                j._lockfile = fs.lock(path / "lock")
            except BlockingIOError:
                raise JournalError(f"journal {path} is in use by another process (lock held)") from None
        try:
            j._recover()
        except BaseException:
            j.close()
            raise
        j._durable_seq = j._last_seq  # what recovery kept is on disk
        return j

    def _recover(self) -> None:
        names = [n for n in self._fs.listdir(self.path) if n.endswith(SEGMENT_SUFFIX)]
        segs: list[int] = []
        for n in names:
            stem = n[: -len(SEGMENT_SUFFIX)]
            if not stem.isdigit() or _seg_name(int(stem)) != n:
                raise JournalCorrupt(f"{self.path / n}: unexpected file name in a journal directory")
            segs.append(int(stem))
        segs.sort()
        for a, b in zip(segs, segs[1:]):
            if b != a + 1:
                raise JournalCorrupt(f"{self.path}: segment {_seg_name(a + 1)} is missing (have {_seg_name(b)})")

        # Scan everything; remember the end of the last COMMIT and the first damage.
        pending = _Pending([], {})
        pending_count = 0
        committed_end: tuple[int, int] | None = None  # (segment, offset after the last COMMIT)
        damage: tuple[int, int, str] | None = None
        contents: dict[int, bytes] = {}
        for seg in segs:
            f = self._fs.open(self.path / _seg_name(seg), readonly=self.readonly)
            try:
                buf = f.pread(0, f.size())
            finally:
                f.close()
            contents[seg] = buf
            if damage is not None:
                continue  # only searched for commits below
            problem = self._check_seg_head(buf, seg)
            if problem:
                damage = (seg, 0, problem)
                continue
            pos = _SEG_HEAD.size
            while pos < len(buf):
                where = f"{_seg_name(seg)} offset {pos}"
                if len(buf) - pos < _ENTRY.size:
                    damage = (seg, pos, "truncated entry head")
                    break
                size, tag, crc = _ENTRY.unpack_from(buf, pos)
                if buf[pos + 5 : pos + 8] != b"\0\0\0" or tag not in (TAG_RECORD, TAG_COMMIT):
                    damage = (seg, pos, f"bad entry head (tag {tag})")
                    break
                end = pos + _ENTRY.size + size
                if end > len(buf):
                    damage = (seg, pos, f"entry of {size} bytes runs past the end of the segment")
                    break
                payload = memoryview(buf)[pos + _ENTRY.size : end]
                if zlib.crc32(payload, zlib.crc32(buf[pos : pos + 8])) != crc:
                    damage = (seg, pos, "entry CRC mismatch")
                    break
                if tag == TAG_RECORD:
                    try:
                        rec, rend = decode_record(payload)
                    except FrameError as e:
                        raise JournalCorrupt(f"{self.path / _seg_name(seg)} offset {pos}: record does not decode: {e}") from None
                    if rend != size:
                        raise JournalCorrupt(f"{self.path / _seg_name(seg)} offset {pos}: trailing bytes after record")
                    last = pending.recs[-1][0] if pending.recs else self._last_seq
                    if rec.seq <= last:
                        raise JournalCorrupt(f"{self.path / _seg_name(seg)} offset {pos}: record seq {rec.seq} not after {last}")
                    for _, fp in rec.refs:
                        if fp not in self._blocks and fp not in pending.blocks:
                            raise JournalCorrupt(f"{where}: record seq {rec.seq} references unknown block {fp.hex()}")
                    base = pos + _ENTRY.size + _data_offset(rec)
                    for _, doff, n in _data_blocks(rec):
                        fp = fingerprint(rec.data[doff : doff + n])
                        if fp not in self._blocks and fp not in pending.blocks:
                            pending.blocks[fp] = (seg, base + doff, n)
                    pending.recs.append((rec.seq, seg, pos))
                    pending_count += 1
                else:
                    if size != _COMMIT.size:
                        raise JournalCorrupt(f"{self.path / _seg_name(seg)} offset {pos}: COMMIT of {size} bytes")
                    batch_id, first, last, t_first, t_last, nrec = _COMMIT.unpack(payload)
                    if nrec != pending_count or last < first or first <= self._last_seq or any(
                        not first <= s <= last for s, _, _ in pending.recs
                    ):
                        raise JournalCorrupt(
                            f"{self.path / _seg_name(seg)} offset {pos}: COMMIT of batch {batch_id} "
                            f"(seqs {first}..{last}, {nrec} records) does not match the {pending_count} records before it"
                        )
                    self._apply(pending, batch_id, first, last, t_first, t_last)
                    pending = _Pending([], {})
                    pending_count = 0
                    committed_end = (seg, end)
                pos = end

        if damage is not None:
            self._check_no_commit_after(damage, segs, contents)
            seg, pos, why = damage
            log.warning("journal %s: discarding torn tail at %s offset %d (%s)", self.path, _seg_name(seg), pos, why)

        # Decide the committed extent of every segment; cut the rest (writer only).
        keep_until = committed_end
        for seg in segs:
            size = len(contents[seg])
            if keep_until is None or seg > keep_until[0]:
                new = None  # after the last commit entirely
            elif seg == keep_until[0]:
                new = keep_until[1]
            else:
                new = size
            if new == size:
                self._segments.append(seg)
                self._seg_sizes[seg] = size
                continue
            self._truncated += size - (new or 0)
            if self.readonly:
                if new is not None:
                    self._segments.append(seg)
                    self._seg_sizes[seg] = new
                continue
            if new is None:
                self._fs.remove(self.path / _seg_name(seg))
            else:
                f = self._fs.open(self.path / _seg_name(seg))
                try:
                    f.truncate(new)
                    f.sync()
                finally:
                    f.close()
                self._segments.append(seg)
                self._seg_sizes[seg] = new
        if self._truncated and not self.readonly:
            self._fs.sync_dir(self.path)
            log.warning("journal %s: cut %d uncommitted bytes at open", self.path, self._truncated)

    def _check_seg_head(self, buf: bytes, seg: int) -> str | None:
        if len(buf) < _SEG_HEAD.size:
            return f"segment header truncated ({len(buf)} bytes)"
        magic, version, flags, number, reserved, crc = _SEG_HEAD.unpack_from(buf, 0)
        if zlib.crc32(buf[:20]) != crc or magic != SEGMENT_MAGIC:
            return "bad segment header"
        if version != JOURNAL_VERSION or flags or reserved:
            raise JournalCorrupt(f"{self.path / _seg_name(seg)}: journal version {version} flags {flags} not supported")
        if number != seg:
            raise JournalCorrupt(f"{self.path / _seg_name(seg)}: header says segment {number}")
        return None

    def _check_no_commit_after(self, damage: tuple[int, int, str], segs: list[int], contents: dict[int, bytes]) -> None:
        """Rule 3: damage followed by a valid COMMIT is corruption."""
        seg0, pos0, why = damage
        for seg in segs:
            if seg < seg0:
                continue
            buf = contents[seg]
            start = pos0 + 1 if seg == seg0 else 0
            while True:
                i = buf.find(_COMMIT_PREFIX, start)
                if i < 0 or i + _ENTRY.size + _COMMIT.size > len(buf):
                    break
                (crc,) = struct.unpack_from(">I", buf, i + 8)
                if zlib.crc32(buf[i + 12 : i + 12 + _COMMIT.size], zlib.crc32(buf[i : i + 8])) == crc:
                    raise JournalCorrupt(
                        f"journal {self.path}: corrupt entry in segment {_seg_name(seg0)} at offset {pos0} ({why}), "
                        f"before committed data (a COMMIT at {_seg_name(seg)} offset {i}); refusing to open"
                    )
                start = i + 1

    def _apply(self, p: _Pending, batch_id: int, first: int, last: int, t_first: int, t_last: int) -> None:
        if first > self._last_seq + 1 and self._last_seq:
            self._gaps += 1
        self._recs.extend(p.recs)
        self._seqs.extend(s for s, _, _ in p.recs)
        for fp, loc in p.blocks.items():
            self._blocks.setdefault(fp, loc)
        self._commits.append((t_last, last))
        if not self._first_time:
            self._first_time = t_first
        self._last_seq = last
        self._last_batch_id = batch_id
        self._batches += 1

    # -- append -------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        return self._last_seq

    @property
    def failed(self) -> str | None:
        return self._failed

    def _check_usable(self) -> None:
        if self._failed:
            raise JournalError(f"journal {self.path} failed earlier ({self._failed}); restart to recover")
        if self.readonly:
            raise JournalError(f"journal {self.path} is open read-only")

    def append_batch(self, batch_meta: BatchMeta, records: Sequence[Record], *, sync: bool = True) -> AppendResult:
        """Append one batch and make it durable before returning (rule 1).
        Duplicates are acknowledged without writing (rule 5). With
        ``sync=False`` the batch is written but durable only after the next
        `sync()` (group commit: the caller acks nothing before that)."""
        with self._lock:
            self._check_usable()
            m = batch_meta
            if m.first_seq < 1 or m.last_seq < m.first_seq:
                raise BatchRejected(f"batch {m.batch_id}: bad seq range {m.first_seq}..{m.last_seq}")
            prev = 0
            for r in records:
                if not m.first_seq <= r.seq <= m.last_seq or r.seq <= prev:
                    raise BatchRejected(
                        f"batch {m.batch_id}: record seq {r.seq} out of order or outside {m.first_seq}..{m.last_seq}"
                    )
                prev = r.seq
            if m.last_seq <= self._last_seq:
                self._duplicates += 1
                log.info("journal %s: batch %d (seqs %d..%d) is a duplicate; acknowledged, not applied",
                         self.path, m.batch_id, m.first_seq, m.last_seq)
                return AppendResult(False, self._last_seq, ())
            first = max(m.first_seq, self._last_seq + 1)
            if first > self._last_seq + 1 and self._last_seq:
                log.warning("journal %s: batch %d starts at seq %d after last seq %d: gap",
                            self.path, m.batch_id, first, self._last_seq)
            new = [r for r in records if r.seq >= first]

            # Validate refs and collect data blocks before writing anything (rule 6).
            encoded: list[bytes] = []
            blocks: list[list[tuple[int, int, bytes]]] = []  # per record: (offset in data, length, fp)
            known: dict[bytes, None] = {}
            for r in new:
                for _, fp in r.refs:
                    if fp not in self._blocks and fp not in known:
                        raise BatchRejected(f"batch {m.batch_id}: record seq {r.seq} references block {fp.hex()} "
                                            f"that this journal does not hold")
                fps = [(doff, n, fingerprint(r.data[doff : doff + n])) for _, doff, n in _data_blocks(r)]
                known.update((fp, None) for _, _, fp in fps)
                blocks.append(fps)
                encoded.append(_entry(TAG_RECORD, encode_record(r)))
            commit = _entry(TAG_COMMIT, _COMMIT.pack(m.batch_id, first, m.last_seq, m.t_first_ns, m.t_last_ns, len(new)))
            try:
                pending = self._write(new, blocks, encoded, commit, sync)
            except OSError as e:
                self._failed = f"{type(e).__name__}: {e}"
                log.error("journal %s: write failed, journal is now failed: %s", self.path, self._failed)
                raise JournalError(f"journal {self.path}: write failed ({self._failed}); nothing acknowledged") from e
            self._apply(pending, m.batch_id, first, m.last_seq, m.t_first_ns, m.t_last_ns)
            if sync:
                self._durable_seq = self._last_seq
            return AppendResult(True, self._last_seq, tuple(known))

    def sync(self) -> None:
        """Make every batch appended so far durable (the group commit's one
        fdatasync). A failure is fatal, like any other (rule 6)."""
        with self._lock:
            self._check_usable()
            if self._durable_seq == self._last_seq or not self._segments:
                return
            seg, f = self._current()
            try:
                f.sync()
            except OSError as e:
                self._failed = f"{type(e).__name__}: {e}"
                log.error("journal %s: sync failed, journal is now failed: %s", self.path, self._failed)
                raise JournalError(f"journal {self.path}: sync failed ({self._failed}); nothing acknowledged") from e
            self._durable_seq = self._last_seq

    @property
    def durable_seq(self) -> int:
        """Highest seq that is durable (what a card may be told it holds)."""
        return self._durable_seq

    def _current(self) -> tuple[int, DurableFile]:
        if not self._segments:
            return self._new_segment(1)
        seg = self._segments[-1]
        f = self._files.get(seg)
        if f is None:
            f = self._files[seg] = self._fs.open(self.path / _seg_name(seg))
        return seg, f

    def _new_segment(self, seg: int) -> tuple[int, DurableFile]:
        f = self._fs.open(self.path / _seg_name(seg), create=True)
        self._files[seg] = f
        head = _SEG_HEAD.pack(SEGMENT_MAGIC, JOURNAL_VERSION, 0, seg, 0, 0)[:20]
        f.append(head + struct.pack(">I", zlib.crc32(head)))
        self._fs.sync_dir(self.path)  # the name is durable before data relies on it
        self._segments.append(seg)
        self._seg_sizes[seg] = _SEG_HEAD.size
        return seg, f

    def _write(self, recs: list[Record], blocks: list[list[tuple[int, int, bytes]]], encoded: list[bytes],
               commit: bytes, sync: bool = True) -> _Pending:
        pending = _Pending([], {})
        seg, f = self._current()
        buf = bytearray()
        size = f.size()
        for r, fps, e in zip(recs, blocks, encoded, strict=True):
            if size + len(buf) > _SEG_HEAD.size and size + len(buf) + len(e) > self._segment_size:
                f.append(bytes(buf))
                f.sync()  # rule 1: the old segment is complete before a new one exists
                self._seg_sizes[seg] = f.size()
                buf.clear()
                seg, f = self._new_segment(seg + 1)
                size = f.size()
            pos = size + len(buf)
            pending.recs.append((r.seq, seg, pos))
            base = pos + _ENTRY.size + _data_offset(r)
            for doff, n, fp in fps:
                if fp not in self._blocks and fp not in pending.blocks:
                    pending.blocks[fp] = (seg, base + doff, n)
            buf += e
        buf += commit  # the COMMIT may overhang segment_size by its 56 bytes
        f.append(bytes(buf))
        if sync:
            f.sync()
        self._seg_sizes[seg] = f.size()
        return pending

    # -- reading ------------------------------------------------------------------

    def _reader(self, seg: int) -> DurableFile:
        f = self._files.get(seg)
        if f is None:
            f = self._files[seg] = self._fs.open(self.path / _seg_name(seg), readonly=self.readonly)
        return f

    def _read_block(self, fp: bytes) -> bytes:
        loc = self._blocks.get(fp)
        if loc is None:
            raise JournalCorrupt(f"journal {self.path}: block {fp.hex()} is referenced but not held")
        seg, off, n = loc
        data = self._reader(seg).pread(off, n)
        if len(data) != n or fingerprint(data) != fp:
            raise JournalCorrupt(f"journal {self.path}: block {fp.hex()} at {_seg_name(seg)} offset {off} is damaged")
        return data

    def read_block(self, fp: bytes) -> bytes:
        """The 4 KiB block with fingerprint ``fp`` (a dedup reference target)."""
        with self._lock:
            return self._read_block(fp)

    def read_entry(self, seg: int, pos: int) -> Record:
        """The record whose entry starts at (segment, offset), CRC-checked."""
        f = self._reader(seg)
        head = f.pread(pos, _ENTRY.size)
        where = f"journal {self.path}: {_seg_name(seg)} offset {pos}"
        if len(head) != _ENTRY.size:
            raise JournalCorrupt(f"{where}: entry head truncated")
        size, tag, crc = _ENTRY.unpack(head)
        payload = f.pread(pos + _ENTRY.size, size)
        if tag != TAG_RECORD or len(payload) != size or zlib.crc32(payload, zlib.crc32(head[:8])) != crc:
            raise JournalCorrupt(f"{where}: record entry fails its check")
        try:
            rec, _ = decode_record(payload)
        except FrameError as e:
            raise JournalCorrupt(f"{where}: {e}") from None
        return rec

    def iter_records(self, from_seq: int = 1, upto_seq: int | None = None) -> Iterator[Record]:
        """Committed records with from_seq <= seq (<= upto_seq), in seq order,
        as stored (references unresolved)."""
        with self._lock:
            i = bisect.bisect_left(self._seqs, from_seq)
            snapshot = self._recs[i:]
        for seq, seg, pos in snapshot:
            if upto_seq is not None and seq > upto_seq:
                return
            with self._lock:
                rec = self.read_entry(seg, pos)
            yield rec

    def records(self, from_seq: int = 1, upto_seq: int | None = None) -> Iterator[tuple[Record, bytes]]:
        """Like `iter_records`, each with its full payload (references
        resolved through the block index; b"" for non-WRITE ops)."""
        for rec in self.iter_records(from_seq, upto_seq):
            with self._lock:
                payload = expand(rec, self._read_block)
            yield rec, payload

    def seq_at(self, time_ns: int) -> int:
        """The last seq of the last batch whose time range ended at or before
        ``time_ns`` (0 if none): the time → sequence index."""
        with self._lock:
            i = bisect.bisect_right(self._commits, (time_ns, 1 << 64))
            return self._commits[i - 1][1] if i else 0

    def has_block(self, fp: bytes) -> bool:
        return fp in self._blocks

    def statistics(self) -> JournalStatistics:
        with self._lock:
            return JournalStatistics(
                path=str(self.path),
                segments=len(self._segments),
                bytes=sum(self._seg_sizes.values()),
                records=len(self._recs),
                batches=self._batches,
                last_seq=self._last_seq,
                last_batch_id=self._last_batch_id,
                first_time_ns=self._first_time,
                last_time_ns=self._commits[-1][0] if self._commits else 0,
                blocks_indexed=len(self._blocks),
                duplicates=self._duplicates,
                gaps=self._gaps,
                truncated_bytes=self._truncated,
                failed=self._failed is not None,
            )

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        if self._lockfile is not None:
            self._lockfile.close()
            self._lockfile = None

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
