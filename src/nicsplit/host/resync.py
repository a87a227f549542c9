"""The automatic resync: a vdisk in ``marking`` returns to ``protected`` by itself.

Theory of operation
===================
A vdisk enters *marking* when a write cannot reach the card (the card is
dead, or refused it): the write's 64 KiB regions go into the persistent
dirty bitmap (`nicsplit.host.marking`). The journal then lacks acknowledged
writes, so its CG is *in the gap*: every record the CG ships carries
``WFlag.GAP`` and no PIT ending there is offered as consistent.

`Resyncer.poll` runs on the host's housekeeping tick. When a marking vdisk's
card (its transport: the card, or the appliance link with ``net``) is attached and healthy, the vdisk becomes *resyncing* (persisted):
new client writes are split to the card again (with GAP), and one task per
vdisk (`Resync`, at most ``parallel`` at a time) walks the dirty regions.
For each chunk (up to ``chunk`` bytes of consecutive dirty regions):

1. ``claim`` the regions in the marking map (a region marked again while
   claimed keeps its bit), take the rate limiter's tokens;
2. ``lock`` them in the splitter's `RegionLock`: new client writes to them
   wait, writes in flight to them finish below first;
3. read the chunk from the layer *below* the splitter (``Chain.below``),
   take a fresh CG seq and submit it to the card as an ordinary WRITE with
   ``WFlag.GAP``: seq and submission are one synchronous step, so ring order
   is CG order; unlock — the writes that waited take later seqs;
4. wait for the card's ack (bounded: ``max_inflight`` chunks at a time, and
   at most ``max_undurable`` bytes acked but not yet durable, and no new
   copy while the card's buffer is over half full: the resync never fills
   the card, which would refuse client writes),
   post the COMMITTED outcome, let `CardLink` keep the write like any acked
   one (if the card dies before it is durable, ``CardLink.lost`` marks the
   regions again), and clear the regions' bits. A late ack is fine: the
   write stays in flight, unconfirmed, and the card's verdict settles it.
   A refusal (card full) keeps the bits; the resync backs off and retries.

Progress is the bitmap itself: an interrupted resync (card killed again,
host restarted) resumes with only the regions left. When no bit is left,
no chunk is claimed and no resync write of the vdisk is unconfirmed, the
vdisk is *protected* again (persisted, logged with the reason); the CG's
gap ends when all its vdisks are protected, and a barrier without GAP is
shipped at once: the first consistent PIT after the gap.

Initial sync: a vdisk that joins a CG holding data starts *initializing*
(`MarkingMap.begin_initial`, called when the host builds its chain): every
allocated region is marked and this same resync copies them, with the CG in
its gap; it ends ``protected`` with the CG recorded. A card lost meanwhile
sends it to marking; the resync that follows is still the initial sync
(``initializing``) and resumes from the bitmap.

Rate: ``[host] resync_mib_s`` (default 64; 0 = unlimited) across all
vdisks, halved while production suffers: the card has late (unconfirmed)
client writes, or the mean time client writes waited for the card's ack over
the last housekeeping tick exceeds ``[host] resync_latency_us`` (default
2000).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any, Iterable

from nicsplit.core import failpoints as _fp
from nicsplit.core.records import AugmentedWrite, Op, Status, WFlag

_FP = _fp.ACTIVE  # armed failpoints (nicsplit.core.failpoints): empty unless a test arms some

log = logging.getLogger(__name__)

_GAP = WFlag.GAP


class Progress:
    """One vdisk's resync progress (what status shows)."""

    def __init__(self) -> None:
        self.total_bytes = 0
        self.done_bytes = 0
        self.started = time.monotonic()
        self.shipped_total = 0  # bytes every resync of this host run shipped
        self.passes = 0

    def begin(self, dirty: int) -> None:
        self.total_bytes, self.done_bytes, self.started = dirty, 0, time.monotonic()
        self.passes += 1

    def status(self) -> dict[str, Any]:
        el = max(time.monotonic() - self.started, 1e-6)
        rate = self.done_bytes / el / 2**20
        total = max(self.total_bytes, self.done_bytes)
        left = total - self.done_bytes
        return {
            "done_bytes": self.done_bytes,
            "total_bytes": total,
            "percent": round(100.0 * self.done_bytes / total, 1) if total else 100.0,
            "rate_mib_s": round(rate, 2),
            "eta_s": round(left / 2**20 / rate, 1) if rate > 0 else None,
        }


class RateLimit:
    """A token bucket in bytes per second (0 = unlimited), shared by every resync."""

    def __init__(self, mib_s: float, burst_s: float = 0.1) -> None:
        self.rate = float(mib_s) * 2**20
        self.burst = self.rate * burst_s
        self._tokens = self.burst
        self._t = time.monotonic()
        self.slow = False  # halve the rate (production is suffering)

    async def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        while True:
            now = time.monotonic()
            rate = self.rate / 2 if self.slow else self.rate
            self._tokens = min(self.burst, self._tokens + (now - self._t) * rate)
            self._t = now
            if self._tokens >= n or self._tokens >= self.burst:
                self._tokens -= n  # may go negative: a chunk larger than the burst
                return
            await asyncio.sleep((min(n, self.burst) - self._tokens) / rate)


