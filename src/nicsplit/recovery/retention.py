"""Retention: which points in time a CG keeps, and which journal segments can go.

Policy (``[retention]`` in nicsplit.toml, docs/recovery.md "Retention")::

    keep_all = "24h"      # every PIT younger than this is kept
    keep_hourly = "7d"    # then one PIT per clock hour up to this age; none older
    max_journal_size = 0  # also trim the oldest segments beyond this size (0 = no limit)
    interval = "60s"      # how often the appliance applies the policy

Theory of operation
===================
The journal is a sequence of segments, oldest first. Trimming is by whole
segments from the oldest end: a trimmed segment's records are first applied
to the CG's **base images** (the image of each vdisk at the newest seq
trimmed so far, `nicsplit.recovery.base`), then the file is deleted. The
image at any PIT is then base + the journal records after the base seq, so
every PIT at or after the base seq stays exact; older ones are gone, and the
*protection window* starts at the base.

`thin` decides which PITs are *offered* (listed, selectable) in the hourly
band; the journal ranges between hourly PITs are not rewritten, so thinning
frees space only when the range ages past ``keep_hourly`` and its segments
are trimmed (RecoverPoint and Zerto likewise consolidate only at the old end).

Rules
-----
1. The segment being written (the newest) is never trimmed, nor any
   segment of a batch that continues into it.
2. A *pinned* PIT S (a locked bookmark, an open image, the replica's
   applied seq) keeps every segment from the one holding S on: a segment is
   trimmed only when its last seq < S (the base stays below S, so S stays
   listed and reachable). When that stops the size limit from holding, the plan
   says which bookmark blocks it (shown by ``nicsplit status``).
3. By age: a segment goes when its newest commit is older than
   ``keep_hourly`` (or ``keep_all`` when hourly keeping is off).
4. By size: the oldest segments go while the journal exceeds
   ``max_journal_size``, rule 1 and 2 permitting.
5. A trimmed prefix ends at a batch boundary (a batch may span segments:
   such segments go together). Blocks in it that kept records reference are
   carried over by the journal first (nicsplit.journal.writer rule 10).
6. Nor anything the card may still reference: the card forgets a learned
   block ``dedup_horizon`` after learning it, so segments younger than that
   (plus a margin) stay (``min_age_s``).
Everything here is pure (no I/O): the journal gathers the segment facts
(`Journal.segment_facts`, a list of `nicsplit.journal.writer.SegmentInfo`),
the trimmer (`nicsplit.recovery.trimmer`) carries the plan out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from nicsplit.core.config import ConfigError, parse_size
from nicsplit.journal.writer import SegmentInfo

HOUR_NS = 3600 * 10**9
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class RetentionError(ValueError):
    """A bad retention setting: one clear line."""


def parse_duration(value: Any, what: str) -> float:
    """``"24h"``, ``"7d"``, ``"90s"``, ``"2w"``, ``3600`` → seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise RetentionError(f"{what}: {value} is negative")
        return float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise RetentionError(f"{what}: bad duration {value!r} (use e.g. 90s, 15m, 24h, 7d, 2w)")
    return float(m.group(1)) * _UNITS[m.group(2)]


@dataclass(frozen=True, slots=True)
class Policy:
    keep_all_s: float = 86400.0
    keep_hourly_s: float = 7 * 86400.0  # the oldest age kept at all (0: keep_all is the limit)
    max_journal_bytes: int = 0  # 0 = no size limit
    interval_s: float = 60.0

    @property
    def max_age_s(self) -> float:
        return max(self.keep_all_s, self.keep_hourly_s)

    @classmethod
    def from_config(cls, raw: dict[str, Any] | None) -> "Policy":
        raw = dict(raw or {})
        unknown = set(raw) - {"keep_all", "keep_hourly", "max_journal_size", "interval"}
        if unknown:
            raise RetentionError(f"[retention]: unknown setting(s) {', '.join(sorted(unknown))}")
        size_v = raw.get("max_journal_size", 0)
        try:
            size = 0 if size_v in (0, "0", "") else parse_size(size_v, "[retention] max_journal_size")
        except ConfigError as e:
            raise RetentionError(str(e)) from None
        p = cls(parse_duration(raw.get("keep_all", "24h"), "[retention] keep_all"),
                parse_duration(raw.get("keep_hourly", "7d"), "[retention] keep_hourly"),
                size, parse_duration(raw.get("interval", "60s"), "[retention] interval"))
        if p.keep_all_s <= 0:
            raise RetentionError("[retention] keep_all must be > 0 (every PIT would expire at once)")
        if p.interval_s <= 0:
            raise RetentionError("[retention] interval must be > 0")
        return p


