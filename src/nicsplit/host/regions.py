"""The region lock between client writes and a resync of one vdisk.

A resync copies a dirty region by reading it from the layer below the
splitter and shipping the copy as a write with a fresh CG seq. For the
journal to stay a prefix of the CG's order, the copy must hold exactly the
writes sequenced before it:

- every client write that took its seq before the copy's must be in the
  datastore when the region is read: the read waits for the writes *in
  flight* to the region (entered the splitter, not yet written below);
- every client write to the region that arrives after the resync locked it
  waits until the copy has its seq and sits in the ring, so it is ordered
  after the copy (and lands after it).

`enter`/`leave` are synchronous and cheap (a dict per region touched), the
splitter calls them around every write-like IO; only a write that touches a
locked region awaits (`wait`). Regions are the dirty map's (64 KiB).

Example::

    await rl.lock(off, n)        # resync: no new writes, in-flight ones drained
    data = await below.pread(off, n, 0); seq = ...; submit; rl.unlock(off, n)
"""

from __future__ import annotations

import asyncio

from nicsplit.core.dirtymap import REGION


class RegionLock:
    def __init__(self, region: int = REGION) -> None:
        self.region = region
        self._inflight: dict[int, int] = {}  # region -> client writes in flight
        self._locked: dict[int, asyncio.Future] = {}  # region -> done when unlocked
        self._drained: dict[int, asyncio.Future] = {}  # region -> done when no write is in flight
        self.waits = 0  # client writes that waited for a resync

    def _span(self, offset: int, length: int) -> range:
        return range(offset // self.region, (offset + max(length, 1) - 1) // self.region + 1)

    @property
    def locked(self) -> bool:
        return bool(self._locked)

    def blocked(self, offset: int, length: int) -> bool:
        """True when the range touches a region a resync holds."""
        lk = self._locked
        return bool(lk) and any(r in lk for r in self._span(offset, length))

    async def wait(self, offset: int, length: int) -> None:
        """Until no region of the range is locked (a client write, before it
        takes its seq)."""
        self.waits += 1
        while True:
            fut = next((self._locked[r] for r in self._span(offset, length) if r in self._locked), None)
            if fut is None:
                return
            await asyncio.shield(fut)

    def enter(self, offset: int, length: int) -> None:
        """A client write to the range is in flight (it took its seq)."""
        inf = self._inflight
        for r in self._span(offset, length):
            inf[r] = inf.get(r, 0) + 1

    def leave(self, offset: int, length: int) -> None:
        """The write is in the layer below (or failed)."""
        inf = self._inflight
        for r in self._span(offset, length):
            n = inf[r] - 1
            if n:
                inf[r] = n
            else:
                del inf[r]
                fut = self._drained.pop(r, None)
                if fut is not None and not fut.done():
                    fut.set_result(None)

    def busy_ranges(self) -> list[tuple[int, int]]:
        """(offset, length) of every region with a write in flight now."""
        return [(r * self.region, self.region) for r in self._inflight]

    def inflight(self, offset: int, length: int) -> int:
        return sum(self._inflight.get(r, 0) for r in self._span(offset, length))

    async def lock(self, offset: int, length: int) -> None:
        """Resync: stop new client writes to the range, then wait until the
        ones in flight are below."""
        loop = asyncio.get_running_loop()
        span = self._span(offset, length)
        for r in span:
            if r in self._locked:
                raise RuntimeError(f"region {r} locked twice")
        for r in span:
            self._locked[r] = loop.create_future()
        try:
            for r in span:
                while r in self._inflight:
                    fut = self._drained.get(r)
                    if fut is None:
                        fut = self._drained[r] = loop.create_future()
                    await asyncio.shield(fut)
        except BaseException:
            self.unlock(offset, length)
            raise

    def unlock(self, offset: int, length: int) -> None:
        for r in self._span(offset, length):
            fut = self._locked.pop(r, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