class CardGone(Exception):
    pass


class Resync:
    """The resync of one vdisk: walks its dirty regions until none is left
    (then protected), or stops when the vdisk leaves ``resyncing``."""

    def __init__(self, split: Any, below: Any, rate: RateLimit, *, chunk: int = 1 << 20,
                 max_inflight: int = 4, ack_timeout_s: float = 1.0, max_undurable: int = 16 << 20) -> None:
        self.split = split
        self.dmap = split.dmap
        self.link = split.link
        self.below = below
        self.rate = rate
        region = self.dmap.bitmap.region
        self.chunk = max(region, chunk // region * region)
        self.max_inflight = max_inflight
        self.ack_timeout_ns = int(ack_timeout_s * 1e9)
        self._window: set[asyncio.Task] = set()
        # Copies the card acked but has not made durable (payload position,
        # bytes): at most max_undurable, so the resync never fills the card
        # (which would refuse client writes and send vdisks back to marking).
        self.max_undurable = max_undurable
        self._undurable: collections.deque[tuple[int, int]] = collections.deque()
        self._undurable_bytes = 0
        self._undurable_t: Any = None
        self._room = asyncio.Semaphore(max_inflight)
        self.refused = 0
        if split.resync is None:
            split.resync = Progress()
        self.progress: Progress = split.resync
        self.progress.begin(self.dmap.dirty_bytes())  # status has the total before the task runs

    def _chunks(self) -> list[tuple[int, int]]:
        out = []
        for off, n in self.dmap.regions():
            end = off + n
            while off < end:
                k = min(self.chunk, end - off)
                out.append((off, k))
                off += k
        return out

    async def run(self) -> None:
        d = self.dmap
        log.info("vdisk %s: %s starts: %.1f MiB dirty", d.name,
                 "initial sync" if d.state == "initializing" else "resync", d.dirty_bytes() / 2**20)
        try:
            while d.copying:
                chunks = self._chunks()
                for off, n in chunks:
                    if not d.copying:
                        break
                    await self._copy(off, n)
                await self._drain()
                if not d.copying:
                    break
                self.link.settle()
                if d.dirty_regions() == 0 and d.claimed == 0 and self.link.unconfirmed_for(d) == 0:
                    await asyncio.get_running_loop().run_in_executor(None, d.sync)
                    el = time.monotonic() - self.progress.started
                    what = "initial sync" if d.state == "initializing" else "resync"
                    d.enter_protected(f"{what} done: {self.progress.done_bytes / 2**20:.1f} MiB in {el:.1f} s"
                                      + (f" for consistency group {d.cg}" if what == "initial sync" else ""))
                    if not self.split.gap.vdisks:
                        await self._close_gap()
                    return
                if not chunks:
                    await asyncio.sleep(0.05)  # late verdicts still to come
        except CardGone as e:
            d.enter_marking(f"card lost during the resync: {e}")
        finally:
            for t in self._window:
                t.cancel()
            if self._window:
                await asyncio.gather(*self._window, return_exceptions=True)

    async def _close_gap(self) -> None:
        """The CG's gap just ended: a barrier without GAP makes the first
        consistent PIT after it at once, not at the next client write."""
        try:
            seq = await self.split.barrier()
            log.info("consistency group %s: consistent again from seq %d", self.split.cg, seq)
        except Exception as e:  # the card went away again: the next write marks
            log.warning("consistency group %s: no barrier after the resync: %s", self.split.cg, e)

    async def _drain(self) -> None:
        if self._window:
            await asyncio.gather(*list(self._window), return_exceptions=True)

    def _transport(self) -> Any:
        t = self.link.get()
        if t is None:
            raise CardGone(self.link.last_error or "not attached")
        if not t.healthy():
            self.link.lost("card stopped responding (during a resync)")
            raise CardGone("card stopped responding")
        return t

    async def _copy(self, off: int, n: int) -> None:
        """Steps 1–3 of one chunk; step 4 runs as a task in the window."""
        d, sp = self.dmap, self.split
        await self._room.acquire()
        try:
            await self.rate.take(n)
            t = self._transport()
            t = await self._card_room(t)
            d.claim(off, n)
            ok = False
            try:
                await sp.regions.lock(off, n)
                try:
                    data = await self.below.pread(off, n, 0)
                    t = self._transport()
                    w = AugmentedWrite(sp.ctx.next_io_id(), sp.cg_id, sp.seq.next(), sp.vdisk.id, Op.WRITE, _GAP,
                                       off, n, time.time_ns(), data)
                    ok = t.submit(w)  # the same step as the seq: ring order is CG order
                    if _FP:
                        _fp.hit("host.resync.after-submit")  # a copy in the ring, its dirty bits claimed
                    position = t.last_position
                finally:
                    sp.regions.unlock(off, n)
            finally:
                if not ok:
                    d.release(off, n, False)
            if not ok:
                sp.seq.unget(w.cg_seq)  # the same synchronous step: no seq was taken since
                if not t.healthy():
                    self.link.lost("card stopped responding (during a resync)")
                    raise CardGone("card stopped responding")
                self.refused += 1
                await asyncio.sleep(0.05)  # no room in the ring: retry on the next pass
                self._room.release()
                return
        except BaseException:
            self._room.release()
            raise
        task = asyncio.get_running_loop().create_task(self._settle(t, w, position))
        self._window.add(task)
        task.add_done_callback(self._window.discard)

    async def _card_room(self, t: Any) -> Any:
        """Wait (polling every 5 ms) until the card made enough of the
        earlier copies durable; the transport to use then."""
        while True:
            if t is not self._undurable_t:  # another card: its positions start afresh
                self._undurable_t = t
                self._undurable.clear()
                self._undurable_bytes = 0
            released = t.released_position()
            q = self._undurable
            while q and q[0][0] <= released:
                self._undurable_bytes -= q.popleft()[1]
            # The card's buffer over half full (client writes, the appliance
            # behind): leave the rest to production.
            size = getattr(t, "data_size", 0)
            busy = bool(size) and t.last_position - released > size // 2
            if self._undurable_bytes < self.max_undurable and not busy:
                return t
            await asyncio.sleep(0.005)
            t = self._transport()

    async def _settle(self, t: Any, w: AugmentedWrite, position: int) -> None:
        d, link = self.dmap, self.link
        copied = False
        try:
            v = link.wait_ack(t, w.io_id, time.monotonic_ns() + self.ack_timeout_ns)
            if isinstance(v, asyncio.Future):
                v = await v
            if v is None:  # late: still in flight, the card's verdict settles it
                link.late(w.io_id, position, d, w.voffset, w.length, t)
                copied = t.post_outcome(w.io_id, Status.COMMITTED)
            elif v:
                link.track(position, d, w.voffset, w.length, t)
                copied = t.post_outcome(w.io_id, Status.COMMITTED)
            else:
                self.refused += 1
                t.post_outcome(w.io_id, Status.FAILED)
            if copied:
                self._undurable.append((position, w.length))
                self._undurable_bytes += w.length
                self.progress.done_bytes += w.length
                self.progress.shipped_total += w.length
        finally:
            d.release(w.voffset, w.length, copied)
            self._room.release()


class Resyncer:
    """Starts and tracks the resyncs of a host's vdisks (`HostServer`'s
    housekeeping calls `poll`)."""

    def __init__(self, link: Any, *, mib_s: float = 64, parallel: int = 2, chunk: int = 1 << 20,
                 max_inflight: int = 4, latency_us: float = 2000) -> None:
        self.link = link
        self.rate = RateLimit(mib_s)
        self.latency_ns = latency_us * 1000
        self._acks: dict[str, tuple[int, int]] = {}  # vdisk -> (writes, ns waited) at the last tick
        self.parallel = parallel
        self.chunk = chunk
        self.max_inflight = max_inflight
        self.tasks: dict[str, asyncio.Task] = {}

    def poll(self, chains: Iterable[Any]) -> None:
        """Move marking vdisks whose card is back to resyncing and start (or
        resume) their resync; at most ``parallel`` run at a time."""
        for name in [n for n, t in self.tasks.items() if t.done()]:
            t = self.tasks.pop(name)
            if not t.cancelled() and t.exception() is not None:
                log.error("vdisk %s: resync failed: %s", name, t.exception())
        chains = list(chains)
        if self.tasks:
            links = {id(sp.link): sp.link for sp in (ch.filter("split") for ch in chains) if sp is not None}
            self.rate.slow = any(lk.unconfirmed > 0 for lk in links.values()) or self._suffering(chains)
        for ch in chains:
            if len(self.tasks) >= self.parallel:
                return
            sp = ch.filter("split")
            if sp is None or sp.seq is None or not sp.dmap.in_gap or ch.vdisk.name in self.tasks:
                continue
            t = sp.link.get()  # the vdisk's own transport (ring: the card; net: the appliance link)
            if t is None or not t.healthy():
                continue
            below = ch.below("split")
            if below is None:
                continue
            d = sp.dmap
            if d.state == "marking":
                d.enter_resyncing(f"card attached and healthy: copying {d.dirty_bytes() / 2**20:.1f} MiB of dirty regions")
            r = Resync(sp, below, self.rate, chunk=self.chunk, max_inflight=self.max_inflight)
            self.tasks[ch.vdisk.name] = asyncio.get_running_loop().create_task(r.run(), name=f"resync {ch.vdisk.name}")

    def _suffering(self, chains: list[Any]) -> bool:
        """True when client writes waited for the card's ack longer than
        ``latency_us`` on average since the last tick (any vdisk)."""
        slow = False
        for ch in chains:
            sp = ch.filter("split")
            if sp is None:
                continue
            h = sp.hist
            n0, s0 = self._acks.get(ch.vdisk.name, (h.total, h.sum_ns))
            self._acks[ch.vdisk.name] = (h.total, h.sum_ns)
            if h.total > n0 and (h.sum_ns - s0) / (h.total - n0) > self.latency_ns:
                slow = True
        return slow

    async def stop(self) -> None:
        for t in self.tasks.values():
            t.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        self.tasks.clear()