def thin(times_ns: Sequence[int], now_ns: int, policy: Policy, pinned: Sequence[bool] | None = None, *,
         expired: bool = False) -> list[bool]:
    """Which PITs are offered: all younger than ``keep_all``; in the hourly
    band the newest PIT of each clock hour; none past the max age (unless
    ``expired``: still in the journal until the next trim, so still
    offered); a pinned one (bookmarked) always. ``times_ns`` ascending."""
    keep_all_ns = int(policy.keep_all_s * 1e9)
    max_ns = int(policy.max_age_s * 1e9)
    out = [False] * len(times_ns)
    last_hour = None
    for i in range(len(times_ns) - 1, -1, -1):  # newest first: the first seen in an hour is its newest
        age = now_ns - times_ns[i]
        if age <= keep_all_ns:
            out[i] = True
        elif age <= max_ns or expired:
            hour = times_ns[i] // HOUR_NS
            if hour != last_hour:
                out[i] = True
                last_hour = hour
        if pinned is not None and pinned[i]:
            out[i] = True
    return out


@dataclass(frozen=True, slots=True)
class TrimPlan:
    trim: list[int] = field(default_factory=list)  # segment numbers, oldest first
    base_seq: int = 0  # the base after trimming them (unchanged when nothing is trimmed)
    blocked_by: str | None = None  # why the size limit cannot hold, if it cannot


def plan_trim(segments: Sequence[SegmentInfo], now_ns: int, policy: Policy, *, base_seq: int = 0,
              locked_seqs: Sequence[int] = (), min_age_s: float = 0.0) -> TrimPlan:
    """The segments to trim now (rules 1-6), oldest first."""
    # Units: runs of segments ending where a batch ends (a batch may span
    # segments; its COMMIT is in the last). The run holding the segment
    # being written is never complete, hence never trimmed (rule 1).
    units: list[list[SegmentInfo]] = []
    run: list[SegmentInfo] = []
    for s in segments[:-1]:
        run.append(s)
        if s.last_seq and s.ends_batch:
            units.append(run)
            run = []
    floor = min(locked_seqs) if locked_seqs else None
    cutoff_ns = now_ns - int(policy.max_age_s * 1e9)
    total = sum(s.size for s in segments)
    n = 0  # units to trim
    blocked = None
    for u in units:
        end = u[-1]
        too_old = end.t_last_ns < cutoff_ns
        too_big = policy.max_journal_bytes > 0 and total > policy.max_journal_bytes
        if not (too_old or too_big):
            break
        if floor is not None and end.last_seq >= floor:  # rule 2: the base stays below the pinned PIT
            blocked = f"a pinned point in time (seq {floor}: locked bookmark, open image or replica)"
            break
        n += 1
        total -= sum(s.size for s in u)
    # Rule 6: back to a prefix the card can no longer reference.
    young_ns = now_ns - int(min_age_s * 1e9)
    while n and any(s.appended_ns > young_ns for u in units[:n] for s in u):
        n -= 1
        if blocked is None:
            blocked = "the card may still reference its blocks (dedup horizon)"
    trim = [s.number for u in units[:n] for s in u]
    if trim:
        base_seq = units[n - 1][-1].last_seq
    total = sum(s.size for s in segments) - sum(s.size for u in units[:n] for s in u)
    if blocked is None:
        blocked = "the newest batches alone exceed the limit"
    if not (policy.max_journal_bytes and total > policy.max_journal_bytes):
        blocked = None  # only a size limit that does not hold needs a reason
    return TrimPlan(trim, base_seq, blocked)
