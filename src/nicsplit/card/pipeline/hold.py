"""Stage 2, hold: keep each write until the host says it committed (P3), and
release committed writes downstream in CG sequence order (P2).

Theory of operation
-------------------
The splitter gives each write of a consistency group a gap-free sequence
number ``cg_seq`` and, after the datastore answered, posts an `Outcome`.
Hold keeps one *lane* per CG (keyed by ``cg_id``, the domain of ``cg_seq``)
with a slot per seq and a ``next`` pointer:

- seq N leaves hold only after every seq < N of its CG is resolved, i.e.
  committed (passed on), failed (payload freed, never shipped), rejected by
  resolve, or lost;
- COMMITTED and the slot is the lane's next → appended to the ready queue;
- FAILED → payload freed at once, the slot stays as a "resolved" marker;
- an outcome that does not arrive within ``outcome_timeout_ms`` makes the
  write *lost*: ``on_lost(write)`` is called (the lead marks its region
  dirty; P1) and the write is treated as failed. A seq that never arrives at
  all (the splitter timed out before handing it over and marked it itself)
  is skipped after the same timeout once a later seq of its CG is waiting;
- a write whose seq is below the lane's ``next`` (too late) or repeats a seq
  cannot be placed in order: it is lost as well;
- the lane's first ``next`` is the first seq seen for the CG, unless the lead
  called ``expect(cg_id, seq)``;
- an outcome seen before its write (possible on unordered transports) waits
  up to the timeout for it;
- a seq the transport refused (the card acked its write FAILED, e.g. while
  full; the host marks it) is given to ``skip`` and is resolved at once:
  waiting out the timeout for it stalled every later seq of its CG, so a
  full card stayed full (and every resync filled it again);
- a seq acked and then found unshippable (its payload failed its checksum
  after the ack: `nicsplit.card.transports.ring_handoff`) is given to
  ``open_gap(cg_id, seq, vdisk_id, offset, length)`` before it is skipped:
  the journal lacks that write until the host, which learns it from the
  lost log, resyncs its region, so every later write of the CG leaves hold
  with ``WFlag.GAP`` set (no consistent PIT ends at its record, P5; the
  appliance already lists such PITs ``consistent=False, gap=True``) until
  committed WRITEs or ZEROs after that seq have covered the whole region
  again (the host's resync copies, which carry GAP themselves while the
  host's own gap lasts, or the client's writes). The write that completes
  the cover carries no GAP of the card's: the region is whole at its PIT.
  The card's gap lives in this process: a worker restart forgets it (the
  host's marking, once it reads the lost log, still flags the resync).

Every write that enters hold is released (``release(io_id)``) exactly once
by the pipeline: here when it is dropped, after a durable ack otherwise.

Bounds: ``max_writes`` writes and ``max_bytes`` payload bytes held (pending
plus ready). When either is reached `full` is true — the card reports itself
full so the splitter goes to marking (P4) — and a write that still arrives is
lost (``on_lost``), never queued beyond the bound.

Options: ``max_writes`` (default 65536), ``max_bytes`` (default 256 MiB),
``outcome_timeout_ms`` (default 5000).

Example::

    hold = Hold(on_lost=mark_dirty, release=endpoint.release)
    hold.add(resolved, now_ns)
    hold.outcome(Outcome(io_id, Status.COMMITTED), now_ns)
    while (r := hold.pop_ready()) is not None: ...
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Callable

from nicsplit.core.records import AugmentedWrite, Op, Outcome, Status, WFlag

from .items import Resolved

log = logging.getLogger(__name__)

_PENDING, _COMMITTED, _DROPPED = 0, 1, 2
_OK = Status.COMMITTED

# A slot is a list, not an object: one is made per write on the card's steady
# path, and a list costs no Python call. [_R, _STATE, _T, _LANE]:
_R, _STATE, _T, _LANE = 0, 1, 2, 3  # its Entry (None: a placeholder for a seq resolve rejected), state,
#                                     when it arrived, its _Lane

# What hold keeps of a resolved write, and what its ready queue holds: a
# tuple, not a `Resolved` (a dataclass costs a Python __init__ per write,
# ~0.2 µs; the pipeline's steady path makes these tuples itself, `add_entries`).
Entry = tuple  # (AugmentedWrite, CG name, vdisk name, payload bytes held): Resolved's fields, in its order
_W, _NB = 0, 3  # an entry's write and payload bytes (the per-write loops index with the literals)


class _Lane:
    __slots__ = ("next", "slots", "blocked_ns")

    def __init__(self, first: int) -> None:
        self.next = first
        self.slots: dict[int, list] = {}
        self.blocked_ns: int | None = None  # since when `next` is missing while later seqs wait


@dataclass(frozen=True)
class HoldStats:
    held: int  # writes inside hold (pending + ready)
    held_bytes: int
    ready: int  # committed, in order, not yet taken downstream
    lanes: int  # consistency groups seen
    committed: int
    failed: int
    lost_timeout: int  # outcome never came
    lost_late: int  # seq below the lane's next, or a repeated seq
    refused_full: int  # arrived while full
    gaps_skipped: int  # seqs that never arrived
    stray_outcomes: int  # outcome for no held write (expired unmatched)
    gap_flagged: int  # writes given WFlag.GAP after a write the card acked and could not ship (`open_gap`)
    gaps_open: int  # CGs with such a write whose region is not yet covered again
    full: bool


class Hold:
    def __init__(
        self,
        *,
        on_lost: Callable[[AugmentedWrite], None],
        release: Callable[[int], None],
        max_writes: int = 65536,
        max_bytes: int = 256 << 20,
        outcome_timeout_ms: float = 5000,
    ) -> None:
        if max_writes < 1 or max_bytes < 1:
            raise ValueError("hold bounds must be positive")
        self._on_lost = on_lost
        self._release = release
        self.max_writes = max_writes
        self.max_bytes = max_bytes
        self.timeout_ns = int(outcome_timeout_ms * 1_000_000)
        self._lanes: dict[int, _Lane] = {}
        self._by_io: dict[int, list] = {}  # io_id → its pending slot
        self._early: OrderedDict[int, tuple[Status, int]] = OrderedDict()  # io_id → (status, t_ns)
        self._ready: deque[Entry] = deque()
        self._count = self._bytes = 0
        self._committed = self._failed = self._lost_timeout = self._lost_late = 0
        self._refused = self._gaps = self._stray = 0
        # cg_id -> {seq: t_ns}: refused seqs of a CG hold has no lane for yet
        # (placed when its lane starts; bounded, expired like early outcomes)
        self._early_skips: dict[int, dict[int, int]] = {}
        # cg_id -> [[seq, vdisk_id, start, end), ...]: regions of acked writes
        # the card will never ship, not yet covered by a later committed write
        # (`open_gap`); empty in the steady state: one truth test per write
        self._open_gaps: dict[int, list[list[int]]] = {}
        self._gap_flagged = 0

    # -- input ---------------------------------------------------------------

    @property
    def full(self) -> bool:
        return self._count >= self.max_writes or self._bytes >= self.max_bytes

    @property
    def held(self) -> int:
        """Writes inside hold (pending + ready)."""
        return self._count

    def fits(self, writes: int, nbytes: int) -> bool:
        """Would ``writes`` more writes of ``nbytes`` payload stay within the bounds?"""
        return self._count + writes <= self.max_writes and self._bytes + nbytes <= self.max_bytes

    def awaiting(self, io_id: int) -> bool:
        """Is ``io_id`` held, waiting for its outcome?"""
        return io_id in self._by_io

    def expect(self, cg_id: int, next_seq: int) -> None:
        """Declare the next seq of a CG (before any of its writes arrive)."""
        lane = self._lanes.get(cg_id)
        if lane is None:
            self._new_lane(cg_id, next_seq, 0)
        elif not lane.slots:
            lane.next = next_seq

    def add(self, r: Resolved, now_ns: int) -> None:
        self._add((r.write, r.cg, r.vdisk, r.nbytes), now_ns)

    def _add(self, r: Entry, now_ns: int) -> None:
        w = r[_W]
        seq = w.cg_seq
        lanes = self._lanes
        if w.cg_id in lanes:
            lane = lanes[w.cg_id]
        else:
            lane = self._new_lane(w.cg_id, seq, now_ns)
        slots = lane.slots
        if self._count >= self.max_writes or self._bytes >= self.max_bytes:  # full
            self._refused += 1
            self._lose(w, "card full")
            if seq >= lane.next and seq not in slots:  # its seq is spoken for: later ones go on
                slots[seq] = [None, _DROPPED, now_ns, lane]
                self._advance(lane, now_ns)
            return
        if seq < lane.next or seq in slots:
            self._lost_late += 1
            self._lose(w, f"seq {seq} cannot be placed (next is {lane.next})")
            return
        slot = slots[seq] = [r, _PENDING, now_ns, lane]
        self._by_io[w.io_id] = slot
        self._count += 1
        self._bytes += r[_NB]
        if self._early:
            early = self._early.pop(w.io_id, None)
            if early is not None:
                del self._by_io[w.io_id]
                self._resolve(slot, w.io_id, early[0])
                self._advance(lane, now_ns)
                return
        if seq == lane.next or lane.next in slots:  # the head is pending: nothing moves, nothing is missing
            lane.blocked_ns = None
        else:
            self._advance(lane, now_ns)

    def add_many(self, rs: list[Resolved], now_ns: int) -> None:
        """`add` for each of ``rs``, in order: one call for a poll's writes."""
        self.add_entries([(r.write, r.cg, r.vdisk, r.nbytes) for r in rs], now_ns)

    def add_entries(self, rs: list[Entry], now_ns: int) -> None:
        """`add_many` of entries ``(write, cg, vdisk, nbytes)`` (a `Resolved`'s
        fields): the pipeline's steady path, which builds no `Resolved`.
        The common write (its lane started, hold not full, its seq free and
        not below ``next``, no early outcome waiting) is placed here inline;
        any other takes `_add`."""
        if self._early:  # an outcome may wait for one of them: `_add` looks
            for r in rs:
                self._add(r, now_ns)
            return
        lanes, by_io = self._lanes, self._by_io
        max_w, max_b = self.max_writes, self.max_bytes
        count, nbytes = self._count, self._bytes
        lane_id = lane = slots = None
        for r in rs:
            w = r[0]
            if w.cg_id != lane_id:
                lane_id = w.cg_id
                lane = lanes.get(lane_id)
                slots = None if lane is None else lane.slots
            seq = w.cg_seq
            if lane is None or count >= max_w or nbytes >= max_b or seq < lane.next or seq in slots:
                self._count, self._bytes = count, nbytes
                self._add(r, now_ns)  # a new lane, full, late or repeated: `_add` says what happens
                count, nbytes = self._count, self._bytes
                lane_id = None  # (`add` may have started the lane)
                continue
            slot = slots[seq] = [r, _PENDING, now_ns, lane]
            by_io[w.io_id] = slot
            count += 1
            nbytes += r[3]
            nxt = lane.next
            if seq == nxt or nxt in slots:  # the head is pending: nothing moves, nothing is missing
                lane.blocked_ns = None
            else:
                self._advance(lane, now_ns)
        self._count, self._bytes = count, nbytes

    def reject(self, cg_id: int, seq: int, now_ns: int) -> None:
        """Resolve dropped this seq: it is resolved without being shipped."""
        lane = self._lane(cg_id, seq, now_ns)
        if seq >= lane.next and seq not in lane.slots:
            lane.slots[seq] = [None, _DROPPED, now_ns, lane]
            self._advance(lane, now_ns)

    def skip(self, cg_id: int, seq: int, now_ns: int) -> None:
        """The transport refused this seq's write (its host marks it): it
        will never arrive, so later seqs need not wait for it."""
        lane = self._lanes.get(cg_id)
        if lane is None:  # before the CG's first write: placed when its lane starts
            early = self._early_skips.setdefault(cg_id, {})
            if len(early) < self.max_writes:
                early[seq] = now_ns
            return
        if seq >= lane.next and seq not in lane.slots:
            self._gaps += 1
            lane.slots[seq] = [None, _DROPPED, now_ns, lane]
            self._advance(lane, now_ns)

    def open_gap(self, cg_id: int, seq: int, vdisk_id: int, offset: int, length: int) -> None:
        """The acked write ``seq`` of this CG will never be shipped (its
        payload failed its checksum): flag every later write of the CG GAP
        until committed writes after it cover its region (theory above).
        Call it before the seq is skipped, so nothing after it leaves first."""
        if length > 0:
            self._open_gaps.setdefault(cg_id, []).append([seq, vdisk_id, offset, offset + length])

    def _gap(self, w: AugmentedWrite) -> None:
        """``w`` leaves hold while its CG has open gaps: its cover is taken
        off them, and it carries GAP if any opened before it stays open."""
        gaps = self._open_gaps[w.cg_id]
        seq = w.cg_seq
        if w.op is Op.WRITE or w.op is Op.ZERO:
            a, b, vd = w.voffset, w.voffset + w.length, w.vdisk_id
            left = []
            for g in gaps:
                if g[0] < seq and g[1] == vd and a < g[3] and b > g[2]:
                    if g[2] < a:
                        left.append([g[0], vd, g[2], a])
                    if b < g[3]:
                        left.append([g[0], vd, b, g[3]])
                else:
                    left.append(g)
            gaps[:] = left
        if any(g[0] < seq for g in gaps):
            w.flags = w.flags | WFlag.GAP
            self._gap_flagged += 1
        if not gaps:
            del self._open_gaps[w.cg_id]

    def outcome(self, o: Outcome, now_ns: int) -> None:
        slot = self._by_io.pop(o.io_id, None)
        if slot is not None:
            lane = slot[_LANE]
            r = slot[_R]
            w = r[_W]
            seq = w.cg_seq
            if o.status != _OK:
                self._resolve(slot, o.io_id, o.status)
                if seq == lane.next:
                    self._advance(lane, now_ns)
                return
            # `_resolve` and `_advance` inline for the common outcome: the
            # head of its lane committed (outcomes come in seq order)
            slot[_STATE] = _COMMITTED
            self._committed += 1
            if seq != lane.next:  # below the head nothing can move
                return
            slots = lane.slots
            del slots[seq]
            seq += 1
            lane.next = seq
            if self._open_gaps and w.cg_id in self._open_gaps:
                self._gap(w)
            self._ready.append(r)
            if seq in slots:
                if slots[seq][_STATE] != _PENDING:
                    self._advance(lane, now_ns)  # it moves at least one more: its gap clock as before
                else:
                    lane.blocked_ns = None  # the new head is pending: nothing is missing
            elif slots:
                lane.blocked_ns = now_ns  # the gap clock starts when this seq became the one missing
            else:
                lane.blocked_ns = None
        else:
            self._early[o.io_id] = (o.status, now_ns)
            if len(self._early) > self.max_writes:
                self._early.popitem(last=False)
                self._stray += 1

    def outcomes(self, os: list[Outcome], now_ns: int) -> None:
        """`outcome` for each of ``os``, in order: one call for a run of a
        poll's outcomes. The common one (COMMITTED, for a held write) is
        settled here inline, `outcome`'s steps without its call; any other
        takes `outcome`."""
        by_io, ready_append = self._by_io, self._ready.append
        n = 0
        try:
            for o in os:
                slot = by_io.get(o.io_id)
                if slot is None or o.status != _OK:
                    self.outcome(o, now_ns)
                    continue
                del by_io[o.io_id]
                slot[_STATE] = _COMMITTED
                n += 1
                lane = slot[_LANE]
                r = slot[_R]
                w = r[0]
                seq = w.cg_seq
                if seq != lane.next:  # below the head nothing can move
                    continue
                slots = lane.slots
                del slots[seq]
                seq += 1
                lane.next = seq
                if self._open_gaps and w.cg_id in self._open_gaps:
                    self._gap(w)
                ready_append(r)
                if seq in slots:
                    if slots[seq][_STATE] != _PENDING:
                        self._advance(lane, now_ns)
                    else:
                        lane.blocked_ns = None
                elif slots:
                    lane.blocked_ns = now_ns
                else:
                    lane.blocked_ns = None
        finally:
            self._committed += n

    def expire(self, now_ns: int) -> None:
        """Lose writes whose outcome is overdue and skip seqs that never came."""
        for cg_id, lane in self._lanes.items():
            while lane.slots:
                s = lane.slots.get(lane.next)
                if s is not None:
                    if s[_STATE] != _PENDING or s[_T] + self.timeout_ns > now_ns:
                        break
                    r = s[_R]
                    self._by_io.pop(r[_W].io_id, None)
                    s[_STATE] = _DROPPED
                    self._lost_timeout += 1
                    self._count -= 1
                    self._bytes -= r[_NB]
                    self._lose(r[_W], f"no outcome within {self.timeout_ns // 1_000_000} ms")
                elif lane.blocked_ns is not None and lane.blocked_ns + self.timeout_ns <= now_ns:
                    first = min(lane.slots)
                    log.warning("cg %d: seqs %d..%d never arrived: skipped", cg_id, lane.next, first - 1)
                    self._gaps += first - lane.next
                    lane.next = first
                else:
                    break
                self._advance(lane, now_ns)
        if self._early_skips:
            for cg_id in [c for c, e in self._early_skips.items() if max(e.values()) + self.timeout_ns <= now_ns]:
                del self._early_skips[cg_id]
        while self._early:
            io_id, (_, t) = next(iter(self._early.items()))
            if t + self.timeout_ns > now_ns:
                break
            del self._early[io_id]
            self._stray += 1

    # -- output --------------------------------------------------------------

    @property
    def ready(self) -> deque[Entry]:
        """The ready queue itself (entries ``(write, cg, vdisk, nbytes)``),
        for a consumer that takes many at once: it pops from the left and
        then calls `took` with what it popped."""
        return self._ready

    def took(self, writes: int, nbytes: int) -> None:
        """``writes`` writes of ``nbytes`` payload were popped from `ready`."""
        self._count -= writes
        self._bytes -= nbytes

    def pop_ready(self) -> Resolved | None:
        if not self._ready:
            return None
        r = self._ready.popleft()
        self._count -= 1
        self._bytes -= r[_NB]
        return Resolved(*r)

    def has_ready(self) -> bool:
        return bool(self._ready)

    def statistics(self) -> HoldStats:
        return HoldStats(
            held=self._count, held_bytes=self._bytes, ready=len(self._ready), lanes=len(self._lanes),
            committed=self._committed, failed=self._failed, lost_timeout=self._lost_timeout,
            lost_late=self._lost_late, refused_full=self._refused, gaps_skipped=self._gaps,
            stray_outcomes=self._stray, gap_flagged=self._gap_flagged, gaps_open=len(self._open_gaps),
            full=self.full,
        )

    # -- internals -----------------------------------------------------------

    def _lane(self, cg_id: int, seq: int, now_ns: int) -> _Lane:
        lane = self._lanes.get(cg_id)
        if lane is None:
            lane = self._new_lane(cg_id, seq, now_ns)
        return lane

    def _new_lane(self, cg_id: int, first: int, now_ns: int) -> _Lane:
        lane = self._lanes[cg_id] = _Lane(first)
        early = self._early_skips.pop(cg_id, None)
        if early:
            for seq, t in early.items():
                if seq >= first:
                    self._gaps += 1
                    lane.slots[seq] = [None, _DROPPED, t, lane]
            if first in lane.slots:
                self._advance(lane, now_ns)
        return lane

    def _resolve(self, s: list, io_id: int, status: Status) -> None:
        """Settle a pending slot (already taken out of ``_by_io``)."""
        if status == _OK:
            s[_STATE] = _COMMITTED
            self._committed += 1
        else:
            s[_STATE] = _DROPPED
            self._failed += 1
            self._count -= 1
            self._bytes -= s[_R][_NB]
            log.info("io %d: failed in the datastore: dropped, never shipped", io_id)
            self._release(io_id)

    def _lose(self, w: AugmentedWrite, why: str) -> None:
        log.warning("io %d: lost (%s): vdisk %d %d+%d reported dirty", w.io_id, why, w.vdisk_id, w.voffset, w.length)
        self._on_lost(w)
        self._release(w.io_id)

    def _advance(self, lane: _Lane, now_ns: int) -> None:
        slots = lane.slots
        moved = False
        while (nxt := lane.next) in slots:  # (`in` and a subscript: no call per step)
            s = slots[nxt]
            if s[_STATE] == _PENDING:
                break
            del slots[nxt]
            lane.next = nxt + 1
            moved = True
            if s[_STATE] == _COMMITTED:
                r = s[_R]
                if self._open_gaps and r[_W].cg_id in self._open_gaps:
                    self._gap(r[_W])
                self._ready.append(r)
        if slots and lane.next not in slots:
            if moved or lane.blocked_ns is None:
                lane.blocked_ns = now_ns  # the gap clock starts when this seq became the one missing
        else:
            lane.blocked_ns = None
