"""Per-CG journal: append-only segments, checksummed entries, commit markers.

Layout (`nicsplit.core.layout.Layout.journal`; docs/journal.md lists every byte)::

    DATA/appliance/journal/<cg>/00000001.seg, 00000002.seg, ...   segments
    DATA/appliance/journal/<cg>/carried.blk                       blocks carried over a trim (rule 10)
    DATA/appliance/journal/<cg>/lock                              writer lock (flock)

The byte layouts are `nicsplit.journal.format`'s; the walk over the entries
at open is `nicsplit.journal.scan`'s (the same the PIT index uses); the
files live in a `nicsplit.storage.segments.SegmentStore` (a directory
through `durable.Filesystem` unless told otherwise).  This module is the
`Journal`: append, commit, fsync, recover at open, trim, and its index.

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
3. A damaged entry (bad CRC, bad head, truncated) followed by no valid COMMIT
   (`scan.find_commit`, the same resync the PIT index uses) is a torn tail
   (rule 2).  A damaged entry with a valid COMMIT after it is corruption of
   acknowledged data: `JournalCorrupt` names the segment and offset and the
   journal does not open.  So is an entry whose CRC verifies but whose content
   does not make sense (seqs out of order, a COMMIT that does not match its
   records, a record that does not decode): that is no torn write.
4. A failed write or fsync is fatal (durable.py rule 4): the journal turns
   *failed* and refuses every later call; the process restarts and recovers.
5. A batch whose seqs are all <= ``last_seq`` is a duplicate: acknowledged,
   not applied.  One that overlaps is applied from ``last_seq + 1`` on.  One
   that starts after ``last_seq + 1`` leaves a gap that is counted and logged
   (the card only skips seqs it marked dirty for resync).  A gap wider than
   `MAX_SEQ_GAP`, or a seq above `MAX_SEQ`, is no gap but a broken sender:
   the batch is rejected (`BatchRejected`), because once journaled it would
   make every later real write look like a duplicate.
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
   scanner still tells damage from a torn tail.  Every record read goes
   through `format.open_record_payload` — the one place that decrypts.  The
   writer starts a new segment (instead of appending to the last one) when the
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

Example::

    with Journal.open(Layout(data).journal("cg1")) as j:
        j.append_batch(batch_meta, records)          # durable when it returns
        for rec, payload in j.records(from_seq=1):   # references resolved
            ...
"""

from __future__ import annotations

import bisect
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from itertools import repeat
from operator import itemgetter
from pathlib import Path
from typing import Iterator, Protocol, Sequence

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from nicsplit.journal.format import (
    CARRIED_NAME, CARRY_SEGMENT, COMMIT, ENTRY, SEALED_OVERHEAD, SEGMENT_HEAD, SEGMENT_SUFFIX, TAG_RECORD,
    JournalCorrupt, JournalError, carried_entries, data_blocks, data_offset, encode_commit,
    encode_entry, open_record_payload, seal_record_entries_into, sealed_entries_size, seg_name, seg_number, segment_head,
)
from nicsplit.journal.reader import AUTO, JournalFiles
from nicsplit.journal.scan import (
    BadSpot, Commit, CommitEntry, EntryWalk, RecordEntry, RecordHead, SegmentHeader, resync,
)
from nicsplit.journal.trim import RetentionMixin, SegmentInfo
from nicsplit.storage import atrest
from nicsplit.storage.durable import DurableFile, Filesystem
from nicsplit.storage.segments import LocalSegmentStore, SegmentStore
from nicsplit.core.records import BLOCK_SIZE
from nicsplit.wire.frames import Record, expand, fingerprint
from nicsplit.wire.wirerecords import WireRecord, wire_records

__all__ = [
    "DEFAULT_SEGMENT_SIZE", "Journal", "JournalError", "JournalCorrupt", "BatchRejected", "BatchMeta",
    "AppendResult", "JournalStatistics", "SegmentInfo", "AUTO",
]

