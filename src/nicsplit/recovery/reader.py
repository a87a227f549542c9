"""How a point in time is read: the image of each vdisk of a CG at PIT seq
S, served straight from the journal through the block index.

Theory of operation
===================
The image of a vdisk at PIT seq S is, per byte, the newest record <= S that
covers it (WRITE: its payload, ZERO/TRIM: zeros), zeros if none; records
that retention trimmed are read from the base images
(`nicsplit.recovery.base`), which hold the image at the base seq.  Per
block: find the block's newest ordinal <= S in the block index
(`nicsplit.recovery.blockindex`), walk back while records cover the block
only partly (unaligned writes), then lay them over the base (or zeros)
oldest first.  Nothing is replayed: a PIT of any age is ready as soon as its
ordinal is found (one bisect), hence well within 1 s.

Payloads are read from the segment files with their entry CRC checked
(own read-only descriptors; the writer's objects are never touched), with a
small LRU of decoded records so sequential reads of a large record read it
once.  Deduplicated blocks (references) are resolved through the Journal's
block index (`Journal.read_block` when present, else `Journal.records`).
Nothing here writes a journal file or a production vdisk.

Example::

    idx = shared_index(journal_dir)
    with PitReader(journal_dir, vdisks_of_cg, idx.pits.latest().seq, index=idx) as r:
        r.pread(vdisk_id, 0, 65536); r.extents(vdisk_id, 0, size)
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol

from nicsplit.core.fsutil import pwrite_all
from nicsplit.core.records import BLOCK_SIZE, Op
from nicsplit.journal.format import ENTRY, SEALED_OVERHEAD, JournalCorrupt
from nicsplit.journal.reader import SegmentReader
from nicsplit.journal.writer import Journal
from nicsplit.recovery.base import BaseImages, base_of_journal, read_state
from nicsplit.recovery.blockindex import BlockIndex, ReplicaError, shared_index
from nicsplit.recovery.pits import known_damage
from nicsplit.wire.frames import RECORD_HEAD_SIZE, REF_SIZE, Record, expand

__all__ = ["PitReader", "Extent", "VdiskLike", "RecordSource"]

_MAX_ENTRY_OVERHEAD = ENTRY.size + RECORD_HEAD_SIZE + SEALED_OVERHEAD  # entry head, record head, sealed nonce and tag

# 64 MiB of decoded payloads per reader: four of the largest (16 MiB) batches'
# records, or 16,384 4 KiB records — enough that a sequential read never
# decodes a record twice.
_CACHE_BYTES = 64 << 20


class VdiskLike(Protocol):
    id: int
    name: str
    size: int


# -- reading records -------------------------------------------------------------------------


class RecordSource:
    """Read committed records at (segment, offset) through the journal's own
    read path (`journal.SegmentReader`: our own read-only descriptors, entry
    CRC checked, sealed records decrypted — the one place that decrypts);
    references are resolved through a Journal opened read-only on first need
    (or the one given).  A record at or after a damaged stretch of the
    journal (`pits.known_damage`) is refused: an image or a replica must not
    silently lack the lost records (docs/recovery.md §9)."""

    def __init__(self, path: Path, journal: Any | None) -> None:
        self.path = path
        self._resolved = Path(path).resolve()
        self._journal = journal
        self._own_journal = False
        self._files = SegmentReader(path)
        self._lock = threading.Lock()

    def read(self, seg: int, pos: int, seq: int) -> tuple[Record, bytes]:
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
                got = self._files.read_payloads(seg, [p for _, p, _, _ in items[i:j]], end)
            except JournalCorrupt as e:
                raise JournalCorrupt(f"{e} (needed for seqs {items[i][2]}..{items[j - 1][2]})") from None
            for (_, p, seq, _), g in zip(items[i:j], got):
                if g is None:  # references (or past the read): resolved the one-record way
                    out.append(self.read(seg, p, seq)[1])
                    continue
                if g[0] != seq:
                    raise _corrupt(f"journal {self.path}: {seg:08d}.seg offset {p}: holds seq {g[0]}, "
                                   f"the index says {seq}")
                out.append(g[1])
            i = j
        return out

    def _journal_for(self, seq: int) -> Any:
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
        self._src = RecordSource(self.path, journal)
        # Retention's base images (base.py): the image at base.seq; records up to
        # it may be deleted, so they are read from the base (ordinals <= _floor).
        self._base = BaseImages(base_of_journal(self.path),
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

    def _runs(self, vdisk_id: int, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        """(start, end, ordinal) runs of [offset, offset+length): ordinal >= 0
        decides the whole run alone (it covers every block of it fully), -1
        means not written since the base (base image, or zeros without one),
        -2 means the run is one block whose chain must be walked (partial
        covers, laid over the base)."""
        latest = self.index.latest(vdisk_id, self._u, self._floor)
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

