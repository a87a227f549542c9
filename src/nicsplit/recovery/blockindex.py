"""The block index of a journal: which records touch each 4 KiB block of
each vdisk, so that "the block at PIT S" is one bisect away.  One per
journal, shared by every reader of the process through `shared_index`.

Theory of operation
===================
Built once from the same read-only scan as the PIT index
(`nicsplit.journal.scan.JournalScanner`: entry and record heads only, no
payload read), then extended by `refresh()` as the journal grows.  It holds

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

The PIT reader (`nicsplit.recovery.reader`) and distribution
(`nicsplit.recovery.replica`) read through it.

Example::

    idx = shared_index(journal_dir)
    latest = idx.latest(vdisk_id, idx.ordinal_upto(seq), -1)
    o = latest(block)          # the record deciding the block at seq, or -1
"""

from __future__ import annotations

import bisect
import os
import sys
import threading
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from nicsplit.core.records import BLOCK_SIZE, Op
from nicsplit.journal.format import seg_name, seg_number
from nicsplit.journal.scan import Commit, RecordHead
from nicsplit.recovery.pits import PitError, PitIndex

__all__ = ["BlockIndex", "IndexStatistics", "shared_index", "ReplicaError", "MULTI"]

MULTI = 0xFFFFFFFF  # in ``single``: the block's ordinals are in ``multi``
assert array("I").itemsize == 4 and array("Q").itemsize == 8


class ReplicaError(PitError):
    """A block index, PIT reader or replica cannot do what was asked (one clear line)."""


@dataclass(frozen=True, slots=True)
class IndexStatistics:
    records: int  # WRITE / ZERO / TRIM records indexed
    pits: int
    vdisks: int
    blocks: int  # (vdisk, block) pairs ever written
    versions: int  # (block, record) pairs
    multi_blocks: int  # blocks written more than once
    memory_bytes: int  # arrays + per-block containers (estimate, sys.getsizeof)


def _segment_offsets(path: Path) -> dict[int, int]:
    """Segment number -> bytes of the segments before it; key 0 holds the
    total (a scan's progress: segment start + offset in it)."""
    out, at = {}, 0
    try:
        nums = sorted(n for n in map(seg_number, os.listdir(path)) if n is not None)
    except FileNotFoundError:
        return {0: 0}
    for n in nums:
        out[n] = at
        try:
            at += os.stat(path / seg_name(n)).st_size
        except FileNotFoundError:  # trimmed by retention meanwhile
            pass
    out[0] = at
    return out


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

    def __init__(self, journal_dir: str | Path, *, progress: Callable[[int, int], None] | None = None) -> None:
        """``progress(done, total)`` follows the first scan in bytes of the
        segment files (image export preparation shows it)."""
        self.path = Path(journal_dir)
        self._progress = progress
        self._offsets = _segment_offsets(self.path) if progress else {}
        self.rec_seq = array("Q")
        self.rec_seg = array("I")
        self.rec_pos = array("Q")
        self.rec_off = array("Q")
        self.rec_len = array("Q")
        self.rec_vdisk = array("Q")
        self.rec_op = array("B")
        self._vd: dict[int, _Vdisk] = {}
        self.pits = PitIndex(self.path, on_batch=self._add)  # scans and fills us through _add
        if progress:
            total = self._offsets.get(0, 0)
            progress(total, total)
            self._progress = None  # refreshes are not followed

    def refresh(self) -> int:
        """Index what was committed since; returns the number of new PITs."""
        return self.pits.refresh()

    def feed(self, batch: tuple[Commit, list[RecordHead], tuple[int, int], tuple[int, int]]) -> bool:
        """Index a batch the writer of this process just appended
        (`AppendResult.batch`) without reading it back; False: not taken
        (`PitIndex.feed`), `refresh` reads it."""
        return self.pits.feed(*batch)

    def _add(self, commit: Commit, recs: list[RecordHead]) -> None:
        if self._progress is not None:
            total = self._offsets.get(0, 0)
            self._progress(min(total, self._offsets.get(commit.segment, total) + commit.pos), total)
        if not recs:
            return
        # Columns of the batch in one transposition (RecordHead is a NamedTuple);
        # the barrier / zero-length filter only runs when there is one.
        seqs, vids, ops, _, offs, lens, _, segs, poss = zip(*recs)
        barrier = int(Op.BARRIER)
        if barrier in ops or 0 in lens:
            recs = [r for r in recs if r.op != barrier and r.length]
            if not recs:
                return
            seqs, vids, ops, _, offs, lens, _, segs, poss = zip(*recs)
        o0 = len(self.rec_seq)
        if o0 + len(recs) >= MULTI:
            raise ReplicaError(f"journal {self.path}: more than {MULTI - 2} records; the block index is full")
        # The columns grow per batch, not per record (this runs for every ingested
        # batch); a reader only looks up to the ordinals a published PIT covers.
        self.rec_seq.extend(seqs)
        self.rec_seg.extend(segs)
        self.rec_pos.extend(poss)
        self.rec_off.extend(offs)
        self.rec_len.extend(lens)
        self.rec_vdisk.extend(vids)
        self.rec_op.extend(ops)
        vds = self._vd
        vd_id = -1  # the vdisk of the record before: its arrays stay bound across a batch's run of it
        for o, vid, off, length in zip(range(o0, o0 + len(recs)), vids, offs, lens):
            if vid != vd_id:
                vd_id, vd = vid, vds.get(vid)
                if vd is None:
                    vd = vds[vid] = _Vdisk()
                single, multi = vd.single, vd.multi
            b0 = off // BLOCK_SIZE
            b1 = (off + length - 1) // BLOCK_SIZE
            if b1 >= len(single):
                single.frombytes(bytes(4 * (b1 + 1 - len(single) + (b1 >> 3))))  # grow by 1/8 ahead
            new = 0
            for b in range(b0, b1 + 1):
                v = single[b]
                if v == 0:
                    single[b] = o + 1
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
        return self.pits.newest_seq_with(lambda: len(self.rec_seq))

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


    def latest(self, vdisk_id: int, upto: int, floor: int) -> Callable[[int], int]:
        """block → the newest ordinal <= ``upto`` touching it, if newer than
        ``floor`` (what a base image holds); -1 otherwise."""
        vd = self._vd.get(vdisk_id)
        if vd is None:
            return lambda b: -1
        single, multi, u, bisect_right = vd.single, vd.multi, upto, bisect.bisect_right

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

