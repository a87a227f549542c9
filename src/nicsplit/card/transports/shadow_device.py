"""The shadow transport's emulated device: the queue pair through which the
datastore's physical writes (the *real* halves) pass through the card.

`DeviceMemory` maps the queue (layout: `nicsplit.wire.shadow`); `HostDevice`
is the producer the host's datastore plugin uses; `CardDevice` the consumer
the card's loop runs (`nicsplit.card.transports.shadow_endpoint`). The
protocol and its rules are in `nicsplit.card.transports.shadow`.

Volumes: the card opens the datastore's volume files itself, by index, from
the data directory it shares with the host (``DATA/datastore/vol-NNNN.dsk``,
`nicsplit.wire.shadow.volume_file`), on a volume's first write
(a volume the datastore adds as it grows is opened when it is first
written). It writes only what an entry names; the host keeps allocation,
the extent log and translation, and its fdatasync of the same file covers
the card's page-cache write (same inode).
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import os
from pathlib import Path
from time import monotonic_ns
from typing import Any, Callable

from nicsplit.wire import ring as R
from nicsplit.wire import shadow as S

__all__ = ["DeviceMemory", "HostDevice", "CardDevice", "DeviceGone"]

log = logging.getLogger("nicsplit.card.transports.shadow")

C = S.Counter
_FULL_WAIT_NS = 2_000_000  # a writer waits at most this long for room in a full queue, then writes directly


class DeviceGone(Exception):
    """The card serving the device queue is gone (or closed it): the caller
    writes directly and marks the region (production first, P4)."""


class DeviceMemory:
    """One mapping of the device queue: ``counters`` (u64 view of the
    header), ``sq``, ``cq``, ``data`` (memoryviews) and the geometry."""

    def __init__(self, fd: int, geometry: S.Geometry, own_fd: bool = True) -> None:
        self.fd = fd
        self.geometry = geometry
        self._own = own_fd
        self._mm = mmap.mmap(fd, geometry.total, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        mv = memoryview(self._mm)
        self._mv = mv
        self.counters = mv[:S.PAGE].cast("Q")
        self.sq = mv[geometry.sq_offset: geometry.sq_offset + geometry.entries * S.SQE.size]
        self.cq = mv[geometry.cq_offset: geometry.cq_offset + geometry.entries * S.CQE.size]
        self.data = mv[geometry.data_offset: geometry.data_offset + geometry.data_size]
        self.closed = False

    @classmethod
    def create(cls, geometry: S.Geometry = S.DEFAULT_GEOMETRY) -> "DeviceMemory":
        """The card's: a new memfd sized and stamped for ``geometry``."""
        fd = os.memfd_create("nicsplit-shadow-device", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, geometry.total)
            m = cls(fd, geometry)
        except BaseException:
            os.close(fd)
            raise
        c = m.counters
        c[C.VERSION], c[C.ENTRIES], c[C.DATA_SIZE] = S.VERSION, geometry.entries, geometry.data_size
        c[C.MAGIC] = S.MAGIC
        return m

    @classmethod
    def attach(cls, fd: int) -> "DeviceMemory":
        """The host's: map the card's memfd; ShadowFormatError if it is not a
        device queue of this version."""
        size = os.fstat(fd).st_size
        if size < S.PAGE:
            raise S.ShadowFormatError(f"device queue of {size} bytes")
        with mmap.mmap(fd, S.PAGE, mmap.MAP_SHARED, mmap.PROT_READ) as head:
            g = S.check_header(memoryview(head).cast("Q"))
        if size < g.total:
            raise S.ShadowFormatError(f"device queue of {size} bytes, its geometry needs {g.total}")
        return cls(fd, g)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for v in (self.counters, self.sq, self.cq, self.data, self._mv):
            v.release()
        try:
            self._mm.close()
        except BufferError:  # a view still alive (e.g. in a logged traceback): unmapped when it is dropped
            log.debug("shadow device: views still alive; unmapped when they are dropped")
        if self._own:
            os.close(self.fd)


