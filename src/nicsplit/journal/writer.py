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
8. At-rest encryption (`nicsplit.storage.atrest`): a segment is written in
   clear (version 1) or sealed (version 2, its header names the key id); a
   sealed RECORD keeps the wire record head in clear and seals refs + data
   with AES-256-GCM, head, entry size/tag and entry offset as associated
   data.  The entry CRC covers what is stored (ciphertext), so the keyless
   scanners still tell damage from a torn tail.  Every record read goes
   through `open_record_payload` — the one place that decrypts.  The writer
   starts a new segment (instead of appending to the last one) when the
   keyring's active key differs from the last segment's, and re-reads the
   keyring before each new segment, so a rotation applies from the next one.
9. Read-only opens with ``stop_at_damage=True`` (the PIT reader's reference
   resolution, ``journal dump``) index the committed prefix before the first
   damaged entry instead of refusing; ``damage`` says where it stopped.
10. Retention (`nicsplit.recovery.retention`) deletes whole segments from
   the oldest end (`trim`), after their records went into the base images.
   A kept record may reference a block whose only earlier copy is in a
   trimmed segment, so the journal knows, per block, the newest seq of a
   later batch's record referencing it, and on trim first copies every
   block referenced after the new base to ``carried.blk`` (once; sealed
   like records, fsynced), which every open indexes before the segments. A
   block's home for new references is its newest copy. A batch that fits a
   segment never spans two, so segments end at batch boundaries. Numbering
   continues: the oldest segment's number is then > 1. (carried.blk is not
   compacted yet.)