log = logging.getLogger("nicsplit.journal.writer")

_HEAD_COLS = [WireRecord._fields.index(f) for f in RecordHead._fields[:7]]  # then segment, pos
_REFS, _WIRE, _DATA = (WireRecord._fields.index(f) for f in ("refs", "wire", "data"))

# Rule 5's bounds. Host seqs come in reservations of 2^16 (host/sequencer.py)
# and a restart skips at most one: 2^32 allows 65536 restarts in a row, while
# a wild seq (2^62) is refused. 2^48 seqs: 8.9 years at 10^6 writes/s.
MAX_SEQ_GAP = 1 << 32
MAX_SEQ = 1 << 48

# 64 MiB: 4 full 16 MiB batches; small enough to read whole at open, large
# enough that a busy CG creates a new file (and a directory fsync) rarely.
DEFAULT_SEGMENT_SIZE = 64 * 1024 * 1024

# The write buffer a journal keeps (`Journal._buffer`): a card's 1 MiB batch fits.
_REUSE_BUFFER = 2 * 1024 * 1024


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
    # What the keyless scanner would read back of this batch: (Commit, [RecordHead],
    # (segment, offset) of its first entry, (segment, offset) after its COMMIT),
    # for `PitIndex.feed`; None for a duplicate.
    batch: tuple[Commit, list[RecordHead], tuple[int, int], tuple[int, int]] | None = None


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
    start: tuple[int, int] = (0, 0)  # (segment, offset) of the batch's first entry (appends only)
    commit: tuple[int, int] = (0, 0)  # (segment, offset) of its COMMIT entry (appends only)


