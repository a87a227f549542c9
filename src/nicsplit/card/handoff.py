"""The handoff queue between the card's two processes: the **acker** (fast
path: polls the host's SQ, checks each descriptor, posts the ack) and the
**pipeline worker** (everything else: resolve, hold, dedup, compress, seal,
ship, overflow log).

Why a second queue rather than one process: an ack must never wait behind a
batch being compressed and sealed (~0.5 ms for 256 KiB), a TLS write or the
cyclic collector. The acker does a few µs of work per entry and nothing
else; the worker may be slow, stopped or killed without delaying an ack.

Theory of operation
===================
One anonymous shared mapping (``memfd``, handed to the worker as an inherited
fd: the host can never name it, P6), owned by the acker and kept across
worker restarts:

- a header page of u64 counters, one cache line each (`H`);
- ``n`` slots of 64 bytes: each is a verbatim copy of an SQ descriptor the
  acker checked and acked (`nicsplit.wire.ring.DESC`); the host cannot change
  the copy after the check;
- ``n`` u64 ``ends``: for a write whose payload sits in the ring's data area,
  the logical end of that payload (``data_pos + length``), else 0;
- ``n`` flag bytes: `REFUSED` (acked FAILED; its payload is only to be
  freed), `RELEASED` (the worker is done with it).

Positions only grow; slot = position mod ``n``.  The acker fills slots at
``PRODUCED``; the worker reads them at ``CONSUMED`` and finishes them in any
order (``RELEASED``); ``FLOOR`` is the first unfinished position. Moving the
floor moves the ring's ``DATA_HEAD`` to the end of the last finished payload,
which is how the host learns a write is safe. The acker stops taking SQ
entries while ``PRODUCED - FLOOR == n`` (the acks wait; nothing is dropped).

Entries without payload in the data area (outcomes, ZERO, TRIM, BARRIER,
refused writes) are finished when consumed.

Worker death (`Handoff.reclaim`): every write the dead worker consumed and
did not finish is reported lost (the acker appends it to the card's lost log
before freeing its payload, so the host marks and resyncs its region: acked,
never silently lost) and the floor jumps to ``CONSUMED``; entries not yet
consumed wait for the next worker.

Counters a worker keeps (``BAD_CSUM``) live here, not in its memory, so
they are the card's totals across worker restarts.

Wake-ups: the worker publishes ``WSTATE = SLEEPING`` before it blocks on the
handoff eventfd; the acker writes the eventfd after publishing entries only
while it sleeps (the same Dekker pattern as the ring, wire/ring.py).
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from typing import Callable, Iterator

from nicsplit.wire import ring as R

__all__ = ["Handoff", "H", "REFUSED", "RELEASED", "REAL_HALF", "DEFAULT_SLOTS", "NAPPING", "POLLING", "SLEEPING"]

PAGE = 4096
DEFAULT_SLOTS = 1 << 18  # 16 MiB of slots: twice the entries the default 256 MiB data area holds at 4 KiB
REFUSED, RELEASED = 1, 2
# The dflags byte of a handed-off OUTCOME made by the acker, not the host:
# the real half of a shadow write, completed on the device queue.
REAL_HALF = 0x80
# NAPPING: the worker sleeps on a short timer: the acker rings it only for a
# BARRIER (whose PIT should not wait out the nap), and entries it leaves
# unread meanwhile are not "behind".
POLLING, SLEEPING, NAPPING = 0, 1, 2


class H:
    """u64 indexes of the header counters (one 64-byte line each)."""

    MAGIC = 0  # b"NSHANDOF" as u64
    SLOTS = 8  # n (power of two)
    PRODUCED = 16  # next position the acker fills             acker writes
    CONSUMED = 24  # next position the worker reads            worker writes
    FLOOR = 32  # first position not finished                  worker writes (acker while no worker runs)
    WSTATE = 40  # POLLING / SLEEPING / NAPPING                worker writes
    FULL = 48  # 1: the worker asks the acker to refuse writes worker writes
    WHEARTBEAT = 56  # monotonic_ns of the worker's last round  worker writes
    RESTARTS = 64  # worker starts after the first              acker writes
    LOST = 72  # writes reported lost on worker deaths         acker writes
    ACKED = 80  # write-like entries acked OK                   acker writes
    REFUSED = 88  # write-like entries refused                  acker writes
    ACK_SLEEPS = 96  # acker doorbell sleeps                    acker writes
    HANDOFF_FULL = 104  # times the acker found the handoff full   acker writes
    DATA_EXPECT = 112  # logical end of the last payload handed off   acker writes
    REFUSED_FULL = 120  # writes refused FULL (ring statistics)        acker writes, each ms
    CQ_FULL = 128  # polls stopped early by a full CQ                  acker writes, each ms
    HOST_PID = 136  # the attached host (0: none)                      acker writes, each ms
    BAD = 144  # descriptors refused as malformed                      acker writes, each ms
    BUSY_NS = 152  # acker loop time in rounds that acked something      acker writes, each ms
    EMPTY_NS = 160  # acker loop time in empty polls (spinning)          acker writes, each ms
    SLEEP_NS = 168  # acker CPU in doorbell sleeps (syscalls, wake-up)   acker writes, each ms
    RINGS = 176  # doorbell rings of a sleeping worker                  acker writes, each ms
    NAP_UNTIL = 184  # monotonic_ns a NAPPING worker is back by           worker writes
    BAD_CSUM = 192  # payloads found not matching their checksum (all workers) worker writes
    GUARD_ERRORS = 200  # nvme-pi: Writes completed 282h (End-to-end Guard Check)  acker writes
    PI_ERRORS = 208  # nvme-pi: Writes completed with another PI error              acker writes
    DEV_ERRORS = 216  # shadow: device entries completed with an error              acker writes, each ms
    DEV_BYTES = 224  # shadow: bytes the device wrote to volume files             acker writes, each ms
    ACK_NAPS = 232  # acker naps: timed yields to a worker behind while writes come   acker writes


_MAGIC = int.from_bytes(b"NSHANDOF", "little")
# advance_floor: flag byte -> 1 where RELEASED is clear (the first unfinished
# position), 0 where set; scanned _SCAN bytes at a time (4 KiB: a copy that
# costs less than one Python step, and the common run is a batch of ~60).
_UNRELEASED = bytes(0 if f & RELEASED else 1 for f in range(256))
_SCAN = 4096


@dataclass(frozen=True)
class Geometry:
    slots: int

    @property
    def slots_off(self) -> int:
        return PAGE

    @property
    def ends_off(self) -> int:
        return PAGE + 64 * self.slots

    @property
    def flags_off(self) -> int:
        return self.ends_off + 8 * self.slots

    @property
    def size(self) -> int:
        return -(-(self.flags_off + self.slots) // PAGE) * PAGE


class Handoff:
    """One mapping of the handoff queue (both processes build one)."""

    def __init__(self, fd: int, *, create_slots: int = 0) -> None:
        if create_slots:
            if create_slots < 2 or create_slots & (create_slots - 1):
                raise ValueError(f"handoff slots must be a power of two >= 2, not {create_slots}")
            g = Geometry(create_slots)
            os.ftruncate(fd, g.size)
        self.fd = fd
        size = os.fstat(fd).st_size
        self._mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        self.c = memoryview(self._mm)[:PAGE].cast("Q")
        if create_slots:
            self.c[H.SLOTS // 8] = create_slots
            self.c[H.MAGIC // 8] = _MAGIC
        elif self.c[H.MAGIC // 8] != _MAGIC:
            raise ValueError("not a handoff queue (bad magic)")
        n = self.c[H.SLOTS // 8]
        g = Geometry(n)
        if g.size > size:
            raise ValueError(f"handoff queue of {n} slots needs {g.size} bytes, the mapping has {size}")
        self.n, self.mask = n, n - 1
        mv = memoryview(self._mm)
        self.slots = mv[g.slots_off: g.ends_off]
        self.ends = mv[g.ends_off: g.flags_off].cast("Q")
        self.flags = mv[g.flags_off: g.flags_off + n]

    @classmethod
    def create(cls, slots: int = DEFAULT_SLOTS) -> "Handoff":
        fd = os.memfd_create("nicsplit-handoff", os.MFD_CLOEXEC)
        return cls(fd, create_slots=slots)

    # -- counters -----------------------------------------------------------------

    def get(self, h: int) -> int:
        return self.c[h // 8]

    def set(self, h: int, v: int) -> None:
        self.c[h // 8] = v

    # -- finishing ------------------------------------------------------------------

    def advance_floor(self, consumed: int, data_head: Callable[[int], None]) -> int:
        """Move the floor over finished positions below ``consumed``; tell
        ``data_head`` the end of the last finished payload, if any moved.

        The finished run is found a chunk of flag bytes at a time in C
        (``bytes.translate`` + ``find``), not by a Python step per position:
        a durable batch finishes ~60 positions at once."""
        c, flags, ends, mask, n = self.c, self.flags, self.ends, self.mask, self.n
        start = floor = c[H.FLOOR // 8]
        while floor < consumed:
            s = floor & mask
            k = min(consumed - floor, n - s, _SCAN)  # one run of slots, not across the wrap
            i = flags[s: s + k].tobytes().translate(_UNRELEASED).find(1)
            if i < 0:
                floor += k
                continue
            floor += i
            break
        if floor == start:
            return floor
        c[H.FLOOR // 8] = floor
        pos = floor - 1  # the end of the last finished payload: the newest position below the floor with one
        while pos >= start:
            e = ends[pos & mask]
            if e:
                data_head(e)
                break
            pos -= 1
        return floor

    def unfinished(self) -> Iterator[tuple[int, tuple]]:
        """(position, unpacked descriptor) of every consumed, unfinished
        entry with a payload or an effect: what a dead worker leaves."""
        c, flags, ends, mask = self.c, self.flags, self.ends, self.mask
        unpack = R.DESC.unpack_from
        for pos in range(c[H.FLOOR // 8], c[H.CONSUMED // 8]):
            s = pos & mask
            if flags[s] & RELEASED and ends[s]:
                continue
            d = unpack(self.slots, s << 6)
            if d[0] == int(R.Kind.OUTCOME) or d[0] == int(R.Kind.BARRIER) or flags[s] & REFUSED:
                continue
            yield pos, d

    def reclaim(self, lost: Callable[[tuple], None], data_head: Callable[[int], None], *,
                unread: bool = False) -> int:
        """After a worker died: report what it consumed and did not finish
        (``lost(descriptor)``, before its payload is freed), finish it, and
        move the floor to ``CONSUMED``. ``unread``: the card is stopping and
        no worker comes after this one, so what was handed off and never
        read is reported too (it was acked to the host: forgetting it lost
        acknowledged writes without a trace). Returns how many were reported."""
        c, mask = self.c, self.mask
        if unread:
            c[H.CONSUMED // 8] = c[H.PRODUCED // 8]  # nobody reads them now: finish them here
        n = 0
        for pos, d in list(self.unfinished()):
            lost(d)
            n += 1
        for pos in range(c[H.FLOOR // 8], c[H.CONSUMED // 8]):
            self.flags[pos & mask] |= RELEASED
        self.advance_floor(c[H.CONSUMED // 8], data_head)
        c[H.LOST // 8] += n
        return n

    def statistics(self) -> dict:
        g = self.get
        return {
            "slots": self.n, "produced": g(H.PRODUCED), "consumed": g(H.CONSUMED), "floor": g(H.FLOOR),
            "queued": g(H.PRODUCED) - g(H.CONSUMED), "unfinished": g(H.CONSUMED) - g(H.FLOOR),
            "worker_restarts": g(H.RESTARTS), "lost_on_worker_death": g(H.LOST), "acked": g(H.ACKED),
            "refused": g(H.REFUSED), "acker_sleeps": g(H.ACK_SLEEPS), "acker_naps": g(H.ACK_NAPS), "handoff_full": g(H.HANDOFF_FULL),
            "acker_busy_s": g(H.BUSY_NS) / 1e9, "acker_empty_poll_s": g(H.EMPTY_NS) / 1e9,
            "acker_sleep_cpu_s": g(H.SLEEP_NS) / 1e9, "worker_rings": g(H.RINGS), "bad_checksum": g(H.BAD_CSUM),
        }

    def close(self) -> None:
        for v in (self.c, self.ends, self.flags, self.slots):
            v.release()
        self._mm.close()
