"""Images of a CG at any point in time: the block index, the PIT reader, and
distribution to replica images with undo data (RecoverPoint's do/undo).

Theory of operation
===================
**Block index** (`BlockIndex`, one per journal, shared by every reader of the
process through `shared_index`).  Built once from the same read-only scan as
the PIT index (`nicsplit.journal.scan.JournalScanner`: entry and record
heads only, no payload read), then extended by `refresh()` as the journal
grows.  It holds

* a record table, one row per WRITE / ZERO / TRIM record in seq order, in
  parallel ``array`` columns (seq, segment, entry offset, vdisk offset, length,
  vdisk id, op): 45 bytes per record.  A row's number is its *ordinal*;
  ordinals and seqs sort the same way, so "latest version <= seq S" is "largest ordinal <= the
  ordinal of S", found once per PIT by one bisect over the seq column;
* per vdisk and 4 KiB block, the ordinals of the records that touch it, in
  ascending order: ``single`` (an ``array('I')``, 4 bytes per block) holds the
  one ordinal (+1; 0 = never written) of a block written once, and blocks
  written more than once move to ``multi[block]`` (an ``array('I')`` of
  ordinals), marked ``MULTI`` in ``single``.  A 1 GiB vdisk written once costs
  1 MiB of index plus the record table.

**PIT reader** (`PitReader`): the image of a vdisk at PIT seq S is, per byte,
the newest record <= S that covers it (WRITE: its payload, ZERO/TRIM: zeros),
zeros if none.  Per block: bisect the block's ordinals for the newest <= S,
walk back while records cover the block only partly (unaligned writes), then
lay them over zeros oldest first.  Nothing is replayed: a PIT of any age is
ready as soon as its ordinal is found (one bisect), hence well within 1 s.
Payloads are read from the segment files with their entry CRC checked
(own read-only descriptors; the writer's objects are never touched), with a
small LRU of decoded records so sequential reads of a large record read it
once.  Deduplicated blocks (references) are resolved through the Journal's
block index (`Journal.read_block` when present, else `Journal.records`).

**Distribution** (`Distributor`): applies the journal in seq order to one raw
sparse image per vdisk (``DATA/appliance/replicas/<cg>/<vdisk>.img``); before
a step touches the images it appends the bytes each record replaces to the
undo log (write-ahead, fsynced), then writes and fsyncs the images, then
atomically persists ``applied_seq``.  `undo_to(seq)` rolls the replica back to
an earlier PIT by laying the undo entries newer than it over the images in
reverse order.  docs/recovery.md §4–5 give the formats and invariants.

Rules
-----
1. Nothing here writes a journal file or a production vdisk.
2. Undo before do: an undo entry is durable before the image bytes it
   describes change.  Hence at open, the undo entries after the persisted
   ``undo_end`` belong to the step that was interrupted; laying them back in
   reverse order returns the images exactly to ``applied_seq`` (harmless when
   the images had not been touched yet), after which the tail is cut.
3. ``state.json`` is replaced atomically (tmp, fsync, rename, fsync dir) and
   only after the images and the undo log were fsynced.
4. A rollback first persists its intent (``rollback_to``); applying undo
   entries newest first is idempotent, so a crash mid-rollback is finished at
   the next open.
5. Failpoints (`Distributor.failpoint`) are called at every step of the
   protocol above; tests raise from them to cut the protocol anywhere.

Example::

    idx = shared_index(journal_dir)
    with PitReader(journal_dir, vdisks_of_cg, idx.pits.latest().seq, index=idx) as r:
        r.pread(vdisk_id, 0, 65536); r.extents(vdisk_id, 0, size)
    d = Distributor(journal_dir, data / "appliance/replicas/cg1", vdisks_of_cg)
    while d.step(256): pass
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import struct
import sys
import threading
import zlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

from nicsplit.core.fsutil import fsync_dir, pwrite_all, punch_hole
from nicsplit.storage import atrest
from nicsplit.journal.scan import Commit, RecordHead
from nicsplit.recovery.pits import PitError, PitIndex
from nicsplit.storage.sealed import BlobSealer, Image, SealedError, open_image
from nicsplit.core.records import Op
from nicsplit.wire.frames import BLOCK_SIZE, RECORD_HEAD_SIZE, REF_SIZE, Record, expand

log = logging.getLogger("nicsplit.recovery.replica")

__all__ = [
    "BlockIndex", "IndexStatistics", "shared_index", "PitReader", "Extent", "ReplicaError", "Distributor",
    "DistributorStatistics", "VdiskLike",
]

MULTI = 0xFFFFFFFF  # in ``single``: the block's ordinals are in ``multi``
_MAX_ENTRY_OVERHEAD = 12 + RECORD_HEAD_SIZE + 12 + 16  # entry head, record head, sealed nonce and tag
assert array("I").itemsize == 4 and array("Q").itemsize == 8

# 64 MiB of decoded payloads per reader: four of the largest (16 MiB) batches'
# records, or 16,384 4 KiB records — enough that a sequential read never
# decodes a record twice.
_CACHE_BYTES = 64 << 20


class ReplicaError(PitError):
    """A replica or reader cannot do what was asked (one clear line)."""


class VdiskLike(Protocol):
    id: int
    name: str
    size: int


# -- block index -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IndexStatistics:
    records: int  # WRITE / ZERO / TRIM records indexed
    pits: int
    vdisks: int
    blocks: int  # (vdisk, block) pairs ever written
    versions: int  # (block, record) pairs
    multi_blocks: int  # blocks written more than once
    memory_bytes: int  # arrays + per-block containers (estimate, sys.getsizeof)


class _Vdisk:
    __slots__ = ("single", "multi", "blocks", "versions")

    def __init__(self) -> None:
        self.single = array("I")
        self.multi: dict[int, array] = {}
        self.blocks = 0
        self.versions = 0


class BlockIndex:
    """Record table + per-vdisk block → ordinals (see the module docstring).
    `refresh()` may run in one thread while readers read in others: columns
    only grow, and a block's ``multi`` array exists before ``single`` says so."""

    def __init__(self, journal_dir: str | Path) -> None:
        self.path = Path(journal_dir)
        self.rec_seq = array("Q")
        self.rec_seg = array("I")
        self.rec_pos = array("Q")
        self.rec_off = array("Q")
        self.rec_len = array("Q")
        self.rec_vdisk = array("Q")
        self.rec_op = array("B")
        self._vd: dict[int, _Vdisk] = {}
        self.pits = PitIndex(self.path, on_batch=self._add)  # scans and fills us through _add

    def refresh(self) -> int:
        """Index what was committed since; returns the number of new PITs."""
        return self.pits.refresh()

    def _add(self, commit: Commit, recs: list[RecordHead]) -> None:
        for r in recs:
            if r.op == Op.BARRIER or r.length == 0:
                continue
            o = len(self.rec_seq)
            if o + 1 >= MULTI:
                raise ReplicaError(f"journal {self.path}: more than {MULTI - 2} records; the block index is full")
            self.rec_seq.append(r.seq)
            self.rec_seg.append(r.segment)
            self.rec_pos.append(r.pos)
            self.rec_off.append(r.offset)
            self.rec_len.append(r.length)
            self.rec_vdisk.append(r.vdisk_id)
            self.rec_op.append(r.op)
            vd = self._vd.get(r.vdisk_id)
            if vd is None:
                vd = self._vd[r.vdisk_id] = _Vdisk()
            b0 = r.offset // BLOCK_SIZE
            b1 = (r.offset + r.length - 1) // BLOCK_SIZE
            single, multi = vd.single, vd.multi
            if b1 >= len(single):
                single.frombytes(bytes(4 * (b1 + 1 - len(single) + (b1 >> 3))))  # grow by 1/8 ahead
            v1 = o + 1
            new = 0
            for b in range(b0, b1 + 1):
                v = single[b]
                if v == 0:
                    single[b] = v1
                    new += 1
                elif v == MULTI:
                    multi[b].append(o)
                else:
                    multi[b] = array("I", (v - 1, o))
                    single[b] = MULTI
            vd.blocks += new
            vd.versions += b1 + 1 - b0

    def vdisk_ids(self) -> list[int]:
        return sorted(self._vd)

    def extent(self) -> tuple[int, int]:
        """(records indexed, seq of the newest PIT), read together: a PIT's
        records are indexed under the same lock that publishes it."""
        with self.pits._lock:
            return len(self.rec_seq), (self.pits._seq[-1] if len(self.pits) else 0)

    def ordinal_upto(self, seq: int) -> int:
        """The ordinal of the newest record with seq <= ``seq`` (-1 if none)."""
        return bisect.bisect_right(self.rec_seq, seq) - 1

    def versions(self, vdisk_id: int, block: int, upto: int) -> tuple[Any, int]:
        """(ordinals, n): the block's ordinals <= ``upto`` are ordinals[:n]."""
        vd = self._vd.get(vdisk_id)
        if vd is None or block >= len(vd.single):
            return (), 0
        v = vd.single[block]
        if v == 0:
            return (), 0
        if v != MULTI:
            return (v - 1,), 1 if v - 1 <= upto else 0
        arr = vd.multi[block]
        return arr, bisect.bisect_right(arr, upto)

    def statistics(self) -> IndexStatistics:
        cols = (self.rec_seq, self.rec_seg, self.rec_pos, self.rec_off, self.rec_len, self.rec_vdisk, self.rec_op)
        mem = sum(sys.getsizeof(c) for c in cols) + sys.getsizeof(self._vd)
        blocks = versions = multi = 0
        for vd in self._vd.values():
            mem += sys.getsizeof(vd.single) + sys.getsizeof(vd.multi) + sum(sys.getsizeof(a) for a in vd.multi.values())
            blocks += vd.blocks
            versions += vd.versions
            multi += len(vd.multi)
        return IndexStatistics(len(self.rec_seq), len(self.pits), len(self._vd), blocks, versions, multi, mem)


