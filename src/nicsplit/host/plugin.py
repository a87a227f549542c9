"""The bottom of every chain: the datastore adapter (nbdkit's "plugin").

Reads and writes go to the page cache synchronously (≈5 µs; cheaper than a
thread hop). A write of a vdisk on the shadow transport goes through the
card's emulated device instead (`nicsplit.host.shadowio`); the others pay
one truth test of an empty dict for it. Durability (flush, FUA) runs fsync in a worker thread with
*group commit*: one sync covers every IO completed before it started, so
concurrent flushes share one fsync instead of queueing one each (an fsync is
≈300 µs here, 60× a write).
"""

from __future__ import annotations

import asyncio
import errno
from typing import Any, Callable

from nicsplit.host.io import FUA, NO_HOLE, REQ_ONE, IOFailure
from nicsplit.host.shadowio import INFLIGHT, write_through


class GroupSync:
    """Coalesces sync requests: a caller joins the *next* sync to start,
    since only a sync that starts after its call covers its writes."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self._sync = sync
        self._running: asyncio.Task | None = None
        self._next: asyncio.Future | None = None
        self.syncs = 0
        self.requests = 0

    async def sync(self) -> None:
        self.requests += 1
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        fut = self._next
        if self._running is None:
            self._running = asyncio.get_running_loop().create_task(self._run())
        await asyncio.shield(fut)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._next is not None:
                waiters, self._next = self._next, None
                self.syncs += 1
                try:
                    await loop.run_in_executor(None, self._sync)
                except OSError as e:
                    # Each waiter's flush fails with the cause; later flushes
                    # get a sync of their own.
                    waiters.set_exception(e)
                else:
                    waiters.set_result(None)
        finally:
            self._running = None


def _oserror(e: OSError, what: str) -> IOFailure:
    return IOFailure(e.errno or errno.EIO, f"datastore {what}: {e.strerror or e}")


def _on_store(what: str, call: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """``call(*args, **kw)`` on the store; an OSError becomes the IOFailure
    that names ``what`` (a plain function, not a coroutine: the IO path
    gains no await)."""
    try:
        return call(*args, **kw)
    except OSError as e:
        raise _oserror(e, what) from e


class DatastorePlugin:
    """Chain bottom for one vdisk over a `VdiskStore`."""

    def __init__(self, store: Any, group_sync: GroupSync) -> None:
        self.store = store
        self._gs = group_sync

    async def pread(self, offset: int, length: int, flags: int) -> bytes:
        return _on_store("read", self.store.pread, offset, length)

    async def pwrite(self, offset: int, data: bytes, flags: int) -> None:
        if INFLIGHT:  # a shadow write's real half: through the card (nicsplit.host.shadowio)
            io = INFLIGHT.get(id(data))
            if io is not None and io.offset == offset:
                try:
                    await write_through(self.store, offset, data, io)
                except OSError as e:
                    raise _oserror(e, "write") from e
                if flags & FUA:
                    await self._gs.sync()
                return
        _on_store("write", self.store.pwrite, offset, data)
        if flags & FUA:
            await self._gs.sync()

    async def zero(self, offset: int, length: int, flags: int) -> None:
        # Zeroing is metadata-only here (unmap or fallocate ZERO_RANGE), so
        # FAST_ZERO is always honoured.
        _on_store("zero", self.store.zero, offset, length, no_hole=bool(flags & NO_HOLE))
        if flags & FUA:
            await self._gs.sync()

    async def trim(self, offset: int, length: int, flags: int) -> None:
        _on_store("trim", self.store.trim, offset, length)
        if flags & FUA:
            await self._gs.sync()

    async def flush(self, flags: int) -> None:
        try:
            await self._gs.sync()
        except OSError as e:
            raise _oserror(e, "flush") from e

    async def extents(self, offset: int, length: int, flags: int) -> list[tuple[int, int]]:
        ext = self.store.extents(offset, length)
        return ext[:1] if flags & REQ_ONE else ext
