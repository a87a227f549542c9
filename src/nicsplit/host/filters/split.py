"""``split``: the splitter filter — every write of a protected vdisk is
augmented with its virtual identity and handed to the offload card before it
goes down to the datastore.

What it does per write-like IO (ARCHITECTURE.md §3, steps D–I):
D. builds an `AugmentedWrite`: CG id, CG sequence number (taken as the IO
   enters this filter; a write that does not reach the card takes none), vdisk id, op (write / zero / trim / barrier), FUA,
   *virtual* offset and length, timestamp, IO id;
E–F. hands it to the card through the transport and waits for the ack, at
   most ``split_timeout_us``; a write whose ack is late is not lost: it stays
   in flight in the ring, in order, and is *unconfirmed* until the card's
   verdict arrives (`nicsplit.host.cardlink`), while the IO goes on;
G–H. passes the IO down the chain (the datastore translates and writes);
I. posts the outcome (committed / failed) to the card without waiting, so the
   card ships only what production committed (P3).

Flush is a barrier record in the stream; FUA travels as a flag (also a
barrier). Production first (P4): a slow card never holds an IO longer than
the timeout, and a late ack is not a lost write. Only when the card refuses a
write (every buffer full) or is dead (gone, closed, or no heartbeat for
seconds) does the vdisk enter *marking* — the write's region goes into the persistent dirty map and
the IO proceeds; a vdisk stays marking (without waiting on the card again)
until the card is back: then it is *resyncing* (`nicsplit.host.resync`
copies its dirty regions while new writes are split again) and, once no
region is left, *protected*. While any vdisk of the CG is marking or
resyncing, every record of the CG carries ``WFlag.GAP`` (no consistent PIT
ends there). A write to a region the resync is copying waits until the copy
is in the ring (`nicsplit.host.regions`). A vdisk in no consistency group is
not protected: its IOs pass through and its state is ``unprotected``.

Initial sync (`establish`, called by the host once the chain is built): a
vdisk whose protection was not yet established for its CG (it joined the CG
holding data, or has no record of it) is *initializing*: its allocated
regions are marked and the resync copies them all while new writes are
split (with GAP); an empty one is protected at once.

Activity log (`nicsplit.host.actlog`): before any of that, a write's 4 MiB
extents are made hot in the host's activity log (no IO when they are hot
already; else one fdatasync shared by the activations waiting), so after a
host crash the host knows which regions had writes in flight and resyncs
only those.

Large writes in place (issue 9): the filter lends the NBD front end a
reservation in the card's ring for a write's payload of at least
``RESERVE_MIN`` bytes (`reserve`, chain rule 4), so the payload is received
where it is published and checksummed as it lands; the write then costs the
splitter a descriptor (`nicsplit.card.transports.ring_splitter`). An
unprotected or marking vdisk, no card, or no room in the ring: nothing is
lent and the write is copied into the ring as before.

Shadow transport (`nicsplit.card.transports.shadow`): a data write's
augmented copy is the *fake half*, published and not waited for; the real
half is the datastore's own write, which the plugin passes through the
card's emulated device (`nicsplit.host.shadowio`) and which is the write's
outcome in the card; see `_shadow_pwrite`.

Options: ``split_timeout_us`` (default 1000).
Example: ``filters = ["stats", "split"]`` with the vdisk in a CG
(``nicsplit vdisk create NAME --size 1G --cg CG``).
"""

from __future__ import annotations

import asyncio
from time import monotonic_ns, perf_counter_ns, time_ns
from typing import Callable

from nicsplit.card.transports.base import splitter_class
from nicsplit.core import failpoints as _fp
from nicsplit.core.records import AugmentedWrite, Op, Status, WFlag
from nicsplit.host.actlog import ActivityLogError
from nicsplit.host.chain import ChainError, Filter
from nicsplit.host.filters.stats import Histogram
from nicsplit.host.io import FUA
from nicsplit.host.regions import RegionLock
from nicsplit.host.shadowio import INFLIGHT, ShadowIO

_FP = _fp.ACTIVE  # armed failpoints (nicsplit.core.failpoints): empty unless a test arms some

_WFUA = int(WFlag.FUA)
_WGAP = int(WFlag.GAP)
_WNONE = 0
_COMMITTED = Status.COMMITTED
_FAILED = Status.FAILED