_shared: dict[Path, BlockIndex] = {}
_shared_lock = threading.Lock()


def shared_index(journal_dir: str | Path) -> BlockIndex:
    """The process's one `BlockIndex` of a journal, refreshed (incrementally)."""
    key = Path(journal_dir).resolve()
    with _shared_lock:
        idx = _shared.get(key)
        if idx is None:
            idx = _shared[key] = BlockIndex(key)
            return idx
    idx.refresh()
    return idx


# -- reading records -------------------------------------------------------------------------


class _RecordSource:
    """Read committed records at (segment, offset) through the journal's own
    read path (`journal.SegmentReader`: our own read-only descriptors, entry
    CRC checked, sealed records decrypted — the one place that decrypts);
    references are resolved through a Journal opened read-only on first need
    (or the one given).  A record at or after a damaged stretch of the
    journal (`pits.known_damage`) is refused: an image or a replica must not
    silently lack the lost records (docs/recovery.md §9)."""

    def __init__(self, path: Path, journal: Any | None) -> None:
        from nicsplit.journal.reader import SegmentReader

        self.path = path
        self._resolved = Path(path).resolve()
        self._journal = journal
        self._own_journal = False
        self._files = SegmentReader(path)
        self._lock = threading.Lock()

    def read(self, seg: int, pos: int, seq: int) -> tuple[Record, bytes]:
        from nicsplit.journal.writer import JournalCorrupt
        from nicsplit.recovery.pits import known_damage

        d = known_damage(self._resolved)
        if d is not None and seq >= d.first_seq:
            raise JournalCorrupt(f"record seq {seq} is not readable: {d.describe()}")
        where = f"journal {self.path}: {seg:08d}.seg offset {pos}"
        try:
            rec = self._files.read_record(seg, pos)
        except JournalCorrupt as e:
            raise JournalCorrupt(f"{e} (needed for seq {seq})") from None
        if rec.seq != seq:
            raise _corrupt(f"{where}: holds seq {rec.seq}, the index says {seq}")
        if not rec.refs:
            return rec, rec.data if rec.op == Op.WRITE else b""
        j = self._journal_for(seq)
        read_block = getattr(j, "read_block", None)  # public lookup, when the journal offers one
        if read_block is not None:
            return rec, expand(rec, read_block)
        for r, data in j.records(seq, seq):
            return r, data
        raise _corrupt(f"{where}: seq {seq} is not in the journal's own index")

    def read_many(self, items: list[tuple[int, int, int, int]]) -> list[bytes]:
        """The payloads (see `read`) of records given as (segment, offset,
        seq, length) in journal order: each segment's run is read with one
        pread (`SegmentReader.read_records`)."""
        from nicsplit.journal.writer import JournalCorrupt
        from nicsplit.recovery.pits import known_damage

        if not items:
            return []
        d = known_damage(self._resolved)
        if d is not None and items[-1][2] >= d.first_seq:
            bad = next(seq for _, _, seq, _ in items if seq >= d.first_seq)
            raise JournalCorrupt(f"record seq {bad} is not readable: {d.describe()}")
        out: list[bytes] = []
        i = 0
        while i < len(items):
            seg = items[i][0]
            j = i
            while j < len(items) and items[j][0] == seg:
                j += 1
            _, pos, _, length = items[j - 1]
            # The last entry ends before: entry head, record head, nonce + tag, refs (at most one per block), data.
            end = pos + _MAX_ENTRY_OVERHEAD + length + (length // BLOCK_SIZE + 1) * REF_SIZE
            try:
                recs = self._files.read_records(seg, [p for _, p, _, _ in items[i:j]], end)
            except JournalCorrupt as e:
                raise JournalCorrupt(f"{e} (needed for seqs {items[i][2]}..{items[j - 1][2]})") from None
            for (_, p, seq, _), rec in zip(items[i:j], recs):
                if rec.seq != seq:
                    raise _corrupt(f"journal {self.path}: {seg:08d}.seg offset {p}: holds seq {rec.seq}, "
                                   f"the index says {seq}")
                if not rec.refs:
                    out.append(rec.data if rec.op == Op.WRITE else b"")
                else:
                    out.append(self.read(seg, p, seq)[1])  # references: resolved the one-record way
            i = j
        return out

    def _journal_for(self, seq: int) -> Any:
        from nicsplit.journal.writer import Journal

        with self._lock:
            if self._journal is not None and self._journal.last_seq < seq and self._own_journal:
                self._journal.close()
                self._journal = None
            if self._journal is None:
                # stop_at_damage: the blocks before a damaged stretch still resolve
                self._journal = Journal.open(self.path, readonly=True, stop_at_damage=True)
                self._own_journal = True
            return self._journal

    def close(self) -> None:
        with self._lock:
            self._files.close()
            if self._own_journal and self._journal is not None:
                self._journal.close()
                self._journal = None


def _corrupt(msg: str) -> Exception:
    from nicsplit.journal.writer import JournalCorrupt

    return JournalCorrupt(msg)


# -- PIT reader -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Extent:
    offset: int
    length: int
    kind: str  # "data" (written), "zero" (last made zero / trimmed), "hole" (never written)


class PitReader:
    """Read-only image of every vdisk of a CG at PIT ``upto_seq``, served from
    the journal through the block index (module docstring).  Thread-safe."""

    def __init__(self, journal_dir: str | Path, catalog_vdisks: Iterable[VdiskLike], upto_seq: int, *,
                 index: BlockIndex | None = None, journal: Any | None = None,
                 cache_bytes: int = _CACHE_BYTES) -> None:
        self.path = Path(journal_dir)
        self.index = index if index is not None else shared_index(self.path)
        last = self.index.pits.latest(consistent=False).seq if len(self.index.pits) else 0
        if upto_seq > last:
            raise ReplicaError(f"seq {upto_seq} is beyond the journal's last point in time (seq {last})")
        self.upto_seq = upto_seq
        self._u = self.index.ordinal_upto(upto_seq)
        self.vdisks = {v.id: v for v in catalog_vdisks}
        self._src = _RecordSource(self.path, journal)
        # Retention's base images (base.py): the image at base.seq; records up to
        # it may be deleted, so they are read from the base (ordinals <= _floor).
        from nicsplit.recovery.base import BaseImages

        self._base = BaseImages(self.path.parent.parent / "base" / self.path.name,
                                {v.id: v.size for v in self.vdisks.values()})
        self._floor = self.index.ordinal_upto(self._base.seq) if self._base.seq else -1
        if self._base.seq > upto_seq:
            self._base.close()
            raise ReplicaError(f"seq {upto_seq} is older than the protection window (retention kept seq "
                               f"{self._base.seq} and later)")
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_bytes = 0
        self._cache_cap = cache_bytes
        self._lock = threading.Lock()

    def __enter__(self) -> "PitReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._src.close()
        self._base.close()

    def _rebase(self) -> bool:
        """Retention moved the base forward under us (a segment we read is
        gone): re-read it; True if it moved."""
        from nicsplit.recovery.base import read_state

        st = read_state(self._base.path)
        if st.seq == self._base.seq:
            return False
        if st.seq > self.upto_seq:
            raise ReplicaError(f"seq {self.upto_seq} left the protection window while being read "
                               f"(retention kept seq {st.seq} and later)")
        with self._lock:
            self._base.state = st
            self._floor = self.index.ordinal_upto(st.seq)
            self._cache.clear()
            self._cache_bytes = 0
        return True

    def size(self, vdisk_id: int) -> int:
        v = self.vdisks.get(vdisk_id)
        if v is None:
            raise ReplicaError(f"vdisk id {vdisk_id} is not one of this reader's vdisks")
        return v.size

    def _check(self, vdisk_id: int, offset: int, length: int) -> None:
        size = self.size(vdisk_id)
        if offset < 0 or length < 0 or offset + length > size:
            raise ValueError(f"range {offset}+{length} is outside vdisk id {vdisk_id} ({size} bytes)")

    def _payload(self, o: int) -> bytes:
        with self._lock:
            p = self._cache.get(o)
            if p is not None:
                self._cache.move_to_end(o)
                return p
        ix = self.index
        _, p = self._src.read(ix.rec_seg[o], ix.rec_pos[o], ix.rec_seq[o])
        with self._lock:
            self._cache[o] = p
            self._cache_bytes += len(p)
            while self._cache_bytes > self._cache_cap and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._cache_bytes -= len(old)
        return p

    def _chain(self, vdisk_id: int, b: int) -> list[int]:
        """Ordinals that decide block ``b`` at this PIT, newest first: back to
        the first that covers the whole block (or to the oldest)."""
        ords, n = self.index.versions(vdisk_id, b, self._u)
        if not n:
            return []
        ix = self.index
        lo, hi = b * BLOCK_SIZE, (b + 1) * BLOCK_SIZE
        out = []
        floor = self._floor
        for i in range(n - 1, -1, -1):
            o = ords[i]
            if o <= floor:
                break  # it and everything older are in the base image
            out.append(o)
            if ix.rec_off[o] <= lo and ix.rec_off[o] + ix.rec_len[o] >= hi:
                break
        return out

    def _latest(self, vdisk_id: int) -> Callable[[int], int]:
        """block → the newest ordinal <= this PIT touching it (-1: none)."""
        vd = self.index._vd.get(vdisk_id)
        if vd is None:
            return lambda b: -1
        single, multi, u, bisect_right = vd.single, vd.multi, self._u, bisect.bisect_right
        floor = self._floor

        def latest(b: int) -> int:
            if b >= len(single):
                return -1
            v = single[b]
            if v == 0:
                return -1
            if v != MULTI:
                return v - 1 if floor < v - 1 <= u else -1
            arr = multi[b]
            i = bisect_right(arr, u)
            return arr[i - 1] if i and arr[i - 1] > floor else -1

        return latest

    def _runs(self, vdisk_id: int, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        """(start, end, ordinal) runs of [offset, offset+length): ordinal >= 0
        decides the whole run alone (it covers every block of it fully), -1
        means not written since the base (base image, or zeros without one),
        -2 means the run is one block whose chain must be walked (partial
        covers, laid over the base)."""
        latest = self._latest(vdisk_id)
        ix = self.index
        rec_off, rec_len = ix.rec_off, ix.rec_len
        pos, end = offset, offset + length
        while pos < end:
            b = pos // BLOCK_SIZE
            o = latest(b)
            if o < 0:
                nb = b + 1
                while nb * BLOCK_SIZE < end and latest(nb) < 0:
                    nb += 1
                stop = min(nb * BLOCK_SIZE, end)
                yield pos, stop, -1
                pos = stop
                continue
            ro, rend = rec_off[o], rec_off[o] + rec_len[o]
            if ro > b * BLOCK_SIZE or rend < (b + 1) * BLOCK_SIZE:
                stop = min((b + 1) * BLOCK_SIZE, end)
                yield pos, stop, -2
                pos = stop
                continue
            nb = b + 1
            while nb * BLOCK_SIZE < end and (nb + 1) * BLOCK_SIZE <= rend and latest(nb) == o:
                nb += 1
            stop = min(nb * BLOCK_SIZE, end)
            yield pos, stop, o
            pos = stop

    def pread(self, vdisk_id: int, offset: int, length: int) -> bytes:
        """``length`` bytes of the vdisk's image at this PIT."""
        self._check(vdisk_id, offset, length)
        try:
            return self._pread(vdisk_id, offset, length)
        except FileNotFoundError:
            if not self._rebase():
                raise
            return self._pread(vdisk_id, offset, length)

    def _pread(self, vdisk_id: int, offset: int, length: int) -> bytes:
        ix = self.index
        runs = list(self._runs(vdisk_id, offset, length))
        if len(runs) == 1 and runs[0][2] >= 0 and ix.rec_op[runs[0][2]] == Op.WRITE:  # one record decides it all
            o = runs[0][2]
            return self._payload(o)[offset - ix.rec_off[o] : offset - ix.rec_off[o] + length]
        # The base (zeros without one): unwritten since, and the underlay of partial covers.
        out = bytearray(self._base.pread(vdisk_id, offset, length) if self._base.seq else length)
        for s, e, o in runs:
            if o >= 0:
                if ix.rec_op[o] == Op.WRITE:
                    ro = ix.rec_off[o]
                    out[s - offset : e - offset] = memoryview(self._payload(o))[s - ro : e - ro]
                elif self._base.seq:  # zeroed or trimmed since the base
                    out[s - offset : e - offset] = bytes(e - s)
            elif o == -2:
                for c in reversed(self._chain(vdisk_id, s // BLOCK_SIZE)):  # oldest first
                    ro = ix.rec_off[c]
                    cs, ce = max(s, ro), min(e, ro + ix.rec_len[c])
                    if cs >= ce:
                        continue
                    if ix.rec_op[c] == Op.WRITE:
                        out[cs - offset : ce - offset] = memoryview(self._payload(c))[cs - ro : ce - ro]
                    else:
                        out[cs - offset : ce - offset] = bytes(ce - cs)
        return bytes(out)

    def copy_to(self, vdisk_id: int, fd: int, offset: int, length: int) -> int:
        """Write the range's image into ``fd`` at the same offsets, which must
        read as zeros there already (a new sparse file): whole-record runs go
        straight from the record's payload to ``pwrite`` (no assembly copy),
        zeros are skipped, so the file stays sparse.  Returns the data bytes
        written.  What `restore` uses: one pass over the runs instead of
        `extents` then `pread`."""
        self._check(vdisk_id, offset, length)
        try:
            return self._copy_to(vdisk_id, fd, offset, length)
        except FileNotFoundError:
            if not self._rebase():
                raise
            return self._copy_to(vdisk_id, fd, offset, length)

    def _copy_to(self, vdisk_id: int, fd: int, offset: int, length: int) -> int:
        ix = self.index
        ops, rec_off = ix.rec_op, ix.rec_off
        written = 0
        for s, e, o in self._runs(vdisk_id, offset, length):
            if o >= 0 and ops[o] != Op.WRITE:
                continue  # zeroed or trimmed: stays a hole
            if o >= 0:
                ro = rec_off[o]
                pwrite_all(fd, memoryview(self._payload(o))[s - ro : e - ro], s)
                written += e - s
                continue
            if o == -1 and not self._base.seq:
                continue  # never written: a hole
            for xs, xl in ([(s, e - s)] if o == -2 else self._base.extents(vdisk_id, s, e - s)):
                pwrite_all(fd, self._pread(vdisk_id, xs, xl), xs)
                written += xl
        return written

    def extents(self, vdisk_id: int, offset: int, length: int) -> list[Extent]:
        """The range split into runs of "data", "zero" (zeroed or trimmed) and
        "hole" (never written) at this PIT, decided per 4 KiB block (a block
        holding any written byte is "data")."""
        self._check(vdisk_id, offset, length)
        out: list[Extent] = []
        ops = self.index.rec_op
        base = self._base.extents(vdisk_id, offset, length) if self._base.seq else []
        for s, e, o in self._runs(vdisk_id, offset, length):
            if o == -1:
                k = "data" if any(bs < e and s < bs + bl for bs, bl in base) else "hole"
            elif o >= 0:
                k = "data" if ops[o] == Op.WRITE else "zero"
            else:
                k = "data" if base or any(ops[c] == Op.WRITE for c in self._chain(vdisk_id, s // BLOCK_SIZE)) else "zero"
            if out and out[-1].kind == k:
                out[-1] = Extent(out[-1].offset, e - out[-1].offset, k)
            else:
                out.append(Extent(s, e - s, k))
        return out


# -- distribution with undo ------------------------------------------------------------------

_UNDO = struct.Struct(
    ">"
    "4s"  # magic: b"NSUN"
    "B"  # kind: UNDO_DATA (the replaced bytes follow) or UNDO_ZEROS (they were all zero; nothing follows)
    "3x"  # padding: zero
    "Q"  # seq: the record whose application replaced these bytes
    "Q"  # vdisk_id
    "Q"  # offset: virtual byte offset in the vdisk (= in its image)
    "I"  # length: bytes replaced
    "I"  # crc: zlib.crc32 of the 36 bytes before it followed by the payload
)
assert _UNDO.size == 40
UNDO_MAGIC = b"NSUN"
UNDO_DATA = 1
UNDO_ZEROS = 2
UNDO_SEALED = 3  # the replaced bytes follow sealed (`sealed.BlobSealer`, the 36 head bytes as AAD)
_UNDO_PAYLOAD = {UNDO_DATA: 0, UNDO_ZEROS: None, UNDO_SEALED: BlobSealer.SEALED_OVERHEAD}  # bytes beyond length
STATE_VERSION = 1


def undo_key_usage(path: str | Path, end: int | None = None, start: int | None = None) -> dict[int, int]:
    """{key id: sealed entries} of an undo log (from ``start`` up to
    ``end``; by default what the replica's state.json says), from the
    entries' heads and key ids alone (nothing is decrypted)."""
    out: dict[int, int] = {}
    if start is None or end is None:
        try:
            st = json.loads((Path(path).parent / "state.json").read_text())
        except (OSError, ValueError):
            st = {}
        start = st.get("undo_start", 0) if start is None else start
        end = st.get("undo_end") if end is None else end
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return out
    try:
        stop = os.fstat(fd).st_size if end is None else end
        pos = start
        while pos + _UNDO.size <= stop:
            magic, kind, _, _, _, length, _ = _UNDO.unpack(os.pread(fd, _UNDO.size, pos))
            if magic != UNDO_MAGIC or kind not in _UNDO_PAYLOAD:
                break
            extra = _UNDO_PAYLOAD[kind]
            if kind == UNDO_SEALED:
                (k,) = struct.unpack(">I", os.pread(fd, 4, pos + _UNDO.size))
                if k:
                    out[k] = out.get(k, 0) + 1
            pos += _UNDO.size + (0 if extra is None else length + extra)
    finally:
        os.close(fd)
    return out


@dataclass(frozen=True, slots=True)
class DistributorStatistics:
    applied_seq: int
    undo_floor: int  # the oldest seq the replica can be rolled back to
    undo_entries: int
    undo_bytes: int
    records_applied: int  # since open
    records_skipped: int  # records of vdisks not in this replica (since open)
    recovered_entries: int  # undo entries laid back at open (an interrupted step or rollback)


class Distributor:
    """Applies a CG's journal to replica images, keeping undo data.  One
    instance per replica directory; not thread-safe (one distribution task)."""

    def __init__(self, journal_dir: str | Path, replica_dir: str | Path, vdisks: Iterable[VdiskLike], *,
                 index: BlockIndex | None = None, journal: Any | None = None,
                 failpoint: Callable[[str], None] | None = None, refresh: bool = True,
                 keyring: Any = "auto") -> None:
        """``refresh=False``: the index's owner refreshes it (the appliance,
        after each group commit, while no append runs); steps never do.
        ``keyring``: seals new images and undo entries (at-rest encryption);
        "auto" = the data directory's keyring."""
        self.journal_dir = Path(journal_dir)
        self.dir = Path(replica_dir)
        self._refresh = refresh
        self.vdisks = {v.id: v for v in vdisks}
        self.index = index if index is not None else shared_index(self.journal_dir)
        self.failpoint = failpoint
        self._src = _RecordSource(self.journal_dir, journal)
        created = not self.dir.exists()
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if created:
            fsync_dir(self.dir.parent)
        self.keyring = atrest.keyring_for_images(self.dir) if keyring == "auto" else keyring
        self._sealer = BlobSealer(self.keyring, b"replica undo")
        self._imgs: dict[int, Image] = {}
        for v in self.vdisks.values():
            # sparse; a grown vdisk grows its image
            self._imgs[v.id] = open_image(self.image_path(v), v.size, self.keyring, writable=True, create=True)
        self._undo_path = self.dir / "undo.log"
        (self.dir / "undo.log.rekey").unlink(missing_ok=True)  # a rekey cut before its rename: the log is intact
        self._undo = os.open(self._undo_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fsync_dir(self.dir)
        self._undo_seq = array("Q")  # per undo entry: seq ...
        self._undo_off = array("Q")  # ... and offset in undo.log
        self._applied = self._skipped = self._recovered = 0
        st = self._read_state()
        self.applied_seq: int = st["applied_seq"]
        self.undo_floor: int = st["undo_floor"]
        self._undo_end: int = st["undo_end"]
        self._undo_start: int = st.get("undo_start", 0)  # entries before it were trimmed (a hole)
        self._recover(st.get("rollback_to"))
        if self.applied_seq == 0 and self._undo_end == 0:
            self._seed_from_base()

    def _seed_from_base(self) -> None:
        """A new replica of a journal that retention trimmed starts from the
        base images (the records up to the base seq are gone): copy their
        data, fsync, then persist applied_seq = the base seq. A crash before
        that re-seeds at the next open (the copy overwrites what it wrote)."""
        from nicsplit.recovery.base import BaseImages

        with BaseImages(self.journal_dir.parent.parent / "base" / self.journal_dir.name,
                        {v.id: v.size for v in self.vdisks.values()}) as base:
            if not base.seq:
                return
            for vid, img in self._imgs.items():
                for off, length in base.extents(vid, 0, self.vdisks[vid].size):
                    for at in range(off, off + length, 4 << 20):
                        n = min(4 << 20, off + length - at)
                        img.pwrite(base.pread(vid, at, n), at)
                img.fsync()
            self.undo_floor = base.seq
            self._write_state(base.seq, 0)
            self.applied_seq = base.seq
            log.info("replica %s: seeded from the base images at seq %d (the journal before it was trimmed)",
                     self.dir, base.seq)

    # -- files -------------------------------------------------------------------------

    def image_path(self, v: VdiskLike) -> Path:
        return self.dir / f"{v.name}.img"

    def _read_state(self) -> dict:
        p = self.dir / "state.json"
        try:
            st = json.loads(p.read_text())
        except FileNotFoundError:
            return {"applied_seq": 0, "undo_end": 0, "undo_floor": 0, "rollback_to": None, "undo_start": 0}
        except ValueError as e:
            raise ReplicaError(f"{p}: unreadable ({e})") from None
        if st.get("version") != STATE_VERSION:
            raise ReplicaError(f"{p}: version {st.get('version')!r} not supported")
        return st

    def _write_state(self, applied: int, undo_end: int, rollback_to: int | None = None) -> None:
        p = self.dir / "state.json"
        tmp = self.dir / "state.json.tmp"
        body = json.dumps({"version": STATE_VERSION, "applied_seq": applied, "undo_end": undo_end,
                           "undo_floor": self.undo_floor, "rollback_to": rollback_to,
                           "undo_start": self._undo_start})
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, body.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, p)
        fsync_dir(self.dir)

    def _fp(self, name: str) -> None:
        if self.failpoint is not None:
            self.failpoint(name)

    def images(self) -> dict[int, Image]:
        """The replica images by vdisk id (for key usage and rekeying)."""
        return dict(self._imgs)

    def close(self) -> None:
        for img in self._imgs.values():
            img.close()
        self._imgs.clear()
        if self._undo >= 0:
            os.close(self._undo)
            self._undo = -1
        self._src.close()

    def __enter__(self) -> "Distributor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- undo log -------------------------------------------------------------------------

    def _scan_undo(self, start: int, end: int | None) -> tuple[list[tuple[int, int]], int]:
        """(seq, offset) of the valid entries in [start, end) (to the first
        invalid one when ``end`` is None) and the offset after the last."""
        size = os.fstat(self._undo).st_size
        stop = size if end is None else end
        out = []
        pos = start
        while pos + _UNDO.size <= stop:
            head = os.pread(self._undo, _UNDO.size, pos)
            magic, kind, seq, vid, off, length, crc = _UNDO.unpack(head)
            extra = _UNDO_PAYLOAD.get(kind, 0)
            n = 0 if extra is None else length + extra
            if magic != UNDO_MAGIC or kind not in _UNDO_PAYLOAD or pos + _UNDO.size + n > stop:
                if end is not None:
                    raise ReplicaError(f"{self._undo_path}: bad undo entry at offset {pos} (before undo_end {end})")
                break
            out.append((seq, pos))
            pos += _UNDO.size + n
        return out, pos

    def _read_undo(self, pos: int) -> tuple[int, int, int, int, bytes | None]:
        head = os.pread(self._undo, _UNDO.size, pos)
        magic, kind, seq, vid, off, length, crc = _UNDO.unpack(head)
        extra = _UNDO_PAYLOAD.get(kind, 0)
        n = 0 if extra is None else length + extra
        data = os.pread(self._undo, n, pos + _UNDO.size) if n else b""
        if magic != UNDO_MAGIC or kind not in _UNDO_PAYLOAD or len(data) != n or \
                zlib.crc32(data, zlib.crc32(head[:36])) != crc:
            raise ReplicaError(f"{self._undo_path}: undo entry at offset {pos} fails its check")
        if kind == UNDO_ZEROS:
            return seq, vid, off, length, None
        if kind == UNDO_SEALED:
            try:
                data = self._sealer.open(data, head[:36])
            except SealedError as e:
                raise ReplicaError(f"{self._undo_path}: undo entry at offset {pos}: {e}") from None
        return seq, vid, off, length, data

    def _lay_back(self, offsets: list[int]) -> None:
        """Apply the undo entries at ``offsets`` newest first, fsync images."""
        touched: dict[int, Image] = {}
        for pos in reversed(offsets):
            seq, vid, off, length, data = self._read_undo(pos)
            img = self._imgs.get(vid)
            if img is None:
                raise ReplicaError(f"{self._undo_path}: undo entry for vdisk id {vid}, which this replica lacks")
            if data is None:
                img.zero(off, length)
            else:
                img.pwrite(data, off)
            touched[vid] = img
            self._fp("undo-entry-applied")
        for img in touched.values():
            img.fsync()

    def _recover(self, rollback_to: int | None) -> None:
        if self._undo_start:
            punch_hole(self._undo, 0, self._undo_start)  # a trim cut between its state and its punch
        entries, end = self._scan_undo(self._undo_start, self._undo_end)
        if rollback_to is not None:  # rule 4: finish an interrupted rollback
            self._undo_seq.extend(s for s, _ in entries)
            self._undo_off.extend(o for _, o in entries)
            log.warning("replica %s: finishing an interrupted rollback to seq %d", self.dir, rollback_to)
            self.undo_to(rollback_to)
            return
        tail, _ = self._scan_undo(self._undo_end, None)
        if tail:  # rule 2: a step was interrupted after its undo entries were written
            log.warning("replica %s: laying back %d undo entries of an interrupted step (applied seq %d)",
                        self.dir, len(tail), self.applied_seq)
            self._lay_back([o for _, o in tail])
            self._recovered += len(tail)
        if os.fstat(self._undo).st_size != self._undo_end:
            os.ftruncate(self._undo, self._undo_end)
            os.fsync(self._undo)
        self._undo_seq.extend(s for s, _ in entries)
        self._undo_off.extend(o for _, o in entries)

    # -- at-rest keys ---------------------------------------------------------------------

    def key_usage(self) -> dict[str, dict[int, int]]:
        """Which at-rest keys the replica needs: {"image_blocks": {key id:
        blocks}, "undo_entries": {key id: entries}} (sealed ones only)."""
        blocks: dict[int, int] = {}
        for img in self._imgs.values():
            for k, n in img.key_usage().items():
                blocks[k] = blocks.get(k, 0) + n
        return {"image_blocks": blocks,
                "undo_entries": undo_key_usage(self._undo_path, self._undo_end, self._undo_start)}

    def rekey(self) -> tuple[int, int]:
        """Re-seal under the active key every image block and undo entry
        sealed under another (after a key rotation), so the old key can be
        retired.  Returns (blocks, undo entries) re-sealed.  Between steps only
        (the distribution thread calls it)."""
        blocks = sum(img.rekey() for img in self._imgs.values() if img.sealed)
        return blocks, self._rekey_undo()

    def _rekey_undo(self) -> int:
        """Undo entries are re-sealed into a copy of the log, which replaces
        it atomically (same sizes, so every offset stays valid)."""
        active = self.keyring.active if self.keyring is not None else None
        use = undo_key_usage(self._undo_path, self._undo_end, self._undo_start)
        if active is None or not any(k != active for k in use):
            return 0
        tmp = self.dir / "undo.log.rekey"
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        n = 0
        try:
            pos = self._undo_start  # a trimmed prefix stays a hole in the copy too
            while pos < self._undo_end:
                head = os.pread(self._undo, _UNDO.size, pos)
                _, kind, _, _, _, length, _ = _UNDO.unpack(head)
                extra = _UNDO_PAYLOAD.get(kind)
                size = 0 if extra is None else length + extra
                body = os.pread(self._undo, size, pos + _UNDO.size) if size else b""
                if kind == UNDO_SEALED and struct.unpack_from(">I", body)[0] != active:
                    data = self._read_undo(pos)[4]
                    body = self._sealer.seal(data, head[:36])
                    head = head[:36] + struct.pack(">I", zlib.crc32(body, zlib.crc32(head[:36])))
                    n += 1
                os.pwrite(out, head + body, pos)
                pos += _UNDO.size + size
            os.fsync(out)
        finally:
            os.close(out)
        os.rename(tmp, self._undo_path)
        fsync_dir(self.dir)
        old, self._undo = self._undo, os.open(self._undo_path, os.O_RDWR | os.O_CLOEXEC)
        os.close(old)
        return n

    # -- do / undo ------------------------------------------------------------------------

    def pending(self, upto_seq: int | None = None) -> int:
        """Indexed records not applied yet (those with seq <= ``upto_seq``)."""
        if self._refresh:
            self.index.refresh()
        end = len(self.index.rec_seq) if upto_seq is None else self.index.ordinal_upto(upto_seq) + 1
        return max(0, end - (self.index.ordinal_upto(self.applied_seq) + 1))

    def step(self, max_records: int = 256, upto_seq: int | None = None, max_bytes: int | None = None) -> int:
        """Apply up to ``max_records`` journaled records (undo first, rule 2);
        returns how many were applied (0 = caught up).  With ``upto_seq``
        nothing after that seq is applied (the appliance passes the journal's
        durable seq; failover a PIT), and once every record up to it is
        applied, ``applied_seq`` becomes ``upto_seq`` itself (when indexed).
        ``max_bytes`` bounds the payload bytes of one step too (at least one
        record), so a step of large records stays short."""
        ix = self.index
        if self._refresh:
            ix.refresh()
        nrec, pit_seq = ix.extent()
        if upto_seq is not None:
            if upto_seq <= self.applied_seq:
                return 0  # going back is undo_to's job
            nrec = min(nrec, ix.ordinal_upto(upto_seq) + 1)
            pit_seq = min(pit_seq, upto_seq)
        first = ix.ordinal_upto(self.applied_seq) + 1
        last = min(first + max_records, nrec)
        if max_bytes is not None and first < last:
            total, cut = 0, first
            while cut < last and (cut == first or total + ix.rec_len[cut] <= max_bytes):
                total += ix.rec_len[cut]
                cut += 1
            last = cut
        if first >= last:
            if pit_seq > self.applied_seq:  # only barriers since: the replica is at that PIT already
                self._write_state(pit_seq, self._undo_end)
                self.applied_seq = pit_seq
            return 0
        # Pre-images, seen through the earlier records of this step (not applied yet).
        todo: list[tuple[int, int, int, bytes | None, int]] = []  # (seq, vdisk, offset, payload|None, length)
        # (vdisk, 4 KiB block) -> indexes in todo of this step's records touching it, so a
        # record's pre-image sees only the earlier ones that overlap it (not all of them: O(n²)).
        touch: dict[tuple[int, int], list[int]] = {}
        undo = bytearray()
        mine = [o for o in range(first, last) if ix.rec_vdisk[o] in self._imgs]
        self._skipped += (last - first) - len(mine)
        payloads = self._src.read_many([(ix.rec_seg[o], ix.rec_pos[o], ix.rec_seq[o], ix.rec_len[o]) for o in mine])
        for o, payload in zip(mine, payloads):
            seq, vid, off, length = ix.rec_seq[o], ix.rec_vdisk[o], ix.rec_off[o], ix.rec_len[o]
            img = self._imgs[vid]
            v = self.vdisks[vid]
            if off + length > v.size:
                raise ReplicaError(f"record seq {seq}: {off}+{length} is past the end of vdisk {v.name} ({v.size} bytes)")
            # The pre-image covers whole 4 KiB blocks: laying it back rewrites
            # them whole, which also repairs a sealed block that a crash tore
            # mid-step (data and tag entry out of step: it cannot be read).
            a0 = off - off % BLOCK_SIZE
            a1 = min(v.size, -(-(off + length) // BLOCK_SIZE) * BLOCK_SIZE)
            pre = bytearray(img.pread(a0, a1 - a0))
            blocks = range(off // BLOCK_SIZE, (off + length - 1) // BLOCK_SIZE + 1)
            earlier: set[int] = set()
            for b in blocks:
                hit = touch.get((vid, b))
                if hit:
                    earlier.update(hit)
            for i in sorted(earlier):  # oldest first: the newest overlapping record wins
                _, _, poff, pdata, plen = todo[i]
                s, e = max(a0, poff), min(a1, poff + plen)
                if s < e:
                    pre[s - a0 : e - a0] = pdata[s - poff : e - poff] if pdata is not None else bytes(e - s)
            zeros = pre.count(0) == len(pre)
            kind = UNDO_ZEROS if zeros else (UNDO_SEALED if self._sealer.sealing else UNDO_DATA)
            head = _UNDO.pack(UNDO_MAGIC, kind, seq, vid, a0, a1 - a0, 0)[:36]
            body = b"" if zeros else (self._sealer.seal(pre, head) if kind == UNDO_SEALED else bytes(pre))
            assert kind != UNDO_SEALED or len(body) == len(pre) + BlobSealer.SEALED_OVERHEAD
            self._undo_seq.append(seq)
            self._undo_off.append(self._undo_end + len(undo))
            undo += head + struct.pack(">I", zlib.crc32(body, zlib.crc32(head))) + body
            for b in blocks:
                touch.setdefault((vid, b), []).append(len(todo))
            todo.append((seq, vid, off, payload if ix.rec_op[o] == Op.WRITE else None, length))
        end = self._undo_end + len(undo)
        if undo:
            os.pwrite(self._undo, undo, self._undo_end)
            self._fp("undo-written")
            os.fsync(self._undo)
            self._fp("undo-synced")
            touched: dict[int, Image] = {}
            for seq, vid, off, payload, length in todo:
                img = self._imgs[vid]
                if payload is None:
                    img.zero(off, length)
                else:
                    img.pwrite(payload, off)
                touched[vid] = img
                self._fp("image-written")
            for img in touched.values():
                img.fsync()
            self._fp("images-synced")
        # Through the end of the index, the replica is at the newest PIT, even
        # when that batch ended with barriers (which the index does not hold).
        seq = pit_seq if last == nrec else ix.rec_seq[last - 1]
        self._write_state(seq, end)
        self._fp("state-persisted")
        self.applied_seq = seq
        self._undo_end = end
        self._applied += len(todo)
        return last - first

    def catch_up(self, max_records: int = 256, upto_seq: int | None = None) -> int:
        n = 0
        while (k := self.step(max_records, upto_seq)):
            n += k
        return n

    def goto(self, seq: int, max_records: int = 256) -> None:
        """Bring the images to exactly PIT ``seq``: roll back with the undo
        log, or apply forward up to it (failover)."""
        if seq < self.applied_seq:
            self.undo_to(seq)
            return
        self.catch_up(max_records, seq)
        if self.applied_seq != seq:
            raise ReplicaError(f"cannot bring the replica to seq {seq}: the journal's records end at "
                               f"seq {self.applied_seq}")

    def trim_undo(self, upto_seq: int) -> int:
        """Forget the undo entries of records <= ``upto_seq`` (retention
        trimmed the journal up to there, so no PIT before it can be asked
        for): the floor rises to it, the state says where the log now
        starts, then the prefix is punched out of the file (offsets stay;
        a crash before the punch only delays freeing the space).  Returns
        the entries dropped."""
        upto = min(upto_seq, self.applied_seq)
        if upto <= self.undo_floor:
            return 0
        i = bisect.bisect_right(self._undo_seq, upto)
        cut = self._undo_off[i] if i < len(self._undo_off) else self._undo_end
        self.undo_floor = upto
        self._undo_start = cut
        self._write_state(self.applied_seq, self._undo_end)
        self._fp("undo-trim-persisted")
        punch_hole(self._undo, 0, cut)
        del self._undo_seq[:i]
        del self._undo_off[:i]
        return i

    def undo_to(self, seq: int) -> int:
        """Roll the replica images back to PIT ``seq`` (<= applied_seq) with the
        undo log (rule 4); later `step`s re-apply from there.  Returns the
        number of undo entries laid back."""
        if seq > self.applied_seq:
            raise ReplicaError(f"cannot roll back to seq {seq}: the replica is at seq {self.applied_seq}")
        if seq < self.undo_floor:
            raise ReplicaError(f"cannot roll back to seq {seq}: undo data starts after seq {self.undo_floor}")
        i = bisect.bisect_right(self._undo_seq, seq)
        offs = list(self._undo_off[i:])
        cut = offs[0] if offs else self._undo_end
        self._write_state(self.applied_seq, self._undo_end, rollback_to=seq)
        self._fp("rollback-intent")
        self._lay_back(offs)
        self._write_state(seq, cut)
        self._fp("rollback-persisted")
        os.ftruncate(self._undo, cut)
        os.fsync(self._undo)
        del self._undo_seq[i:]
        del self._undo_off[i:]
        self.applied_seq, self._undo_end = seq, cut
        return len(offs)

    def read(self, vdisk_id: int, offset: int, length: int) -> bytes:
        """Bytes of the replica image (at ``applied_seq``)."""
        return self._imgs[vdisk_id].pread(offset, length)

    def statistics(self) -> DistributorStatistics:
        return DistributorStatistics(self.applied_seq, self.undo_floor, len(self._undo_seq), self._undo_end,
                                     self._applied, self._skipped, self._recovered)
