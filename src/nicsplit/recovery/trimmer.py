"""Retention carried out: apply the oldest journal segments to the base
images, then delete them (the policy and the plan are `retention`'s).

The appliance runs one `Trimmer` per CG every ``[retention] interval``, in a
worker thread (never on the event loop, never holding the CG's ingest lock:
the journal's own lock is taken only by `Journal.trim`, briefly).

What pins a PIT (nothing at or after it is trimmed, retention rule 2):
* a locked bookmark;
* an open image (``DATA/run/images/*.json`` of this CG) and a failover
  (``DATA/appliance/failover/<cg>.json``): their readers need its records;
* the replica's applied seq (``DATA/appliance/replicas/<cg>/state.json``):
  distribution reads the records after it.

Order of a trim (crash-safe, base.py rule 1): apply the records of the
segments to the base images and fsync them; persist the base state
(seq, first segment still needed); delete the segment files; drop unlocked
bookmarks older than the base (their PIT is gone). A crash before the state
is persisted re-applies the same records next time (idempotent); after it,
the next run deletes segments below ``first_segment`` first.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from nicsplit.storage import atrest
from nicsplit.core.layout import Layout
from nicsplit.recovery.base import BaseImages
from nicsplit.recovery.bookmarks import list_bookmarks, remove_bookmarks
from nicsplit.recovery.retention import Policy, TrimPlan, plan_trim

log = logging.getLogger("nicsplit.recovery.retention")


@dataclass(frozen=True, slots=True)
class TrimReport:
    trimmed: int  # segments deleted this run
    records: int  # records applied to the base this run
    base_seq: int  # the base now (0: none): PITs after it are kept
    journal_bytes: int
    blocked_by: str | None
    pins: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"base_seq": self.base_seq, "journal_bytes": self.journal_bytes,
                "blocked_by": self.blocked_by, "trimmed": self.trimmed, "records": self.records,
                "pins": list(self.pins)}


def pins(data: Path, cg: str) -> list[int]:
    """Seqs retention must keep reachable (module docstring)."""
    out = [b.seq for b in list_bookmarks(data, cg) if b.locked]
    layout = Layout(data)
    for p in layout.images_run.glob("*.json"):
        try:
            info = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if info.get("cg") == cg and isinstance(info.get("seq"), int):
            out.append(info["seq"])
    for p in (layout.failover_state(cg), layout.replica(cg) / "state.json"):
        try:
            info = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        seq = info.get("seq", info.get("applied_seq"))
        if isinstance(seq, int):
            out.append(seq + 1 if p.name == "state.json" else seq)  # records after applied_seq are still needed
    return out


class Trimmer:
    def __init__(self, data: str | Path, cg: str, journal: Any, policy: Policy,
                 sizes: Callable[[], dict[int, int] | None], *, min_age_s: float = 0.0) -> None:
        """``sizes()``: vdisk id -> size of the CG's vdisks (None: unknown
        now, skip this run); ``min_age_s``: 2x the card's dedup horizon."""
        self.data, self.cg, self.journal, self.policy = Path(data), cg, journal, policy
        self.sizes = sizes
        self.min_age_s = min_age_s
        self.last: TrimReport | None = None
        self._rekeyed_for: int | None = None  # the active key the base was last re-sealed for

    def _rekey(self, base: BaseImages) -> None:
        """After a key rotation (and once after each start), re-seal the base
        images' blocks under the active key so older keys can be retired
        (this thread is the base's only writer)."""
        active = atrest.new_active(base.keyring, self._rekeyed_for)
        if active is None:
            return
        n = sum(img.rekey() for img in base.images().values() if img.sealed)
        self._rekeyed_for = active
        if n:
            log.info("retention of %s: re-sealed %d base image block(s) under at-rest key %d", self.cg, n, active)

    def run_once(self, now_ns: int | None = None) -> TrimReport:
        now_ns = time.time_ns() if now_ns is None else now_ns
        j = self.journal
        sizes = self.sizes()
        facts = j.segment_facts()
        bdir = Layout(self.data).base(self.cg)
        trimmed = applied = 0
        blocked: str | None = None
        pinned = pins(self.data, self.cg)
        with BaseImages(bdir, sizes or {}, writable=True) as base:
            # A trim interrupted after its state was persisted: finish deleting.
            stale = [f.number for f in facts[:-1] if f.number < base.state.first_segment]
            if stale:
                trimmed += j.trim(stale[-1])
                facts = j.segment_facts()
            if sizes is None:
                blocked = "the vdisk catalog is not readable"
                plan = TrimPlan([], base.seq)
            else:
                plan = plan_trim(facts, now_ns, self.policy, base_seq=base.seq, locked_seqs=pinned,
                                 min_age_s=self.min_age_s)
                blocked = plan.blocked_by
            if plan.trim:
                t_base = next(f.t_last_ns for f in facts if f.number == plan.trim[-1])
                recs = ((r.seq, r.vdisk_id, r.op, r.offset, r.length, payload)
                        for r, payload in j.records(base.seq + 1, plan.base_seq))
                applied = base.apply(recs, seq=plan.base_seq, time_ns=t_base, first_segment=plan.trim[-1] + 1)
                trimmed += j.trim(plan.trim[-1])
                self._drop_bookmarks(plan.base_seq)
                log.info("retention of %s: %d segment(s) (%d records) into the base, which is now at seq %d",
                         self.cg, len(plan.trim), applied, plan.base_seq)
            base_seq = base.seq
            self._rekey(base)
        facts = j.segment_facts()
        self.last = TrimReport(trimmed, applied, base_seq, sum(f.size for f in facts), blocked,
                               tuple(sorted(set(pinned))))
        return self.last

    def _drop_bookmarks(self, base_seq: int) -> None:
        """Unlocked bookmarks whose PIT is now gone."""
        gone = remove_bookmarks(self.data, self.cg, lambda b: not b.locked and b.seq <= base_seq)
        for b in gone:
            log.info("retention of %s: bookmark %s (seq %d) is older than the protection window; removed",
                     self.cg, b.name, b.seq)