_NO_ROOM = object()  # `_submit`'s verdict for a write a live card has no room for yet

# Lend ring space for payloads of at least this many bytes. The NBD codec
# streams only payloads of 64 KiB and more into a buffer of their own
# (smaller ones arrive with their header and are sliced out of its input),
# and at 64 KiB in place already wins: socket to ring 37 us of CPU against
# 54 us copied (bench/big_split.py --only recv --size 65536, docs/benchmarks.md).
RESERVE_MIN = 64 * 1024


class BarrierFailed(Exception):
    """The card did not acknowledge a barrier: one clear line."""


class SplitFilter(Filter):
    name = "split"
    observes_data = True
    handles_fua = True
    options = ("split_timeout_us",)

    def __init__(self, vdisk, options) -> None:
        super().__init__(vdisk, options)
        ctx = vdisk.context
        if ctx is None:
            raise ChainError("filter 'split' needs the host context (run it inside nicsplit host serve)")
        self.ctx = ctx
        # The transport (docs/operations.md "Choosing a transport"): the host
        # server puts the vdisk's in its view; its class may set the default
        # deadline (net: a round trip to the appliance and a journal commit).
        self.transport = str(vdisk.extra.get("transport") or ctx.card.kind)
        try:
            default_us = getattr(splitter_class(self.transport), "default_timeout_us", 1000)
        except ValueError as e:  # unknown transport name: one clear line
            raise ChainError(f"filter 'split' of vdisk {vdisk.name}: {e}") from None
        self.timeout_ns = int(float(options.get("split_timeout_us", default_us)) * 1000)
        # net: the ack before the write goes down (`_ack_then_down`)
        self.ack_first = bool(getattr(splitter_class(self.transport), "ack_first", False))
        # shadow: the real half is the outcome; the fake half is not waited for (`_shadow_pwrite`)
        self.shadow = bool(getattr(splitter_class(self.transport), "shadow", False))
        if self.timeout_ns <= 0:
            raise ChainError("filter 'split': split_timeout_us must be > 0")
        self.cg = vdisk.extra.get("cg")
        self.cg_id = ctx.cg_id(self.cg) if self.cg else 0
        self.seq = ctx.sequencer(self.cg) if self.cg else None
        self._next_io_id = ctx.next_io_id  # bound once: the per-write path pays each lookup (QD1)
        self._vdisk_id = vdisk.id
        self.dmap = ctx.dirty_map(vdisk.uuid, vdisk.size)
        self.dmap.name = vdisk.name
        self.gap = ctx.join_gap(self.cg, self.dmap) if self.cg else None
        self.regions = RegionLock()  # shared with the resync of this vdisk
        self.resync = None  # the resync's progress (nicsplit.host.resync.Progress) while one runs
        try:
            self.link = ctx.link_for(self.transport)
        except ValueError as e:  # a second card transport: one clear line
            raise ChainError(f"filter 'split' of vdisk {vdisk.name}: {e}") from None
        self.al = ctx.activity_log  # None: no activity log (a read-only host)
        self.link.register(vdisk.id, self.dmap)
        # The latency the splitter adds to a write: publishing it (building the
        # record, copying and checksumming the payload into the ring) plus the
        # wait for the ack once the layer below is done (the datastore write
        # overlaps the card's round trip, so it is not counted; parking for
        # room is counted in parked_count). docs/benchmarks.md, issue 9.
        self.hist = Histogram()
        self.split_count = 0
        self.marked_count = 0
        self.late_count = 0
        self.parked_count = 0  # writes that waited for room in a full ring  # writes that went on without their ack (still in flight)
        self._dmap_dirty = False

    # -- state -------------------------------------------------------------
    @property
    def state(self) -> str:
        if self.seq is None:
            return "unprotected"
        return self.dmap.state

    def establish(self, allocated: Callable[[], list[tuple[int, int]]]) -> None:
        """Protection for the vdisk's CG starts here unless it was established
        before: ``allocated()`` gives the (offset, length) ranges that hold data
        (the datastore's extents, below the splitter); they are all marked and
        the vdisk is *initializing* (the resync copies them), or protected at
        once when there are none. Out of any CG the record is dropped: its
        writes are not journalled, so joining again syncs in full."""
        if self.seq is None:
            self.dmap.forget_cg()
            return
        if self.dmap.cg != self.cg:  # (an initial sync under way for it resumes from the bitmap)
            self.dmap.begin_initial(self.cg, allocated())

    def join(self, cg: str, allocated: Callable[[], list[tuple[int, int]]]) -> None:
        """The vdisk joins ``cg`` while the host runs (``nicsplit cg add``):
        its writes are split from this call on, and what it already holds —
        the allocated ranges, and the regions of writes still on their way
        down unsplit (the initial sync's region lock waits for them) — is
        marked and copied by the initial sync (*initializing*)."""
        if self.seq is not None:
            if self.cg == cg:
                return
            raise ChainError(f"vdisk {self.vdisk.name} is already in consistency group {self.cg}")
        cg_id = self.ctx.cg_id(cg)  # CGError (one line) for an unknown CG
        self.cg, self.cg_id = cg, cg_id
        self.gap = self.ctx.join_gap(cg, self.dmap)
        self.seq = self.ctx.sequencer(cg)  # nothing awaits between here and the marks below
        self.dmap.begin_initial(cg, list(allocated()) + self.regions.busy_ranges())

    def _mark(self, w: AugmentedWrite, reason: str) -> None:
        self._mark_range(w.voffset, w.length, reason)

    def _mark_range(self, offset: int, length: int, reason: str) -> None:
        self.dmap.enter_marking(reason)
        self.dmap.mark(offset, length)
        self._dmap_dirty = True
        self.marked_count += 1

    def mark_for_resync(self, ranges: list[tuple[int, int]], reason: str) -> None:
        """Mark ``ranges`` dirty and enter marking (``nicsplit verify
        --repair``): the automatic resync then copies them from production
        to the card like any marked region, and the vdisk returns to
        protected by itself. The bits are durable before this returns."""
        if self.seq is None:
            raise ChainError(f"vdisk {self.vdisk.name} is in no consistency group: nothing to resync")
        for off, n in ranges:
            if off < 0 or n <= 0 or off + n > self.vdisk.size:
                raise ChainError(f"range {off}+{n} is outside vdisk {self.vdisk.name} ({self.vdisk.size} bytes)")
        for off, n in ranges:
            self._mark_range(off, n, reason)
        self.dmap.sync()

    # -- the split ---------------------------------------------------------
    def _submit(self, op: Op, offset: int, length: int, flags: int, data, park: bool = False, publish: bool = True):
        """Steps D–E: build the augmented write and publish it to the card.
        Returns (write, transport) when the card must ack it, else None; with
        ``park``, `_NO_ROOM` when a healthy card has no room right now (the
        write took no seq and marked nothing: the caller waits and retries).
        ``publish=False`` (a shadow fake half sent after its real half, under
        the failpoint ``host.shadow.real-first``): the write takes its seq and
        io id, and the caller publishes it later."""
        seq = self.seq
        if seq is None:
            return None
        # A write that does not reach the card takes no seq (see Sequencer).
        if self.dmap.marking:
            self._mark_range(offset, length, "")
            return None
        t = self.link.get()
        if t is None:
            self._mark_range(offset, length, "card unavailable: " + (self.link.last_error or "not attached"))
            return None
        t0 = perf_counter_ns()
        wf = _WFUA if flags & FUA else _WNONE
        if self.gap.vdisks:
            wf |= _WGAP
        w = AugmentedWrite(
            self._next_io_id(), self.cg_id, seq.next(), self._vdisk_id, op, wf, offset, length, time_ns(), data,
        )
        if not publish:
            return w, t, perf_counter_ns() - t0, 0
        if not t.submit(w):
            seq.unget(w.cg_seq)  # nothing ran since next(): it is the last number
            if not t.healthy():
                self.link.lost("card stopped responding")
            elif park:
                return _NO_ROOM
            self._mark(w, "card refused the write (full, or gone)")
            return None
        # publishing cost (with the checksum of a payload received in place); payload position, for tracking
        return w, t, perf_counter_ns() - t0 + t.last_prepaid_ns, t.last_position

    async def _acked(self, sub) -> AugmentedWrite | None:
        """Step F, pipelined: the ack (usually already there), a late write
        (in flight, unconfirmed until its verdict), or marking."""
        w, t, cost, position = sub
        t0 = perf_counter_ns()
        v = self.link.wait_ack(t, w.io_id, monotonic_ns() + self.timeout_ns)
        if isinstance(v, asyncio.Future):
            v = await v
        self.hist.record(cost + perf_counter_ns() - t0)  # publish + the wait for the ack (see __init__)
        if v is None:
            # Late: the write waits in the ring in order and the card will take
            # it; until its verdict it is unconfirmed (marked if the card dies).
            self.late_count += 1
            self.link.late(w.io_id, position, self.dmap, w.voffset, w.length, t)
            return w
        if not v:
            if not t.healthy():
                self.link.lost("card stopped responding", t)
            self._mark(w, "card refused the write (full, or a bad record)")
            # Tell the card to drop it if it ever takes it: the region is dirty.
            t.post_outcome(w.io_id, _FAILED)
            return None
        self.split_count += 1
        if w.op is not Op.BARRIER:
            self.link.track(position, self.dmap, w.voffset, w.length, t)
            if self.split_count & 1023 == 0:
                self.link.trim()
        return w

    async def _outcome(self, w: AugmentedWrite | None, status: Status) -> None:
        """Step I: tell the card. A full ring with a live card parks the
        outcome (at most ``split_timeout_us``, as `_split_in` parks a write);
        a dead card, or no room by then, means marking."""
        if w is None:
            return
        deadline = 0
        while True:
            t = self.link.get()
            if t is not None and t.post_outcome(w.io_id, status):
                return
            if t is None or not t.healthy() or (deadline and monotonic_ns() >= deadline):
                break
            if not deadline:
                deadline = monotonic_ns() + self.timeout_ns
            await asyncio.sleep(0)  # the card frees SQ slots as it polls
        if status is _COMMITTED:
            self._mark(w, "could not post the outcome to the card")

    async def _through(self, sub, down, offset: int = 0, length: int = 0) -> None:
        """Steps G–I around the layer below: the datastore write overlaps the
        card's round trip; the client's reply waits for the ack (or marking).
        A write-like IO with a range is in flight for the region lock until
        the layer below has it."""
        if self.ack_first and sub is not None:
            return await self._ack_then_down(sub, down, offset, length)
        try:
            await down
        except BaseException:
            if sub is not None:
                sub[1].post_outcome(sub[0].io_id, _FAILED)
            raise
        finally:
            if length:
                self.regions.leave(offset, length)
        if sub is not None:
            w = await self._acked(sub)
            await self._outcome(w, _COMMITTED)

    async def _ack_then_down(self, sub, down, offset: int, length: int) -> None:
        """The classic splitter's order (the net transport, ``ack_first``):
        the write passes down only once the appliance holds it durably (or
        its region is marked). The appliance journaled it before production
        has it, so a write failed below is marked: the resync journals
        production's content over it."""
        w = None
        try:
            try:
                w = await self._acked(sub)
            except BaseException:
                down.close()  # never started: no "coroutine was never awaited"
                raise
            try:
                await down
            except BaseException:
                if w is not None and w.length:
                    self._mark(w, "a write the appliance journaled failed below the splitter")
                raise
        finally:
            if length:
                self.regions.leave(offset, length)

    def _split_now(self, op: Op, offset: int, length: int, flags: int, data, publish: bool = True):
        """The common case of `_split_in` without a coroutine on the per-write
        path: the region is free and the ring has room. `_NO_ROOM` sends the
        caller to `_split_in` (it took no seq and marked nothing)."""
        if length and self.regions.blocked(offset, length):
            return _NO_ROOM
        sub = self._submit(op, offset, length, flags, data, park=True, publish=publish)
        if sub is not _NO_ROOM and length:
            self.regions.enter(offset, length)
        return sub

    async def _split_in(self, op: Op, offset: int, length: int, flags: int, data, publish: bool = True):
        """Steps D–E with the region lock and backpressure. A write to a region
        the resync holds waits before it takes its seq; a full ring with a live
        card parks the write (SPDK's rule: a full queue parks the IO, it does
        not fail it) for at most ``split_timeout_us``, retrying as the card
        frees room; only then is it marked. From its seq until the layer
        below has it, the write is in flight for the region lock."""
        deadline = 0
        while True:
            if length and self.regions.blocked(offset, length):
                await self.regions.wait(offset, length)
            sub = self._submit(op, offset, length, flags, data, park=not deadline or monotonic_ns() < deadline,
                               publish=publish)
            if sub is not _NO_ROOM:
                break
            if not deadline:
                deadline = monotonic_ns() + self.timeout_ns
                self.parked_count += 1
            await asyncio.sleep(0)  # the loop runs on (acks, other IOs) while the card drains
        if length:
            self.regions.enter(offset, length)
        return sub

    def reserve(self, offset: int, length: int, flags: int):
        """A buffer in the card's ring for a write's payload (chain rule 4),
        or None: the vdisk is not protected or is marking, no card, a small
        write, or no room in the ring now."""
        if self.seq is None or length < RESERVE_MIN or self.dmap.marking:
            return None
        t = self.link.get()
        return t.reserve(length) if t is not None else None

    # -- verbs -------------------------------------------------------------
    # Every write-like IO of a protected vdisk makes its extents hot in the
    # activity log before anything else (a cold one waits for one fdatasync),
    # and stays counted there until it is done here (outcome posted or marked).
    # A write to a region the resync holds waits *before* it takes its seq;
    # from its seq until the layer below has it, it is in flight (regions).
    async def _activate(self, offset: int, length: int) -> None:
        try:
            await self.al.activate(self.vdisk.id, offset, length)
        except ActivityLogError as e:  # not on record: the bitmap records it instead
            self._mark_range(offset, length, str(e))

    async def pwrite(self, next, offset, data, flags):
        n = len(data)
        al = self.al if self.seq is not None else None
        if al is not None and not al.enter(self.vdisk.id, offset, n):
            await self._activate(offset, n)
        try:
            if self.shadow:
                return await self._shadow_pwrite(next, offset, data, flags, n)
            sub = self._split_now(Op.WRITE, offset, n, flags, data)
            if sub is _NO_ROOM:
                sub = await self._split_in(Op.WRITE, offset, n, flags, data)
            if _FP:
                _fp.hit("host.split.after-submit")  # handed to the card, not yet in the datastore
            await self._through(sub, next.pwrite(offset, data, flags), offset, n)
        finally:
            if al is not None:
                al.leave(self.vdisk.id, offset, n)

    async def _shadow_pwrite(self, next, offset: int, data, flags: int, n: int) -> None:
        """A data write on the shadow transport (`nicsplit.card.transports.shadow`):
        the fake half is published to the card's ring and not waited for;
        the real half is the datastore's physical write, which the plugin
        passes through the card's device (`nicsplit.host.shadowio`) and which
        is the write's outcome there (no Outcome is posted for it). The
        fake half is then unconfirmed like a late write: its ack, the card
        holding it, arrives through the late-verdict path, and it is kept
        until the card releases it. A write failed below posts FAILED (the
        card drops the fake half: commit-only); a real half the card did
        not write (gone, full) marks the region and posts FAILED too."""
        real_first = False
        if _FP:
            try:
                _fp.hit("host.shadow.real-first")
            except OSError:  # test: this fake half goes after its real half (reversed pair)
                real_first = True
        sub = self._split_now(Op.WRITE, offset, n, flags, data, publish=not real_first)
        if sub is _NO_ROOM:
            sub = await self._split_in(Op.WRITE, offset, n, flags, data, publish=not real_first)
        if _FP:
            _fp.hit("host.split.after-submit")
        if sub is None:
            return await self._through(None, next.pwrite(offset, data, flags), offset, n)
        w, t, cost, position = sub
        io = ShadowIO(w.io_id, t, offset)
        key = id(data)
        INFLIGHT[key] = io
        try:
            await next.pwrite(offset, data, flags)
        except BaseException:
            if real_first and not t.submit(w):  # its seq is taken: the card drops it by the outcome below
                real_first = False
            t.post_outcome(w.io_id, _FAILED)
            t.abandon(w.io_id)
            raise
        finally:
            INFLIGHT.pop(key, None)
            self.regions.leave(offset, n)
        if real_first:
            t0 = perf_counter_ns()
            if not t.submit(w):  # its seq is a hole the card's hold skips after its timeout
                self._mark(w, "card refused the write (full, or gone)")
                return
            cost += perf_counter_ns() - t0
            position = t.last_position
        self.hist.record(cost)
        if not io.routed:
            self._mark(w, "the write did not pass through the card's device (gone, or full)")
            t.post_outcome(w.io_id, _FAILED)
            t.abandon(w.io_id)
            return
        self.split_count += 1
        v = t.detach(w.io_id)
        if v is None:
            self.link.late(w.io_id, position, self.dmap, offset, n, t)
        elif v:
            self.link.track(position, self.dmap, offset, n, t)
            if self.split_count & 1023 == 0:
                self.link.trim()
        else:
            if not t.healthy():
                self.link.lost("card stopped responding", t)
            self._mark(w, "card refused the write (full, or a bad record)")

    async def zero(self, next, offset, length, flags):
        al = self.al if self.seq is not None else None
        if al is not None and not al.enter(self.vdisk.id, offset, length):
            await self._activate(offset, length)
        try:
            sub = self._split_now(Op.ZERO, offset, length, flags, None)
            if sub is _NO_ROOM:
                sub = await self._split_in(Op.ZERO, offset, length, flags, None)
            await self._through(sub, next.zero(offset, length, flags), offset, length)
        finally:
            if al is not None:
                al.leave(self.vdisk.id, offset, length)

    async def trim(self, next, offset, length, flags):
        al = self.al if self.seq is not None else None
        if al is not None and not al.enter(self.vdisk.id, offset, length):
            await self._activate(offset, length)
        try:
            sub = self._split_now(Op.TRIM, offset, length, flags, None)
            if sub is _NO_ROOM:
                sub = await self._split_in(Op.TRIM, offset, length, flags, None)
            await self._through(sub, next.trim(offset, length, flags), offset, length)
        finally:
            if al is not None:
                al.leave(self.vdisk.id, offset, length)

    async def flush(self, next, flags):
        sub = self._split_now(Op.BARRIER, 0, 0, 0, None)
        if sub is _NO_ROOM:
            sub = await self._split_in(Op.BARRIER, 0, 0, 0, None)
        if self._dmap_dirty:
            # Dirty bits must be as durable as the data this flush covers.
            self._dmap_dirty = False
            await asyncio.get_running_loop().run_in_executor(None, self.dmap.sync)
        await self._through(sub, next.flush(flags))

    async def barrier(self) -> int:
        """A barrier in the CG's stream, acknowledged by the card; returns its
        seq. Every write acknowledged to a client before has a lower seq, so
        the first PIT at or after it covers them (``nicsplit bookmark``)."""
        sub = self._submit(Op.BARRIER, 0, 0, 0, None)
        w = await self._acked(sub) if sub is not None else None
        if w is None:
            raise BarrierFailed(f"vdisk {self.vdisk.name} is {self.state}"
                                + (f" ({self.dmap.reason})" if self.dmap.in_gap and self.dmap.reason else "")
                                + ": the card did not take the barrier")
        await self._outcome(w, _COMMITTED)
        return w.cg_seq

    def statistics(self):
        gap = self.seq is not None and self.dmap.in_gap
        st = {
            "state": self.state,
            "transport": self.transport,
            "since": self.dmap.since,
            "cg": self.cg,
            "split": self.split_count,
            "marked": self.marked_count,
            "late": self.late_count,
            "parked": self.parked_count,
            "dirty_bytes": self.dmap.dirty_bytes() if gap else 0,
            "reason": self.dmap.reason if gap else "",
            "resync_waits": self.regions.waits,  # client writes that waited for a region being copied
            "split_p50_us": self.hist.percentile(50) / 1000,
            "split_p99_us": self.hist.percentile(99) / 1000,
            "split_p999_us": self.hist.percentile(99.9) / 1000,
            "split_max_us": self.hist.max_ns / 1000,
            "split_hist": self.hist.sparse(),
        }
        if self.resync is not None:
            if self.dmap.copying:
                st["resync"] = self.resync.status()
            st["resync_shipped_bytes"] = self.resync.shipped_total  # every resync of this host run
        return st
