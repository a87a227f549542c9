"""What the splitter hands the card, independent of the transport.

An `AugmentedWrite` is one write-like IO with its *virtual* identity (vdisk,
virtual offset) and its place in its consistency group's order (``cg_seq``),
built by the splitter filter before the datastore translates the address.
An `Outcome` follows later, once the datastore has committed (or failed) the
IO: the card ships only committed writes (promise P3).

Every transport (ring, nvme-pi, shadow, net) carries exactly these fields;
the card pipeline never sees transport details.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

# The block: 4 KiB is the page size (mmap, O_DIRECT and fallocate work in
# pages), the smallest write NBD clients and filesystems issue, and the unit
# the whole system shares: the datastore allocates in it, the card dedups in
# it, the journal's references point at it, and sealed images seal it.
BLOCK_SIZE = 4096


class Op(enum.IntEnum):
    WRITE = 1  # data follows
    ZERO = 2  # range reads as zeros afterwards
    TRIM = 3  # range discarded (replicas zero it)
    BARRIER = 4  # flush: everything before it in the CG is ordered before everything after


class WFlag(enum.IntFlag):
    NONE = 0
    FUA = 1  # the client asked for FUA: also a barrier in the stream
    # A vdisk of this write's CG is marking or resyncing (the protection gap):
    # the journal lacks some acknowledged writes, so no consistent PIT ends at
    # a record carrying it. The last consistent PIT before the gap stays one.
    GAP = 2


# Record.flags bit set by the card's merge stage (merge_window_ms > 0) on every
# record of a window except the last: no consistent point in time ends at such
# a record. With merge off it is never set, so every record is a point in time.
# The WFlag bits stay below it.
RFLAG_IN_WINDOW = 0x80


class Status(enum.IntEnum):
    COMMITTED = 0
    FAILED = 1


@dataclass(slots=True)
class AugmentedWrite:
    io_id: int  # host-unique id; the NBD handle's request id travels with it in logs
    cg_id: int  # consistency group id (0 = the vdisk has no CG of its own)
    cg_seq: int  # position in the CG's write order, from 1, gap-free per CG
    vdisk_id: int  # datastore vdisk id (stable, never reused)
    op: Op
    flags: WFlag
    voffset: int  # virtual byte offset within the vdisk
    length: int  # bytes
    timestamp_ns: int  # time.time_ns() when the write entered the splitter
    data: bytes | memoryview | None = None  # payload for Op.WRITE


@dataclass(frozen=True, slots=True)
class Outcome:
    io_id: int
    status: Status