class HostDevice:
    """Producer side (the host's datastore plugin, on the event loop thread).

    ``write(volume, physical, data, io_id)`` publishes one real half and
    returns its position, or None when the queue has no room now;
    ``await wait(pos)`` its status (0 or an errno; DeviceGone if the card
    went away). A short spin catches the usual case (the card polling); then
    the wait is a future completed by a reader on the completion eventfd, so
    the loop serves other requests meanwhile (no busy wait of the loop).
    """

    def __init__(self, mem: DeviceMemory, done_fd: int, *, wake_card: Callable[[], None],
                 healthy: Callable[[], bool], spin_ns: int = 20_000) -> None:
        self.mem = mem
        self._done_fd = done_fd
        self._wake_card = wake_card
        self._healthy = healthy
        self.spin_ns = spin_ns
        # The host's request count and the spin of a lone waiter (set by CardLink; nicsplit.host.load).
        self.load: Any = None
        self.alone_spin_ns = spin_ns
        g = mem.geometry
        self._n, self._mask, self._dsize = g.entries, g.entries - 1, g.data_size
        c = self._c = mem.counters
        self._sq_tail = c[C.SQ_TAIL]
        self._cq_head = c[C.CQ_HEAD]
        self._ends: list[int] = [0] * g.entries  # slot -> end of its payload (in-order freeing, rule 3)
        self._data_tail = self._data_head = 0
        self._resume()
        self._done: dict[int, int] = {}  # position -> status, completions taken for nobody yet
        self._waiters: dict[int, asyncio.Future] = {}
        self._reader: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.dead = False
        self.submitted = self.completed = self.errors = self.full = self.async_waits = self.wakeups = 0
        self.bytes = 0

    def _resume(self) -> None:
        """A host attaching to a card that served an earlier host: go on from
        the shared positions. Entries the earlier host queued and the card has
        not completed yet keep their payloads: the data tail follows the last
        entry, the head is the oldest outstanding entry's start."""
        mem, mask = self.mem, self._mask
        if self._sq_tail == 0:
            return
        last = S.unpack_entry(mem.sq, ((self._sq_tail - 1) & mask) << 6)
        self._data_tail = self._data_head = last.data_pos + last.length
        for pos in range(self._cq_head, self._sq_tail):
            e = S.unpack_entry(mem.sq, (pos & mask) << 6)
            if pos == self._cq_head:
                self._data_head = e.data_pos
            self._ends[pos & mask] = e.data_pos + e.length

    # -- submit -------------------------------------------------------------------
    def write(self, volume: int, physical: int, data, io_id: int, more: bool = False) -> int | None:
        if self.dead:
            raise DeviceGone("the card closed the device queue")
        n = len(data)
        tail = self._sq_tail
        if tail - self._cq_head >= self._n:  # rule 3: at most N outstanding
            self._drain()
            if tail - self._cq_head >= self._n:
                self.full += 1
                return None
        size = self._dsize
        pos = self._data_tail
        off = pos % size
        if off + n > size:
            pos += size - off
            off = 0
        end = pos + n
        if end - self._data_head > size:
            self._drain()
            if end - self._data_head > size:
                self.full += 1
                return None
        mem = self.mem
        mem.data[off: off + n] = data
        S.pack_entry(mem.sq, (tail & self._mask) << 6, volume, n, tail, io_id, physical, pos, S.F_MORE if more else 0)
        self._ends[tail & self._mask] = end
        self._data_tail = end
        self._sq_tail = tail + 1
        self._c[C.SQ_TAIL] = tail + 1  # publish (TSO: payload and entry are visible first)
        R.full_fence()
        self._wake_card()
        self.submitted += 1
        self.bytes += n
        return tail

    # -- completions ------------------------------------------------------------------
    def _drain(self) -> None:
        c, cq, mask = self._c, self.mem.cq, self._mask
        tail = c[C.CQ_TAIL]
        head = self._cq_head
        if tail == head:
            return
        while head != tail:
            io_id, status, seq = S.unpack_completion(cq, (head & mask) << 4)
            if seq != head & 0xFFFFFFFF:
                log.error("shadow device: completion at %d has seq %d (io %d): treated as EIO", head, seq, io_id)
                status = 5
            self._data_head = self._ends[head & mask]
            if status:
                self.errors += 1
            self.completed += 1
            fut = self._waiters.pop(head, None)
            if fut is not None:
                if not fut.done():
                    fut.set_result(status)
            else:
                self._done[head] = status
            head += 1
        self._cq_head = head
        c[C.CQ_HEAD] = head

    def take(self, pos: int) -> int | None:
        """Status of the entry at ``pos`` if its completion arrived."""
        self._drain()
        return self._done.pop(pos, None)

    async def wait(self, pos: int) -> int:
        st = self.take(pos)
        if st is not None:
            return st
        load = self.load
        until = monotonic_ns() + (self.alone_spin_ns if load is not None and load.alone() else self.spin_ns)
        while monotonic_ns() < until:
            st = self.take(pos)
            if st is not None:
                return st
        if self.dead or not self._healthy():
            self._gone()
            raise DeviceGone("the card stopped responding")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._waiters[pos] = fut
        self.async_waits += 1
        if self._reader is None:
            loop.add_reader(self._done_fd, self._on_done)
            self._reader = loop
        self._c[C.HOST_WAITING] = 1
        R.full_fence()  # the flag is visible before we re-read the CQ tail (Dekker, rule 5)
        self._drain()
        if self._timer is None:
            self._timer = loop.call_later(0.05, self._check)
        st = await fut
        if st < 0:
            raise DeviceGone("the card stopped responding")
        return st

    def _on_done(self) -> None:
        try:
            os.eventfd_read(self._done_fd)
            self.wakeups += 1
        except (BlockingIOError, OSError):
            pass
        self._drain()
        if not self._waiters:
            self._c[C.HOST_WAITING] = 0

    def _check(self) -> None:
        """While writers wait: give up on them if the card died (they write directly)."""
        self._timer = None
        if not self._waiters:
            return
        self._drain()
        if self.dead or not self._healthy():
            self._gone()
            return
        self._timer = asyncio.get_running_loop().call_later(0.05, self._check)

    def _gone(self, why: str = "gone") -> None:
        if not self.dead and why:
            log.warning("shadow device: the card is %s; %d waiting writes go to the datastore directly",
                        why, len(self._waiters))
        self.dead = True
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_result(-1)
        self._waiters.clear()

    def close(self) -> None:
        self._gone("" if not self._waiters else "closed")
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._reader is not None:
            try:
                self._reader.remove_reader(self._done_fd)
            except (RuntimeError, ValueError):  # its loop is closed already
                pass
            self._reader = None
        os.close(self._done_fd)
        self.mem.close()

    def statistics(self) -> dict:
        return {"submitted": self.submitted, "completed": self.completed, "errors": self.errors,
                "full": self.full, "async_waits": self.async_waits, "wakeups": self.wakeups,
                "bytes": self.bytes, "outstanding": self._sq_tail - self._cq_head}