class Journal(RetentionMixin):
    """One CG's journal.  Thread-safe: `append_batch` and readers may run in
    different threads (the server appends from a worker thread)."""

    def __init__(self, path: Path, store: SegmentStore, segment_size: int, readonly: bool,
                 keyring: "atrest.Keyring | None | str" = None, stop_at_damage: bool = False) -> None:
        self.path = Path(path)
        self._store = store
        self._segment_size = segment_size
        self.readonly = readonly
        self._lock = threading.Lock()
        self._segments: list[int] = []
        self._seg_sizes: dict[int, int] = {}
        self._io = JournalFiles(self.path, store, readonly, keyring)  # open files, segment keys
        self._last_checked = False  # the writer compared the last segment's key with the active one
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
        self._wbuf = bytearray()  # _write's buffer, kept between batches (see _buffer)
        self.damage: str | None = None  # rule 9: where a stop_at_damage open stopped

    # -- open / recovery --------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, *, fs: Filesystem | None = None, store: SegmentStore | None = None,
             segment_size: int = DEFAULT_SEGMENT_SIZE, readonly: bool = False, create: bool = True,
             keyring: "atrest.Keyring | None | str" = AUTO, stop_at_damage: bool = False) -> "Journal":
        """Open (creating it unless readonly / not create) and recover.  In
        writer mode the uncommitted tail is cut and an exclusive lock held;
        readonly mode ignores the tail and never writes.  The files live in
        ``store`` (default: the directory ``path`` through ``fs``, by default
        the real filesystem); ``path`` names the journal in messages and
        finds the data directory's keyring.  ``keyring``: the at-rest keys
        (rule 8); AUTO = the data directory's keyring if any, None = none
        (new segments in clear, sealed ones unreadable).  ``stop_at_damage``
        (read-only): index the prefix before damage instead of raising
        `JournalCorrupt` (rule 9)."""
        path = Path(path)
        store = store or LocalSegmentStore(path, fs)
        if segment_size < SEGMENT_HEAD.size + 2 * ENTRY.size + COMMIT.size:
            raise ValueError(f"segment_size {segment_size} is too small")
        if stop_at_damage and not readonly:
            raise ValueError("stop_at_damage is for read-only opens: a writer must not append after damage")
        j = cls(path, store, segment_size, readonly, keyring, stop_at_damage)
        if not store.present():
            if readonly or not create:
                raise JournalError(f"no journal at {path}")
            store.ensure()
        if not readonly:
            try:
                j._lockfile = store.lock()
            except BlockingIOError as e:
                holder = getattr(e, "holder", None)  # `LockHeld` names the pid in the lock file
                who = f"pid {holder}" if holder else "another process"
                raise JournalError(f"journal {path} is in use by {who} (it holds {path}/lock)") from None
        try:
            if not readonly:
                j._io.ciphers.keyring  # a writer fails now, not at its first segment, on a bad keyring
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
        if not self._store.exists(CARRIED_NAME):
            return
        buf = self._store.read(CARRIED_NAME)
        pos = 0
        for at, pos, key_id, fp in carried_entries(buf):
            self._blocks[fp] = (CARRY_SEGMENT, at)
            self._carried_keys[key_id] = self._carried_keys.get(key_id, 0) + 1
        self._carried_end = pos
        if pos < len(buf) and not self.readonly:
            log.warning("journal %s: cutting a torn tail of %s at offset %d", self.path, CARRIED_NAME, pos)
            f = self._store.open(CARRIED_NAME)
            try:
                f.truncate(pos)
                f.sync()
            finally:
                f.close()

    def _segment_numbers(self) -> list[int]:
        """The segments in the store, oldest first: no other names, no gaps."""
        segs: list[int] = []
        for n in self._store.list():
            if n.endswith(SEGMENT_SUFFIX):
                seg = seg_number(n)
                if seg is None:
                    raise JournalCorrupt(f"{self.path / n}: unexpected file name in a journal directory")
                segs.append(seg)
        segs.sort()
        for a, b in zip(segs, segs[1:]):
            if b != a + 1:
                raise JournalCorrupt(f"{self.path}: segment {seg_name(a + 1)} is missing (have {seg_name(b)})")
        return segs

    def _recover(self) -> None:
        self._load_carried()
        segs = self._segment_numbers()
        # Walk everything (the one entry walk, nicsplit.journal.scan); remember
        # the end of the last COMMIT and the first bad spot.
        walk = EntryWalk()
        pending = _Pending([], {})
        committed_end: tuple[int, int] | None = None  # (segment, offset after the last COMMIT)
        damage: tuple[int, BadSpot] | None = None
        contents: dict[int, bytes] = {}
        try:
            for seg in segs:
                buf = contents[seg] = self._store.read(seg_name(seg))
                if damage is not None:
                    continue  # only searched for a COMMIT below
                view = memoryview(buf)
                where = str(self.path / seg_name(seg))
                cipher = None
                for ev in walk.segment(lambda at, n: view[at : at + n], len(buf), seg, 0, where):
                    if isinstance(ev, SegmentHeader):
                        self._io.keys[seg] = ev.key_id
                        cipher = self._io.ciphers.for_segment(seg, ev.key_id)
                    elif isinstance(ev, RecordEntry):
                        self._index_record(pending, ev, cipher, f"{where} offset {ev.head.pos}")
                    elif isinstance(ev, CommitEntry):
                        c = ev.commit
                        self._apply(pending, c.batch_id, c.first_seq, c.last_seq, c.t_first_ns, c.t_last_ns, seg)
                        pending = _Pending([], {})
                        committed_end = (seg, ev.end)
                    elif ev.checked:  # its CRC verified, so not a torn write: corruption (rule 3)
                        raise JournalCorrupt(f"{where} offset {ev.pos}: {ev.why}")
                    else:
                        damage = (seg, ev)

            if damage is not None:
                # Rule 3: a valid COMMIT after the bad spot makes it corruption.
                seg0, bad = damage
                after = resync(((s, contents[s], bad.pos + 1 if s == seg0 else 0) for s in segs if s >= seg0),
                               self._last_seq)
                if after is not None:
                    msg = (f"journal {self.path}: corrupt entry in segment {seg_name(seg0)} at offset {bad.pos} "
                           f"({bad.why}), before committed data (a COMMIT at {seg_name(after[0])} offset {after[1]})")
                    raise JournalCorrupt(msg if self._stop_at_damage else msg + "; refusing to open")
                log.warning("journal %s: discarding torn tail at %s offset %d (%s)", self.path, seg_name(seg0),
                            bad.pos, bad.why)
        except JournalCorrupt as e:
            if not self._stop_at_damage:
                raise
            # Rule 9: everything committed before the damage stays readable.
            self.damage = str(e)
            log.info("journal %s: read-only open stops at damage: %s", self.path, e)  # the caller reports it
        self._cut_tail(segs, contents, committed_end)

    def _index_record(self, pending: _Pending, ev: RecordEntry, cipher: AESGCM | None, where: str) -> None:
        """Decode a record met at open and index it in the batch's pending updates."""
        seg, pos = ev.head.segment, ev.head.pos
        rec = open_record_payload(cipher, pos, ev.head8, ev.payload, where)
        for _, fp in rec.refs:
            if fp in pending.blocks:
                continue  # held by an earlier record of this batch
            if fp not in self._blocks:
                raise JournalCorrupt(f"{where}: record seq {rec.seq} references unknown block {fp.hex()}")
            pending.refs[fp] = rec.seq
        base = pos + ENTRY.size + data_offset(rec)
        for _, doff, n in data_blocks(rec):
            fp = fingerprint(rec.data[doff : doff + n])
            # The newest copy is the home (rule 10): a trimmed old copy is then never needed.
            pending.blocks[fp] = (seg, base + doff, n) if cipher is None else (seg, pos, doff, n)
        pending.recs.append((rec.seq, seg, pos))

    def _cut_tail(self, segs: list[int], contents: dict[int, bytes], keep_until: tuple[int, int] | None) -> None:
        """Decide the committed extent of every segment; cut the rest (writer only)."""
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
                self._store.delete(seg_name(seg))
                self._io.forget({seg})
            else:
                f = self._store.open(seg_name(seg))
                try:
                    f.truncate(new)
                    f.sync()
                finally:
                    f.close()
                self._segments.append(seg)
                self._seg_sizes[seg] = new
        if self._truncated and not self.readonly:
            self._store.sync_names()
            log.warning("journal %s: cut %d uncommitted bytes at open", self.path, self._truncated)

    def _apply(self, p: _Pending, batch_id: int, first: int, last: int, t_first: int, t_last: int,
               commit_seg: int) -> None:
        if first > self._last_seq + 1 and self._last_seq:
            self._gaps += 1
        self._recs.extend(p.recs)
        self._seqs.extend(map(itemgetter(0), p.recs))
        if p.recs and p.recs[0][1] == p.recs[-1][1]:  # the batch is in one segment (the common case)
            self._seg_maxrec[p.recs[-1][1]] = p.recs[-1][0]
        else:
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

    def append_batch(self, batch_meta: BatchMeta, records: Sequence[Record] | Sequence[WireRecord], *,
                     sync: bool = True) -> AppendResult:
        """Append one batch and make it durable before returning (rule 1).
        Duplicates are acknowledged without writing (rule 5). With
        ``sync=False`` the batch is written but durable only after the next
        `sync()` (group commit: the caller acks nothing before that).
        ``records``: `Record`s, or the `WireRecord`s of a batch plaintext
        (the appliance's ingest: their wire bytes are stored as they are,
        nothing is decoded and encoded again)."""
        with self._lock:
            self._check_usable()
            m = batch_meta
            if m.first_seq < 1 or m.last_seq < m.first_seq:
                raise BatchRejected(f"batch {m.batch_id}: bad seq range {m.first_seq}..{m.last_seq}")
            if m.last_seq > MAX_SEQ:
                raise BatchRejected(f"batch {m.batch_id}: seq {m.last_seq} is above the largest seq a CG reaches "
                                    f"({MAX_SEQ})")
            if self._last_seq and m.last_seq - self._last_seq > MAX_SEQ_GAP:
                raise BatchRejected(f"batch {m.batch_id}: seqs {m.first_seq}..{m.last_seq} are more than {MAX_SEQ_GAP} "
                                    f"past the journal's last seq {self._last_seq}")
            # Batch-level checks (C loops); the per-record loop only names the culprit.
            seqs = [r.seq for r in records]
            if seqs and (seqs[0] < m.first_seq or seqs[-1] > m.last_seq or len(set(seqs)) != len(seqs)
                         or seqs != sorted(seqs)):
                prev = 0
                for seq in seqs:
                    if not m.first_seq <= seq <= m.last_seq or seq <= prev:
                        raise BatchRejected(f"batch {m.batch_id}: record seq {seq} out of order or outside "
                                            f"{m.first_seq}..{m.last_seq}")
                    prev = seq
            if m.last_seq <= self._last_seq:
                self._duplicates += 1
                log.info("journal %s: batch %d (seqs %d..%d) is a duplicate; acknowledged, not applied",
                         self.path, m.batch_id, m.first_seq, m.last_seq)
                return AppendResult(False, self._last_seq, ())
            first = max(m.first_seq, self._last_seq + 1)
            if first > self._last_seq + 1 and self._last_seq:
                log.warning("journal %s: batch %d starts at seq %d after last seq %d: gap",
                            self.path, m.batch_id, first, self._last_seq)
            k = bisect.bisect_left(seqs, first)
            new, seqs = list(records[k:]), seqs[k:]
            if new and not isinstance(new[0], WireRecord):
                new = wire_records(new)  # encoded once (ValueError for a bad record, as before)

            # Validate refs and collect data blocks before writing anything (rule 6).
            blocks: list[list[tuple[int, int, bytes]]] = []  # per record: (offset in data, length, fp)
            cross: dict[bytes, int] = {}  # block an earlier batch holds -> newest seq referencing it
            cols = list(zip(*new)) or [()] * len(WireRecord._fields)  # the batch's columns, one C loop
            datas = cols[_DATA]
            lens = list(map(len, datas))
            single = None  # (fps, lens) when every record is one block inline, the common batch
            known: dict[bytes, None] = {}
            if new and min(lens) > 0 and max(lens) <= BLOCK_SIZE and not any(cols[_REFS]):
                single = (list(map(fingerprint, datas)), lens)
                known = dict.fromkeys(single[0])
            for r in new if single is None else ():
                for _, fp in r.refs:
                    if fp in known:
                        continue  # an earlier record of this batch holds it
                    home = self._blocks.get(fp)
                    if home is None:
                        raise BatchRejected(f"batch {m.batch_id}: record seq {r.seq} references block {fp.hex()} "
                                            f"that this journal does not hold")
                    cross[fp] = r.seq
                fpl = [(doff, n, fingerprint(r.data[doff : doff + n])) for doff, n in r.blocks()]
                for fpt in fpl:
                    known[fpt[2]] = None
                blocks.append(fpl)
            commit = encode_commit(m.batch_id, first, m.last_seq, m.t_first_ns, m.t_last_ns, len(new))
            try:
                pending = self._write(new, cols[_WIRE], seqs, blocks, single, commit, sync)  # offsets known there
            except OSError as e:
                self._failed = f"{type(e).__name__}: {e}"
                log.error("journal %s: write failed, journal is now failed: %s", self.path, self._failed)
                raise JournalError(f"journal {self.path}: write failed ({self._failed}); nothing acknowledged") from e
            pending.refs = cross
            self._apply(pending, m.batch_id, first, m.last_seq, m.t_first_ns, m.t_last_ns, self._segments[-1])
            if sync:
                self._durable_seq = self._last_seq
            cseg, cpos = pending.commit
            _, segs, ats = zip(*pending.recs) if new else ((), (), ())
            heads = list(map(tuple.__new__, repeat(RecordHead), zip(*[cols[c] for c in _HEAD_COLS], segs, ats)))
            batch = (Commit(m.batch_id, first, m.last_seq, m.t_first_ns, m.t_last_ns, len(new), cseg, cpos), heads,
                     pending.start, (cseg, cpos + len(commit)))
            return AppendResult(True, self._last_seq, tuple(known), batch)

    def sync(self) -> None:
        """Make every batch appended so far durable (the group commit's one
        fdatasync). A failure is fatal, like any other (rule 6)."""
        with self._lock:
            self._check_usable()
            if self._durable_seq == self._last_seq or not self._segments:
                return
            seg = self._segments[-1]
            f = self._io.handle(seg)
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
        f = self._io.handle(seg)
        if not self._last_checked:
            # First append since open: a segment sealed under another key (or
            # sealed when we would write in clear, or the reverse) is closed,
            # not continued — rule 8.
            self._last_checked = True
            if self._io.keys.get(seg, 0) != self._wanted_key():
                f.sync()  # rule 1: the previous segment is complete before a new one exists
                return self._new_segment(seg + 1)
        return seg, f

    def _wanted_key(self) -> int:
        """The at-rest key id a new segment is sealed with (0 = clear): the
        keyring's active key, re-read if the file changed (rule 8)."""
        try:
            kr = self._io.ciphers.keyring  # AUTO: looked up again until there is one
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
        self._io.ciphers.for_segment(seg, key_id)  # derive (and check the key) before the file exists
        f = self._store.create(seg_name(seg))
        self._io.add(seg, f, key_id)
        f.append(segment_head(seg, key_id))
        self._store.sync_names()  # the name is durable before data relies on it
        self._segments.append(seg)
        self._seg_sizes[seg] = SEGMENT_HEAD.size
        return seg, f

    def _write(self, recs: list[WireRecord], wires: Sequence[memoryview], seqs: list[int], blocks: list[list[tuple[int, int, bytes]]],
               single: tuple[list[bytes], list[int]] | None, commit: bytes, sync: bool = True) -> _Pending:
        """Frame (and seal) ``recs`` and ``commit``; data blocks: ``blocks`` per record, or
        ``single`` = (fingerprints, lengths) when each record is one block inline."""
        pending = _Pending([], {})
        seg, f = self._current()
        size = f.size()
        # A batch that fits in a segment starts a new one rather than span two,
        # so segments end at batch boundaries and retention can trim them one
        # by one (rule 10); only a batch larger than a segment spans segments.
        total = sealed_entries_size(wires) + len(commit)
        if size > SEGMENT_HEAD.size and size + total > self._segment_size and SEGMENT_HEAD.size + total <= self._segment_size:
            f.sync()  # rule 1: the old segment is complete before a new one exists
            seg, f = self._new_segment(seg + 1)
            size = f.size()
        cipher = self._io.ciphers.for_segment(seg, self._io.keys.get(seg, 0))
        pending.start = (seg, size)
        nonces = b""
        pos = size  # where the next entry starts
        seg_recs, seg_blocks = pending.recs, pending.blocks
        limit, i, count = self._segment_size, 0, len(recs)
        while True:
            # The run of records [i, j) that goes into this segment (all when they fit).
            over = ENTRY.size + (SEALED_OVERHEAD if cipher is not None else 0)
            rest = over * (count - i) + sum(map(len, wires[i:]))
            if pos + rest <= limit:
                j, end = count, pos + rest
            else:
                j, end = i, pos
                while j < count:
                    esize = over + len(wires[j])
                    if end > SEGMENT_HEAD.size and end + esize > limit:
                        break
                    end += esize
                    j += 1
            last = j == count
            # The run's entries (and the COMMIT after the last) framed into one buffer, one write.
            buf = self._buffer(end - pos + (len(commit) if last else 0))
            if cipher is None:
                o = 0
                if single is not None:
                    blocks = [[(0, n, fp)] for fp, n in zip(*single)]
                    single = None
                for r, fps in zip(recs[i:j], blocks[i:j]):
                    entry = encode_entry(TAG_RECORD, r.wire)
                    buf[o : o + len(entry)] = entry
                    o += len(entry)
                    base = pos + ENTRY.size + r.data_offset
                    for doff, n, fp in fps:
                        seg_blocks[fp] = (seg, base + doff, n)  # the newest copy is the home (rule 10)
                    seg_recs.append((r.seq, seg, pos))
                    pos += len(entry)
            elif j > i:
                if not nonces:  # one system call per batch, not per record
                    nonces = os.urandom(atrest.NONCE_SIZE * count)
                ats = seal_record_entries_into(cipher, pos, wires[i:j],
                                               nonces[i * atrest.NONCE_SIZE : j * atrest.NONCE_SIZE], buf)
                seg_recs.extend(zip(seqs[i:j], repeat(seg), ats))
                if single is not None:  # batch-level: no Python loop per record
                    seg_blocks.update(zip(single[0][i:j], zip(repeat(seg), ats, repeat(0), single[1][i:j])))
                else:
                    for fps, at in zip(blocks[i:j], ats):
                        for doff, n, fp in fps:
                            seg_blocks[fp] = (seg, at, doff, n)
            pos, i = end, j
            if last:
                break
            f.append(buf)
            f.sync()  # rule 1: the old segment is complete before a new one exists
            self._seg_sizes[seg] = f.size()
            seg, f = self._new_segment(seg + 1)
            cipher = self._io.ciphers.for_segment(seg, self._io.keys[seg])
            pos = f.size()
        pending.commit = (seg, pos)
        buf[len(buf) - len(commit) :] = commit  # the COMMIT may overhang segment_size by its 56 bytes
        f.append(buf)
        if sync:
            f.sync()
        self._seg_sizes[seg] = f.size()
        return pending

    def _buffer(self, n: int) -> memoryview:
        """An ``n``-byte buffer for one write, up to `_REUSE_BUFFER` the same memory
        each batch (a fresh one costs a page fault per 4 KiB; `DurableFile.append` copies)."""
        if n > _REUSE_BUFFER:
            return memoryview(bytearray(n))
        if len(self._wbuf) < n:
            self._wbuf = bytearray(max(n, min(2 * len(self._wbuf), _REUSE_BUFFER)))
        return memoryview(self._wbuf)[:n]

    # -- reading ------------------------------------------------------------------

    def _read_block(self, fp: bytes) -> bytes:
        loc = self._blocks.get(fp)
        if loc is None:
            raise JournalCorrupt(f"journal {self.path}: block {fp.hex()} is referenced but not held")
        if len(loc) == 2:  # carried (rule 10)
            seg, off = loc
            data = self._io.read_carried(off, fp)
            n = len(data)
        elif len(loc) == 3:  # clear segment: the block's bytes are in the file as they are
            seg, off, n = loc
            data = self._io.handle(seg).pread(off, n)
        else:  # sealed: the whole record is decrypted (and kept a little while)
            seg, off, doff, n = loc
            data = self._io.sealed_data(seg, off)[doff : doff + n]
        if len(data) != n or fingerprint(data) != fp:
            raise JournalCorrupt(f"journal {self.path}: block {fp.hex()} at {seg_name(seg)} offset {off} is damaged")
        return data

    def read_block(self, fp: bytes) -> bytes:
        """The 4 KiB block with fingerprint ``fp`` (a dedup reference target)."""
        with self._lock:
            return self._read_block(fp)

    def read_entry(self, seg: int, pos: int) -> Record:
        """The record whose entry starts at (segment, offset), CRC-checked
        (and decrypted when its segment is sealed)."""
        return self._io.read_entry(seg, pos)

    def key_ids(self) -> dict[int, int]:
        """{at-rest key id: segments sealed with it} (0 = in clear)."""
        with self._lock:
            out: dict[int, int] = {}
            for seg in self._segments:
                k = self._io.keys.get(seg, 0)
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
        self._io.close()
        if self._lockfile is not None:
            self._lockfile.close()
            self._lockfile = None

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