"""

from __future__ import annotations

import bisect
import logging
import os
import struct
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from nicsplit.storage import atrest
from nicsplit.storage.durable import DurableFile, Filesystem, OsFilesystem
from nicsplit.recovery.retention import SegmentInfo
from nicsplit.core.records import Op
from nicsplit.wire.frames import (
    BLOCK_SIZE, RECORD_HEAD_SIZE, REF_SIZE, FrameError, Record, block_spans, decode_record, decode_record_split, encode_record, expand, fingerprint,
)

log = logging.getLogger("nicsplit.journal.writer")

# 64 MiB: 4 full 16 MiB batches; small enough to read whole at open, large
# enough that a busy CG creates a new file (and a directory fsync) rarely.
DEFAULT_SEGMENT_SIZE = 64 * 1024 * 1024
SEGMENT_SUFFIX = ".seg"
SEGMENT_MAGIC = b"NSJS"
JOURNAL_VERSION = 1  # records in clear (every journal before at-rest encryption)
SEALED_VERSION = 2  # RECORD payloads sealed with AES-256-GCM (rule 8)
FLAG_SEALED = 0x0001  # version 2 flags: the one flag, always set

_SEG_HEAD = struct.Struct(
    ">"
    "4s"  # magic: b"NSJS"
    "H"  # version: JOURNAL_VERSION (clear) or SEALED_VERSION
    "H"  # flags: 0 (version 1), FLAG_SEALED (version 2)
    "Q"  # segment number: equals the number in the file name
    "I"  # key id: 0 (version 1); the at-rest key sealing the records (version 2)
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

# A sealed RECORD payload: the wire record head (clear) ‖ 12-byte nonce ‖
# GCM(refs ‖ data) ‖ 16-byte tag — 28 bytes more than the clear payload.
SEALED_OVERHEAD = atrest.NONCE_SIZE + atrest.TAG_SIZE
assert SEALED_OVERHEAD == 28

# Decrypted records kept for `read_block` of sealed segments (a reference
# needs its whole record decrypted): 16 MiB = one full batch of records.
_SEALED_CACHE_BYTES = 16 << 20

# Carried blocks (rule 10): ``carried.blk`` in the journal directory, entries of
# this head, then the block (sealed with the pseudo-segment 0's key when key_id
# is not 0: segments count from 1, so its derived key is used nowhere else).
CARRIED_NAME = "carried.blk"
_CARRY = struct.Struct(
    ">"
    "4s"  # magic: b"NSCB"
    "I"  # at-rest key id (0: clear)
    "16s"  # fingerprint of the plain block
    "I"  # stored length (plain + 28 when sealed)
    "12s"  # nonce (zeros when clear)
    "I"  # crc: zlib.crc32 of the head before it and the stored bytes
)
_CARRY_MAGIC = b"NSCB"
CARRY_SEGMENT = 0  # the "segment" of a carried block's location: (0, entry offset)

# `Journal.open(keyring=AUTO)`: the keyring of the data directory the journal
# is in (DATA/appliance/at-rest.key), if there is one.
AUTO = "auto"


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
    blocks: dict[bytes, tuple[int, ...]]  # fp -> location (see Journal._blocks)
    refs: dict[bytes, int] = field(default_factory=dict)  # block held by an earlier batch -> newest seq referencing it


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


# -- segment and entry codecs (no IO) ------------------------------------------------------


def segment_head(seg: int, key_id: int) -> bytes:
    """The header of segment ``seg``: version 1 (records in clear) when
    ``key_id`` is 0, else version 2 sealed under at-rest key ``key_id``."""
    if key_id:
        head = _SEG_HEAD.pack(SEGMENT_MAGIC, SEALED_VERSION, FLAG_SEALED, seg, key_id, 0)[:20]
    else:
        head = _SEG_HEAD.pack(SEGMENT_MAGIC, JOURNAL_VERSION, 0, seg, 0, 0)[:20]
    return head + struct.pack(">I", zlib.crc32(head))


def parse_segment_head(buf: bytes | memoryview, seg: int, where: str) -> tuple[int, str | None]:
    """(key id, None) for an intact header of segment ``seg`` (key id 0 =
    records in clear); (0, why) for a damaged one (torn, bad magic or CRC).
    An intact header this code cannot read (version, flags, number) raises
    `JournalCorrupt` naming ``where``."""
    if len(buf) < _SEG_HEAD.size:
        return 0, f"segment header truncated ({len(buf)} bytes)"
    magic, version, flags, number, key_id, crc = _SEG_HEAD.unpack_from(buf, 0)
    if zlib.crc32(buf[:20]) != crc or magic != SEGMENT_MAGIC:
        return 0, "bad segment header"
    if not ((version == JOURNAL_VERSION and flags == 0 and key_id == 0)
            or (version == SEALED_VERSION and flags == FLAG_SEALED and key_id)):
        raise JournalCorrupt(f"{where}: journal version {version} flags {flags} not supported")
    if number != seg:
        raise JournalCorrupt(f"{where}: header says segment {number}")
    return key_id, None


def _aad(head8: bytes | memoryview, pos: int, rec_head: bytes | memoryview) -> bytes:
    # What a sealed record authenticates besides its ciphertext: entry size and
    # tag, where the entry is (a moved entry fails), the clear record head.
    return bytes(head8) + pos.to_bytes(8, "big") + bytes(rec_head)


def seal_record_entry(cipher: AESGCM, pos: int, encoded: bytes, nonce: bytes) -> bytes:
    """The sealed RECORD entry of the wire record ``encoded`` written at
    segment offset ``pos`` (rule 8).  ``nonce``: 12 fresh random bytes."""
    head8 = _ENTRY.pack(len(encoded) + SEALED_OVERHEAD, TAG_RECORD, 0)[:8]
    view = memoryview(encoded)
    rec_head = view[:RECORD_HEAD_SIZE]
    sealed = cipher.encrypt(nonce, view[RECORD_HEAD_SIZE:], _aad(head8, pos, rec_head))
    crc = zlib.crc32(sealed, zlib.crc32(nonce, zlib.crc32(rec_head, zlib.crc32(head8))))
    return b"".join((head8, struct.pack(">I", crc), rec_head, nonce, sealed))


def open_record_payload(cipher: AESGCM | None, pos: int, head8: bytes | memoryview, payload: bytes | memoryview,
                        where: str) -> Record:
    """The record of a RECORD entry whose CRC was checked: decrypted when its
    segment is sealed (``cipher``), decoded.  Every record read goes through
    here — the one place that decrypts (rule 8)."""
    if cipher is not None:
        if len(payload) < RECORD_HEAD_SIZE + SEALED_OVERHEAD:
            raise JournalCorrupt(f"{where}: sealed record entry of {len(payload)} bytes is too short")
        view = memoryview(payload)
        rec_head = view[:RECORD_HEAD_SIZE]
        nonce = bytes(view[RECORD_HEAD_SIZE : RECORD_HEAD_SIZE + atrest.NONCE_SIZE])
        try:
            plain = cipher.decrypt(nonce, view[RECORD_HEAD_SIZE + atrest.NONCE_SIZE :], _aad(head8, pos, rec_head))
        except InvalidTag:
            raise JournalCorrupt(f"{where}: record fails authentication (altered on disk, "
                                 f"or sealed under another key)") from None
        try:
            return decode_record_split(rec_head, plain)
        except FrameError as e:
            raise JournalCorrupt(f"{where}: record does not decode: {e}") from None
    try:
        rec, end = decode_record(payload)
    except FrameError as e:
        raise JournalCorrupt(f"{where}: record does not decode: {e}") from None
    if end != len(payload):
        raise JournalCorrupt(f"{where}: trailing bytes after record")
    return rec


def read_record_at(pread: Callable[[int, int], bytes], cipher: AESGCM | None, pos: int, where: str) -> Record:
    """The record whose entry starts at ``pos`` of a segment read through
    ``pread(offset, length)``: entry CRC checked, then `open_record_payload`."""
    head = pread(pos, _ENTRY.size)
    if len(head) != _ENTRY.size:
        raise JournalCorrupt(f"{where}: entry head truncated")
    size, tag, crc = _ENTRY.unpack(head)
    payload = pread(pos + _ENTRY.size, size)
    # A sealed entry's GCM tag authenticates every byte the CRC covers (the
    # head and record head as associated data, the nonce through the key
    # stream), so the CRC, a second pass over the payload, is skipped there.
    if tag != TAG_RECORD or len(payload) != size or (
            cipher is None and zlib.crc32(payload, zlib.crc32(head[:8])) != crc):
        raise JournalCorrupt(f"{where}: record entry fails its check")
    return open_record_payload(cipher, pos, head[:8], payload, where)


class SegmentCiphers:
    """The AES-GCM cipher of each sealed segment of one journal, derived from
    the keyring on first need (cached per segment).  ``keyring``: a
    `atrest.Keyring`, None (no keys: sealed segments cannot be read), or
    `AUTO` (the data directory's keyring, looked up on first need)."""

    def __init__(self, path: Path, keyring: "atrest.Keyring | None | str") -> None:
        self.path = path
        self._keyring = keyring
        self._by_seg: dict[int, tuple[int, AESGCM]] = {}
        self._lock = threading.Lock()

    @property
    def keyring(self) -> "atrest.Keyring | None":
        """The keyring (AUTO resolved; None when there is none yet)."""
        if self._keyring == AUTO:
            try:
                kr = atrest.keyring_for_journal(self.path)
            except atrest.AtRestError as e:
                raise JournalError(f"journal {self.path}: {e}") from None
            if kr is not None:
                self._keyring = kr
            return kr
        return self._keyring  # type: ignore[return-value]

    def for_segment(self, seg: int, key_id: int) -> AESGCM | None:
        """The cipher of segment ``seg`` sealed under ``key_id`` (None: clear)."""
        if not key_id:
            return None
        with self._lock:
            c = self._by_seg.get(seg)
            if c is not None and c[0] == key_id:
                return c[1]
        kr = self.keyring
        if kr is None:
            raise JournalError(f"journal {self.path}: {_seg_name(seg)} is sealed with at-rest key {key_id} "
                               f"and no keyring was found (DATA/appliance/{atrest.KEYRING_NAME})")
        try:
            if not kr.has(key_id):
                kr.refresh()  # rotated since we read it?
            key = kr.key(key_id)
        except atrest.AtRestError as e:
            raise JournalError(f"journal {self.path}: {_seg_name(seg)} is sealed with at-rest key {key_id}: {e}") from None
        cipher = atrest.segment_cipher(key, seg)
        with self._lock:
            self._by_seg[seg] = (key_id, cipher)
        return cipher


class SegmentReader:
    """Committed records of a journal read at (segment, entry offset) through
    our own read-only descriptors — for readers that must not share the
    writer's `Journal` (PIT reader, distributor).  Entry CRC checked, sealed
    records decrypted (`read_record_at`).  Thread-safe."""

    def __init__(self, path: str | Path, keyring: "atrest.Keyring | None | str" = AUTO) -> None:
        self.path = Path(path)
        self._ciphers = SegmentCiphers(self.path, keyring)
        self._fds: dict[int, tuple[int, AESGCM | None]] = {}
        self._lock = threading.Lock()

    def _segment(self, seg: int) -> tuple[int, AESGCM | None]:
        with self._lock:
            got = self._fds.get(seg)
        if got is not None:
            return got
        p = self.path / _seg_name(seg)
        try:
            fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise JournalError(f"journal {self.path}: cannot open {_seg_name(seg)}: {e.strerror or e}") from None
        try:
            key_id, why = parse_segment_head(os.pread(fd, _SEG_HEAD.size, 0), seg, f"journal {self.path}: {_seg_name(seg)}")
            if why:
                raise JournalCorrupt(f"journal {self.path}: {_seg_name(seg)}: {why}")
            cipher = self._ciphers.for_segment(seg, key_id)
        except BaseException:
            os.close(fd)
            raise
        with self._lock:
            if seg in self._fds:  # another thread won the race
                os.close(fd)
                return self._fds[seg]
            self._fds[seg] = (fd, cipher)
        return fd, cipher

    def read_record(self, seg: int, pos: int) -> Record:
        fd, cipher = self._segment(seg)
        return read_record_at(lambda off, n: os.pread(fd, n, off), cipher, pos,
                              f"journal {self.path}: {_seg_name(seg)} offset {pos}")

    def read_records(self, seg: int, positions: list[int], end: int) -> list[Record]:
        """The records whose entries start at ``positions`` (ascending) of one
        segment, with one ``pread`` from the first up to ``end`` (an upper
        bound of the last entry's end; anything past it is read on its own):
        the records of one distribution step lie back to back, and a syscall
        per entry head and payload cost more than the bytes."""
        fd, cipher = self._segment(seg)
        base = positions[0]
        buf = memoryview(os.pread(fd, max(0, end - base), base))
        top = base + len(buf)

        def pread(off: int, n: int) -> bytes | memoryview:
            return buf[off - base : off - base + n] if off + n <= top else os.pread(fd, n, off)

        return [read_record_at(pread, cipher, pos, f"journal {self.path}: {_seg_name(seg)} offset {pos}")
                for pos in positions]

    def close(self) -> None:
        with self._lock:
            for fd, _ in self._fds.values():
                os.close(fd)
            self._fds.clear()


def segment_key_ids(journal_dir: str | Path) -> tuple[dict[int, int], list[str]]:
    """({key id: segments sealed with it}, [segments whose header is
    unreadable]) of one journal, from the segment headers alone (no lock:
    safe while the appliance runs).  Key id 0 counts segments in clear."""
    jd = Path(journal_dir)
    use: dict[int, int] = {}
    bad: list[str] = []
    for p in sorted(jd.glob("*" + SEGMENT_SUFFIX)):
        stem = p.name[: -len(SEGMENT_SUFFIX)]
        if not stem.isdigit():
            continue
        with open(p, "rb") as f:
            head = f.read(_SEG_HEAD.size)
        try:
            key_id, why = parse_segment_head(head, int(stem), f"journal {jd}: {p.name}")
        except JournalCorrupt:
            why = "unsupported header"
        if why:
            bad.append(p.name)
            continue
        use[key_id] = use.get(key_id, 0) + 1
    return use, bad


class Journal:
    """One CG's journal.  Thread-safe: `append_batch` and readers may run in
    different threads (the server appends from a worker thread)."""

    def __init__(self, path: Path, fs: Filesystem, segment_size: int, readonly: bool,
                 keyring: "atrest.Keyring | None | str" = None, stop_at_damage: bool = False) -> None:
        self.path = Path(path)
        self._fs = fs
        self._segment_size = segment_size
        self.readonly = readonly
        self._lock = threading.Lock()
        self._files: dict[int, DurableFile] = {}
        self._segments: list[int] = []
        self._seg_sizes: dict[int, int] = {}
        self._seg_keys: dict[int, int] = {}  # segment -> at-rest key id (0 = clear)
        self._ciphers = SegmentCiphers(self.path, keyring)
        self._last_checked = False  # the writer compared the last segment's key with the active one
        self._sealed_cache: OrderedDict[tuple[int, int], bytes] = OrderedDict()  # (seg, pos) -> record data
        self._sealed_cache_bytes = 0
        self._recs: list[tuple[int, int, int]] = []  # (seq, segment, entry offset), seq ascending
        self._seqs: list[int] = []  # seqs of _recs, for bisect
        self._commits: list[tuple[int, int]] = []  # (t_last_ns, last_seq)
        # fp -> (segment, file offset, length) in a clear segment, or
        # (segment, entry offset, offset in the record's data, length) in a sealed one
        self._blocks: dict[bytes, tuple[int, ...]] = {}
        # Retention (rule 10): per segment, the newest seq of a record referencing
        # a block homed there, and its last COMMIT (last seq, time).
        self._ref_last: dict[bytes, int] = {}  # fp -> newest seq of a later batch's record referencing it
        self._seg_commit: dict[int, tuple[int, int]] = {}
        self._seg_maxrec: dict[int, int] = {}  # newest record seq in a segment
        self._seg_appended: dict[int, int] = {}  # our clock at its last append (open time for older ones)
        self._carried_end = 0  # bytes of carried.blk in use
        self._carried_keys: dict[int, int] = {}  # at-rest key id -> carried blocks sealed with it
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
        self._stop_at_damage = stop_at_damage
        self.damage: str | None = None  # rule 9: where a stop_at_damage open stopped

    # -- open / recovery --------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, *, fs: Filesystem | None = None, segment_size: int = DEFAULT_SEGMENT_SIZE,
             readonly: bool = False, create: bool = True, keyring: "atrest.Keyring | None | str" = AUTO,
             stop_at_damage: bool = False) -> "Journal":
        """Open (creating it unless readonly / not create) and recover.  In
        writer mode the uncommitted tail is cut and an exclusive lock held;
        readonly mode ignores the tail and never writes.  ``keyring``: the
        at-rest keys (rule 8); AUTO = the data directory's keyring if any,
        None = none (new segments in clear, sealed ones unreadable).
        ``stop_at_damage`` (read-only): index the prefix before damage
        instead of raising `JournalCorrupt` (rule 9)."""
        fs = fs or OsFilesystem()
        path = Path(path)
        if segment_size < _SEG_HEAD.size + 2 * _ENTRY.size + _COMMIT.size:
            raise ValueError(f"segment_size {segment_size} is too small")
        if stop_at_damage and not readonly:
            raise ValueError("stop_at_damage is for read-only opens: a writer must not append after damage")
        j = cls(path, fs, segment_size, readonly, keyring, stop_at_damage)
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
            if not readonly:
                j._ciphers.keyring  # a writer fails now, not at its first segment, on a bad keyring
            j._recover()
        except BaseException:
            j.close()
            raise
        j._durable_seq = j._last_seq  # what recovery kept is on disk
        return j

    def _load_carried(self) -> None:
        """Index ``carried.blk`` (rule 10) before the segments, so references
        to carried blocks resolve; a torn tail (a crash while carrying) is
        ignored, and cut by a writer."""
        path = self.path / CARRIED_NAME
        if not self._fs.exists(path):
            return
        f = self._fs.open(path, readonly=self.readonly)
        try:
            buf = f.pread(0, f.size())
        finally:
            f.close()
        pos = 0
        while pos + _CARRY.size <= len(buf):
            magic, key_id, fp, n, _nonce, crc = _CARRY.unpack_from(buf, pos)
            end = pos + _CARRY.size + n
            if magic != _CARRY_MAGIC or end > len(buf) or zlib.crc32(
                    memoryview(buf)[pos + _CARRY.size : end], zlib.crc32(memoryview(buf)[pos : pos + _CARRY.size - 4])) != crc:
                break
            self._blocks[fp] = (CARRY_SEGMENT, pos)
            self._carried_keys[key_id] = self._carried_keys.get(key_id, 0) + 1
            pos = end
        self._carried_end = pos
        if pos < len(buf) and not self.readonly:
            log.warning("journal %s: cutting a torn tail of %s at offset %d", self.path, CARRIED_NAME, pos)
            f = self._fs.open(path)
            try:
                f.truncate(pos)
                f.sync()
            finally:
                f.close()

    def _recover(self) -> None:
        self._load_carried()
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
        try:
            for seg in segs:
                f = self._fs.open(self.path / _seg_name(seg), readonly=self.readonly)
                try:
                    buf = f.pread(0, f.size())
                finally:
                    f.close()
                contents[seg] = buf
                if damage is not None:
                    continue  # only searched for commits below
                key_id, problem = parse_segment_head(buf, seg, str(self.path / _seg_name(seg)))
                if problem:
                    damage = (seg, 0, problem)
                    continue
                self._seg_keys[seg] = key_id
                cipher = self._ciphers.for_segment(seg, key_id)
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
                        rec = open_record_payload(cipher, pos, buf[pos : pos + 8], payload,
                                                  f"{self.path / _seg_name(seg)} offset {pos}")
                        last = pending.recs[-1][0] if pending.recs else self._last_seq
                        if rec.seq <= last:
                            raise JournalCorrupt(f"{self.path / _seg_name(seg)} offset {pos}: record seq {rec.seq} not after {last}")
                        for _, fp in rec.refs:
                            if fp in pending.blocks:
                                continue  # held by an earlier record of this batch
                            home = self._blocks.get(fp)
                            if home is None:
                                raise JournalCorrupt(f"{where}: record seq {rec.seq} references unknown block {fp.hex()}")
                            pending.refs[fp] = rec.seq
                        base = pos + _ENTRY.size + _data_offset(rec)
                        for _, doff, n in _data_blocks(rec):
                            fp = fingerprint(rec.data[doff : doff + n])
                            # The newest copy is the home (rule 10): a trimmed old copy is then never needed.
                            pending.blocks[fp] = (seg, base + doff, n) if cipher is None else (seg, pos, doff, n)
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
                        self._apply(pending, batch_id, first, last, t_first, t_last, seg)
                        pending = _Pending([], {})
                        pending_count = 0
                        committed_end = (seg, end)
                    pos = end

            if damage is not None:
                seg0, pos0, why = damage
                after = self._find_commit_after(damage, segs, contents)
                if after is not None:
                    msg = (f"journal {self.path}: corrupt entry in segment {_seg_name(seg0)} at offset {pos0} ({why}), "
                           f"before committed data (a COMMIT at {_seg_name(after[0])} offset {after[1]})")
                    raise JournalCorrupt(msg if self._stop_at_damage else msg + "; refusing to open")
                log.warning("journal %s: discarding torn tail at %s offset %d (%s)", self.path, _seg_name(seg0), pos0, why)
        except JournalCorrupt as e:
            if not self._stop_at_damage:
                raise
            # Rule 9: everything committed before the damage stays readable.
            self.damage = str(e)
            log.info("journal %s: read-only open stops at damage: %s", self.path, e)  # the caller reports it

        # Decide the committed extent of every segment; cut the rest (writer only).
        keep_until = committed_end
        for seg in segs:
            size = len(contents.get(seg, b""))
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
                self._seg_keys.pop(seg, None)
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

    def _find_commit_after(self, damage: tuple[int, int, str], segs: list[int],
                           contents: dict[int, bytes]) -> tuple[int, int] | None:
        """Rule 3: (segment, offset) of a valid COMMIT after the damage, if any
        (then it is corruption, not a torn tail)."""
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
                    return seg, i
                start = i + 1
        return None

    def _apply(self, p: _Pending, batch_id: int, first: int, last: int, t_first: int, t_last: int,
               commit_seg: int) -> None:
        if first > self._last_seq + 1 and self._last_seq:
            self._gaps += 1
        self._recs.extend(p.recs)
        self._seqs.extend(s for s, _, _ in p.recs)
        for seq, seg, _ in p.recs:
            self._seg_maxrec[seg] = seq
        self._blocks.update(p.blocks)  # the newest copy of a block is its home (rule 10)
        for fp, seq in p.refs.items():
            if seq > self._ref_last.get(fp, 0):
                self._ref_last[fp] = seq
        self._seg_commit[commit_seg] = (last, t_last)
        self._seg_appended[commit_seg] = time.time_ns()
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
            cross: dict[bytes, int] = {}  # block an earlier batch holds -> newest seq referencing it
            for r in new:
                for _, fp in r.refs:
                    if fp in known:
                        continue  # an earlier record of this batch holds it
                    home = self._blocks.get(fp)
                    if home is None:
                        raise BatchRejected(f"batch {m.batch_id}: record seq {r.seq} references block {fp.hex()} "
                                            f"that this journal does not hold")
                    cross[fp] = r.seq
                fps = [(doff, n, fingerprint(r.data[doff : doff + n])) for _, doff, n in _data_blocks(r)]
                known.update((fp, None) for _, _, fp in fps)
                blocks.append(fps)
                encoded.append(encode_record(r))  # framed (and sealed) in _write, where its offset is known
            commit = _entry(TAG_COMMIT, _COMMIT.pack(m.batch_id, first, m.last_seq, m.t_first_ns, m.t_last_ns, len(new)))
            try:
                pending = self._write(new, blocks, encoded, commit, sync)
            except OSError as e:
                self._failed = f"{type(e).__name__}: {e}"
                log.error("journal %s: write failed, journal is now failed: %s", self.path, self._failed)
                raise JournalError(f"journal {self.path}: write failed ({self._failed}); nothing acknowledged") from e
            pending.refs = cross
            self._apply(pending, m.batch_id, first, m.last_seq, m.t_first_ns, m.t_last_ns, self._segments[-1])
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
            seg = self._segments[-1]
            f = self._files.get(seg)
            if f is None:
                f = self._files[seg] = self._fs.open(self.path / _seg_name(seg))
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
            self._last_checked = True
            return self._new_segment(1)
        seg = self._segments[-1]
        f = self._files.get(seg)
        if f is None:
            f = self._files[seg] = self._fs.open(self.path / _seg_name(seg))
        if not self._last_checked:
            # First append since open: a segment sealed under another key (or
            # sealed when we would write in clear, or the reverse) is closed,
            # not continued — rule 8.
            self._last_checked = True
            if self._seg_keys.get(seg, 0) != self._wanted_key():
                f.sync()  # rule 1: the previous segment is complete before a new one exists
                return self._new_segment(seg + 1)
        return seg, f

    def _wanted_key(self) -> int:
        """The at-rest key id a new segment is sealed with (0 = clear): the
        keyring's active key, re-read if the file changed (rule 8)."""
        try:
            kr = self._ciphers.keyring  # AUTO: looked up again until there is one
        except JournalError as e:
            log.error("%s; new segments stay in clear", e)
            return 0
        if kr is None:
            return 0
        try:
            kr.refresh()
        except atrest.AtRestError as e:
            log.error("journal %s: %s; keeping the keys read earlier", self.path, e)
        return kr.active or 0

    def _new_segment(self, seg: int) -> tuple[int, DurableFile]:
        key_id = self._wanted_key()
        self._ciphers.for_segment(seg, key_id)  # derive (and check the key) before the file exists
        f = self._fs.open(self.path / _seg_name(seg), create=True)
        self._files[seg] = f
        f.append(segment_head(seg, key_id))
        self._fs.sync_dir(self.path)  # the name is durable before data relies on it
        self._segments.append(seg)
        self._seg_sizes[seg] = _SEG_HEAD.size
        self._seg_keys[seg] = key_id
        return seg, f

    def _write(self, recs: list[Record], blocks: list[list[tuple[int, int, bytes]]], encoded: list[bytes],
               commit: bytes, sync: bool = True) -> _Pending:
        pending = _Pending([], {})
        seg, f = self._current()
        size = f.size()
        # A batch that fits in a segment starts a new one rather than span two,
        # so segments end at batch boundaries and retention can trim them one
        # by one (rule 10); only a batch larger than a segment spans segments.
        total = sum(_ENTRY.size + len(e) + SEALED_OVERHEAD for e in encoded) + len(commit)
        if size > _SEG_HEAD.size and size + total > self._segment_size and _SEG_HEAD.size + total <= self._segment_size:
            f.sync()  # rule 1: the old segment is complete before a new one exists
            seg, f = self._new_segment(seg + 1)
            size = f.size()
        cipher = self._ciphers.for_segment(seg, self._seg_keys.get(seg, 0))
        nonces = b""
        buf = bytearray()
        for i, (r, fps, enc) in enumerate(zip(recs, blocks, encoded, strict=True)):
            esize = _ENTRY.size + len(enc) + (SEALED_OVERHEAD if cipher is not None else 0)
            if size + len(buf) > _SEG_HEAD.size and size + len(buf) + esize > self._segment_size:
                f.append(bytes(buf))
                f.sync()  # rule 1: the old segment is complete before a new one exists
                self._seg_sizes[seg] = f.size()
                buf.clear()
                seg, f = self._new_segment(seg + 1)
                cipher = self._ciphers.for_segment(seg, self._seg_keys[seg])
                size = f.size()
            pos = size + len(buf)
            if cipher is None:
                buf += _entry(TAG_RECORD, enc)
                base = pos + _ENTRY.size + _data_offset(r)
                locs = [(fp, (seg, base + doff, n)) for doff, n, fp in fps]
            else:
                if not nonces:  # one system call per batch, not per record
                    nonces = os.urandom(atrest.NONCE_SIZE * len(recs))
                buf += seal_record_entry(cipher, pos, enc, nonces[i * atrest.NONCE_SIZE : (i + 1) * atrest.NONCE_SIZE])
                locs = [(fp, (seg, pos, doff, n)) for doff, n, fp in fps]
            pending.recs.append((r.seq, seg, pos))
            for fp, loc in locs:
                pending.blocks[fp] = loc  # the newest copy is the home (rule 10)
        buf += commit  # the COMMIT may overhang segment_size by its 56 bytes
        f.append(bytes(buf))
        if sync:
            f.sync()
        self._seg_sizes[seg] = f.size()
        return pending

    # -- retention (rule 10) --------------------------------------------------------

    def segment_facts(self) -> list[SegmentInfo]:
        """What retention needs of every segment, oldest first."""
        with self._lock:
            out = []
            for seg in self._segments:
                last, t_last = self._seg_commit.get(seg, (0, 0))
                out.append(SegmentInfo(seg, last, t_last, self._seg_sizes.get(seg, 0), 0,
                                       self._seg_maxrec.get(seg, 0) <= last, self._seg_appended.get(seg, 0)))
            return out

    def trim(self, upto_segment: int) -> int:
        """Delete every segment <= ``upto_segment`` (never the last one) and
        forget what the index holds of them; returns how many went. The
        caller applied their records to the base images first (retention)."""
        with self._lock:
            self._check_usable()
            if not self._segments or upto_segment >= self._segments[-1]:
                raise JournalError(f"journal {self.path}: the segment being written cannot be trimmed")
            gone = [s for s in self._segments if s <= upto_segment]
            if not gone:
                return 0
            base_seq = max(self._seg_commit.get(s, (0, 0))[0] for s in gone)
            dead = set(gone)
            # Blocks a kept record references (a later batch's record past the
            # base) move to carried.blk before their segment goes.
            # A kept record (seq > base) may reference a block whose only copy
            # before it is in a trimmed segment (a block's home moves to its
            # newest copy, which may come after that record): carry every block
            # referenced after the base that is not carried yet.
            carry = [fp for fp, seq in self._ref_last.items()
                     if seq > base_seq and fp in self._blocks and len(self._blocks[fp]) != 2]
            self._carry(carry)
            self._ref_last = {fp: seq for fp, seq in self._ref_last.items() if seq > base_seq}
            for s in gone:
                f = self._files.pop(s, None)
                if f is not None:
                    f.close()
            for s in gone:  # oldest first: a crash leaves a contiguous journal
                self._fs.remove(self.path / _seg_name(s))
            self._fs.sync_dir(self.path)
            self._segments = [s for s in self._segments if s not in dead]
            for d in (self._seg_sizes, self._seg_keys, self._seg_commit, self._seg_maxrec,
                      self._seg_appended):
                for s in gone:
                    d.pop(s, None)
            i = bisect.bisect_right(self._seqs, base_seq)
            del self._recs[:i], self._seqs[:i]
            self._commits = [c for c in self._commits if c[1] > base_seq]
            self._first_time = self._commits[0][0] if self._commits else 0
            self._blocks = {fp: loc for fp, loc in self._blocks.items() if loc[0] not in dead or len(loc) == 2}
            for k in [k for k in self._sealed_cache if k[0] in dead]:
                self._sealed_bytes_drop(k)
            log.info("journal %s: trimmed %d segment(s) through %s (base seq %d, %d referenced blocks carried)",
                     self.path, len(gone), _seg_name(gone[-1]), base_seq, len(carry))
            return len(gone)

    def _sealed_bytes_drop(self, key: tuple[int, int]) -> None:
        data = self._sealed_cache.pop(key)
        self._sealed_cache_bytes -= len(data)

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
        if len(loc) == 2:  # carried (rule 10)
            seg, off = loc
            data = self._read_carried(off, fp)
            n = len(data)
        elif len(loc) == 3:  # clear segment: the block's bytes are in the file as they are
            seg, off, n = loc
            data = self._reader(seg).pread(off, n)
        else:  # sealed: the whole record is decrypted (and kept a little while)
            seg, off, doff, n = loc
            data = self._sealed_data(seg, off)[doff : doff + n]
        if len(data) != n or fingerprint(data) != fp:
            raise JournalCorrupt(f"journal {self.path}: block {fp.hex()} at {_seg_name(seg)} offset {off} is damaged")
        return data

    def _carried_file(self) -> DurableFile:
        f = self._files.get(CARRY_SEGMENT)
        if f is None:
            path = self.path / CARRIED_NAME
            create = not self.readonly and not self._fs.exists(path)
            f = self._files[CARRY_SEGMENT] = self._fs.open(path, readonly=self.readonly, create=create)
        return f

    def _read_carried(self, off: int, fp: bytes) -> bytes:
        f = self._carried_file()
        head = f.pread(off, _CARRY.size)
        magic, key_id, hfp, n, nonce, _crc = _CARRY.unpack(head)
        stored = f.pread(off + _CARRY.size, n)
        where = f"journal {self.path}: {CARRIED_NAME} offset {off}"
        if magic != _CARRY_MAGIC or hfp != fp or len(stored) != n:
            raise JournalCorrupt(f"{where}: not the carried block {fp.hex()}")
        if not key_id:
            return stored
        try:
            return self._ciphers.for_segment(CARRY_SEGMENT, key_id).decrypt(nonce, stored, head[:24])
        except InvalidTag:
            raise JournalCorrupt(f"{where}: carried block fails authentication") from None

    def _carry(self, fps: list[bytes]) -> None:
        """Append these blocks to carried.blk (sealed under the active key),
        fsync, and make it their home (rule 10). Lock held."""
        key_id = self._wanted_key()
        cipher = self._ciphers.for_segment(CARRY_SEGMENT, key_id) if key_id else None
        buf = bytearray()
        locs = {}
        for fp in fps:
            plain = self._read_block(fp)
            nonce = os.urandom(atrest.NONCE_SIZE) if cipher is not None else bytes(atrest.NONCE_SIZE)
            head = _CARRY.pack(_CARRY_MAGIC, key_id, fp, len(plain) + (atrest.TAG_SIZE if cipher else 0), nonce, 0)[:-4]
            stored = cipher.encrypt(nonce, plain, head[:24]) if cipher is not None else plain
            locs[fp] = (CARRY_SEGMENT, self._carried_end + len(buf))
            buf += head + struct.pack(">I", zlib.crc32(stored, zlib.crc32(head))) + stored
        if not buf:
            return
        new = CARRY_SEGMENT not in self._files and not self._fs.exists(self.path / CARRIED_NAME)
        f = self._carried_file()
        f.append(bytes(buf))
        f.sync()
        if new:
            self._fs.sync_dir(self.path)
        self._carried_end += len(buf)
        self._carried_keys[key_id] = self._carried_keys.get(key_id, 0) + len(locs)
        self._blocks.update(locs)

    def _sealed_data(self, seg: int, pos: int) -> bytes:
        key = (seg, pos)
        data = self._sealed_cache.get(key)
        if data is not None:
            self._sealed_cache.move_to_end(key)
            return data
        data = self.read_entry(seg, pos).data
        self._sealed_cache[key] = data
        self._sealed_cache_bytes += len(data)
        while self._sealed_cache_bytes > _SEALED_CACHE_BYTES and len(self._sealed_cache) > 1:
            _, old = self._sealed_cache.popitem(last=False)
            self._sealed_cache_bytes -= len(old)
        return data

    def read_block(self, fp: bytes) -> bytes:
        """The 4 KiB block with fingerprint ``fp`` (a dedup reference target)."""
        with self._lock:
            return self._read_block(fp)

    def _cipher(self, seg: int) -> AESGCM | None:
        key_id = self._seg_keys.get(seg)
        if key_id is None:  # a segment recovery did not read (read-only open of a growing journal)
            where = f"journal {self.path}: {_seg_name(seg)}"
            key_id, why = parse_segment_head(self._reader(seg).pread(0, _SEG_HEAD.size), seg, where)
            if why:
                raise JournalCorrupt(f"{where}: {why}")
            self._seg_keys[seg] = key_id
        return self._ciphers.for_segment(seg, key_id)

    def read_entry(self, seg: int, pos: int) -> Record:
        """The record whose entry starts at (segment, offset), CRC-checked
        (and decrypted when its segment is sealed)."""
        f = self._reader(seg)
        return read_record_at(f.pread, self._cipher(seg), pos, f"journal {self.path}: {_seg_name(seg)} offset {pos}")

    def key_ids(self) -> dict[int, int]:
        """{at-rest key id: segments sealed with it} (0 = in clear)."""
        with self._lock:
            out: dict[int, int] = {}
            for seg in self._segments:
                k = self._seg_keys.get(seg, 0)
                out[k] = out.get(k, 0) + 1
            for k, n in self._carried_keys.items():  # carried blocks use keys too (rule 10)
                out[k] = out.get(k, 0) + n
            return out

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