class CardDevice:
    """Consumer side (the card's loop thread): ``poll`` writes what the host
    queued to the volume files and completes it, in order; returns
    [(io_id, status)]. Entries are checked (`nicsplit.wire.shadow.check_entry`);
    a bad one is completed EIO and logged, never written. A write in several
    pieces (across extents, flag MORE) is reported once, at its last piece,
    with the first error of any of its pieces."""

    def __init__(self, mem: DeviceMemory, done_fd: int, volume_dir: str | os.PathLike | None) -> None:
        self.mem = mem
        self.done_fd = done_fd
        self.volume_dir = Path(volume_dir) if volume_dir else None
        g = mem.geometry
        self._mask, self._dsize, self._g = g.entries - 1, g.data_size, g
        self._head = 0
        self._fds: dict[int, int] = {}
        self._partial: dict[int, int] = {}  # io_id -> status so far, of a write whose last piece is to come
        self.written = self.bad = self.failed = self.bytes = self.wakes = 0

    def pending(self) -> bool:
        return self.mem.counters[C.SQ_TAIL] != self._head

    @property
    def head(self) -> int:
        """The next SQ position to consume (entries consumed so far)."""
        return self._head

    def _fd(self, volume: int) -> int:
        fd = self._fds.get(volume)
        if fd is None:
            if self.volume_dir is None:
                raise OSError(5, "the card was started without the datastore directory")
            fd = os.open(self.volume_dir / S.volume_file(volume), os.O_WRONLY | os.O_CLOEXEC)
            self._fds[volume] = fd
        return fd

    def poll(self, max_entries: int = 256) -> list[tuple[int, int]]:
        c = self.mem.counters
        tail = c[C.SQ_TAIL]
        head = self._head
        if tail == head:
            return []
        sq, cq, data, mask, size = self.mem.sq, self.mem.cq, self.mem.data, self._mask, self._dsize
        out = []
        n = min(tail - head, max_entries)
        for _ in range(n):
            e = S.unpack_entry(sq, (head & mask) << 6)
            why = S.check_entry(e, head, self._g, 1 << 63)
            status = 0
            if why:
                self.bad += 1
                status = 5  # EIO
                log.error("shadow device: bad entry at %d (io %d): %s", head, e.io_id, why)
            else:
                off = e.data_pos % size
                try:
                    fd = self._fd(e.volume)
                    mv = data[off: off + e.length]
                    done = 0
                    while done < e.length:
                        done += os.pwrite(fd, mv[done:], e.physical + done)
                    self.written += 1
                    self.bytes += e.length
                except OSError as err:
                    self.failed += 1
                    status = err.errno or 5
                    log.error("shadow device: io %d: write of %d bytes to volume %d at %d failed: %s",
                              e.io_id, e.length, e.volume, e.physical, err)
            S.pack_completion(cq, (head & mask) << 4, e.io_id, status, head)
            if self._partial:
                status = self._partial.pop(e.io_id, 0) or status
            if e.flags & S.F_MORE and not why:
                self._partial[e.io_id] = status
                if len(self._partial) > 4096:  # a host that died mid-write: forget the oldest
                    self._partial.pop(next(iter(self._partial)))
            else:
                out.append((e.io_id, status))
            head += 1
        self._head = head
        c[C.SQ_HEAD] = head
        c[C.CQ_TAIL] = head  # rule 3: the CQ position equals the SQ position it completes
        R.full_fence()  # the completions are visible before we read the host's flag (Dekker)
        if c[C.HOST_WAITING]:
            try:
                os.eventfd_write(self.done_fd, 1)
                self.wakes += 1
            except OSError as err:  # EAGAIN only near 2**64: the host is awake anyway
                log.debug("shadow device: completion doorbell: %s", err)
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        os.close(self.done_fd)
        self.mem.close()
