"""Retention's side of the journal (writer.py rule 10): what retention needs
to know of each segment, trimming the oldest segments, and carrying the
blocks kept records still reference into ``carried.blk`` first.

A mixin of `nicsplit.journal.writer.Journal`: it works on the Journal's
index and files under the Journal's lock, and exists only so the writer
module stays one screenful of concerns (and under the size limit).
"""

from __future__ import annotations

import bisect
import logging
import os
from dataclasses import dataclass

from nicsplit.journal.format import CARRY_SEGMENT, JournalError, encode_carried, seg_name
from nicsplit.storage import atrest

__all__ = ["SegmentInfo", "RetentionMixin"]

log = logging.getLogger("nicsplit.journal.writer")


@dataclass(frozen=True, slots=True)
class SegmentInfo:
    """What retention (`nicsplit.recovery.retention.plan_trim`) needs of a segment."""

    number: int
    last_seq: int  # of its last COMMIT (0: no commit in it)
    t_last_ns: int  # time of its last COMMIT
    size: int  # bytes on disk
    ref_last: int = 0  # newest seq of a record (of a later batch) referencing a block homed here
    ends_batch: bool = True  # no record after its last COMMIT (a batch may span segments)
    appended_ns: int = 0  # appliance clock of its last append (the journal's open time after a restart)



class RetentionMixin:
    """`Journal.segment_facts`, `Journal.trim` and the carrying of blocks."""

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
            self._io.forget(dead)
            for s in gone:  # oldest first: a crash leaves a contiguous journal
                self._store.delete(seg_name(s))
            self._store.sync_names()
            self._segments = [s for s in self._segments if s not in dead]
            for d in (self._seg_sizes, self._seg_commit, self._seg_maxrec,
                      self._seg_appended):
                for s in gone:
                    d.pop(s, None)
            i = bisect.bisect_right(self._seqs, base_seq)
            del self._recs[:i], self._seqs[:i]
            self._commits = [c for c in self._commits if c[1] > base_seq]
            self._first_time = self._commits[0][0] if self._commits else 0
            self._blocks = {fp: loc for fp, loc in self._blocks.items() if loc[0] not in dead or len(loc) == 2}
            log.info("journal %s: trimmed %d segment(s) through %s (base seq %d, %d referenced blocks carried)",
                     self.path, len(gone), seg_name(gone[-1]), base_seq, len(carry))
            return len(gone)

    def _carry(self, fps: list[bytes]) -> None:
        """Append these blocks to carried.blk (sealed under the active key),
        fsync, and make it their home (rule 10). Lock held."""
        key_id = self._wanted_key()
        cipher = self._io.ciphers.for_segment(CARRY_SEGMENT, key_id) if key_id else None
        buf = bytearray()
        locs = {}
        for fp in fps:
            nonce = os.urandom(atrest.NONCE_SIZE) if cipher is not None else b""
            locs[fp] = (CARRY_SEGMENT, self._carried_end + len(buf))
            buf += encode_carried(cipher, key_id, fp, self._read_block(fp), nonce)
        if not buf:
            return
        new = self._io.carried_is_new()
        f = self._io.carried()
        f.append(bytes(buf))
        f.sync()
        if new:
            self._store.sync_names()
        self._carried_end += len(buf)
        self._carried_keys[key_id] = self._carried_keys.get(key_id, 0) + len(locs)
        self._blocks.update(locs)

