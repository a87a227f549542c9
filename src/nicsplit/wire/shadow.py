"""Sans-IO layout of the shadow transport's emulated device queue (host
datastore -> card), the second queue pair of the ``shadow`` transport.

The shadow transport (`nicsplit.card.transports.shadow`) has two halves per
write: the *fake* half travels on the ring (`nicsplit.wire.ring`, unchanged)
and the *real* half — the datastore's physical write, already translated to
(volume, physical offset) — travels on this queue, the card sitting inline in
the physical path like a DPU that emulates the storage device. This module
owns every byte of that queue and nothing else: it packs and unpacks on a
``memoryview`` and never opens, maps or waits. The byte table is in
docs/formats.md ("shadow transport: the device queue").

Layout (one memfd the card creates and passes to the host over the control
socket with SCM_RIGHTS)::

    0        4096               4096+SQ              ...          total
    | header | SQ: N x 64 B      | CQ: N x 16 B (page-rounded) | data (D B) |

Rules
-----
1. Single producer, single consumer per queue; each counter has one writer
   and a 64-byte line of its own (the ring's rule 1)::

       host writes : sq_tail, cq_head, host_waiting
       card writes : sq_head, cq_tail

2. Counters are free-running u64 positions (the ring's rule 2); a slot is
   ``position & (N - 1)``; a data byte is ``position % D``.
3. The SQ and the CQ have the same N entries, and the host keeps at most N
   writes outstanding (submitted, completion not yet consumed), so the card
   never finds the CQ full. The card completes entries in SQ order, so the
   host frees data in order (the data area's head is the host's alone).
4. A payload is contiguous in the data area (a payload that would cross the
   end skips to the next lap, as on the ring).
5. Publication (x86-64 TSO, wire/ring.py MEMORY ORDERING): host writes the
   payload, the entry, then ``sq_tail``; card writes the completion, then
   ``cq_tail``. Doorbells: the host wakes a sleeping card through the ring's
   eventfd (the ring's STATE word says SLEEPING; one card loop serves both
   queues); the card wakes a waiting host through the completion eventfd only
   when ``host_waiting`` is set (the same Dekker handshake as the ring's:
   waiter publishes the flag, fences, re-reads the tail before it sleeps;
   the card publishes the tail, fences, reads the flag).
6. Every entry and completion carries the low 32 bits of its position
   (``seq``); a mismatch is a stale or torn entry: refused with EIO.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = [
    "VERSION", "MAGIC", "F_MORE", "PAGE", "SQE", "CQE", "OP_WRITE", "Counter", "Geometry", "ShadowFormatError", "Entry",
    "pack_entry", "unpack_entry", "check_entry", "pack_completion", "unpack_completion", "DEFAULT_ENTRIES",
    "DEFAULT_DATA_SIZE", "MAX_VOLUMES", "volume_file",
]

VERSION = 1
MAGIC = 0x5744484E53434E  # "NCSNHDW": nicsplit shadow device queue
PAGE = 4096
OP_WRITE = 1
F_MORE = 1  # entry flag: not the write's last piece (the card completes the write at its last piece)
MAX_VOLUMES = 1 << 20  # a volume index above this is a bad entry (a 64 GiB volume each: 64 PiB)
DEFAULT_ENTRIES = 256  # a QD of 256 across every shadow vdisk of the host (fio QD32 x 8 disks)
DEFAULT_DATA_SIZE = 16 << 20  # 256 entries x 64 KiB: the usual largest write at full depth

# Submission entry, 64 bytes.
SQE = struct.Struct(
    "<"
    "B"  # opcode: 1 = write (the only one: zero, trim and flush stay on the host)
    "B"  # flags: bit 0 MORE = another piece of the same write follows (a write across extents)
    "H"  # reserved, 0
    "I"  # volume: the datastore volume index (file vol-NNNN.dsk of the datastore)
    "I"  # length: payload bytes (1 .. data size)
    "I"  # seq: low 32 bits of the entry's SQ position (rule 6)
    "Q"  # io_id: the write's IO id, the same as its fake half's on the ring
    "Q"  # physical: byte offset in the volume file
    "Q"  # data_pos: logical (free-running) start of the payload in the data area
    "24x"  # reserved
)
assert SQE.size == 64

# Completion entry, 16 bytes.
CQE = struct.Struct(
    "<"
    "Q"  # io_id of the completed entry
    "i"  # status: 0 = written; else a positive errno (EIO: bad entry, or the card's pwrite failed)
    "I"  # seq: low 32 bits of the completion's CQ position (rule 6)
)
assert CQE.size == 16


class Counter:
    """u64 counter indexes in the header (``memoryview.cast("Q")``), one per
    64-byte line; the header's first line is the identity."""

    MAGIC = 0  # MAGIC (card, at creation)
    VERSION = 1  # VERSION
    ENTRIES = 2  # N
    DATA_SIZE = 3  # D
    SQ_TAIL = 8  # host
    SQ_HEAD = 16  # card
    CQ_TAIL = 24  # card
    CQ_HEAD = 32  # host
    HOST_WAITING = 40  # host: 1 while a writer waits on the completion eventfd


@dataclass(frozen=True, slots=True)
class Geometry:
    entries: int
    data_size: int

    def __post_init__(self) -> None:
        if self.entries < 2 or self.entries & (self.entries - 1) or self.entries > 1 << 16:
            raise ShadowFormatError(f"device queue entries must be a power of two in [2, 65536], not {self.entries}")
        if self.data_size < PAGE or self.data_size % PAGE:
            raise ShadowFormatError(f"device queue data size must be a multiple of {PAGE}, not {self.data_size}")

    @property
    def sq_offset(self) -> int:
        return PAGE

    @property
    def cq_offset(self) -> int:
        return PAGE + _pages(self.entries * SQE.size)

    @property
    def data_offset(self) -> int:
        return self.cq_offset + _pages(self.entries * CQE.size)

    @property
    def total(self) -> int:
        return self.data_offset + self.data_size


def _pages(n: int) -> int:
    return (n + PAGE - 1) // PAGE * PAGE


class ShadowFormatError(ValueError):
    """A device queue entry or header that does not fit the format."""


@dataclass(frozen=True, slots=True)
class Entry:
    opcode: int
    flags: int
    volume: int
    length: int
    seq: int
    io_id: int
    physical: int
    data_pos: int


def pack_entry(buf: memoryview, off: int, volume: int, length: int, seq: int, io_id: int, physical: int,
               data_pos: int, flags: int = 0) -> None:
    """Write one write entry at ``off`` (struct.error for a field out of range)."""
    SQE.pack_into(buf, off, OP_WRITE, flags, 0, volume, length, seq & 0xFFFFFFFF, io_id, physical, data_pos)


def unpack_entry(buf: memoryview, off: int) -> Entry:
    op, flags, _r, volume, length, seq, io_id, physical, data_pos = SQE.unpack_from(buf, off)
    return Entry(op, flags, volume, length, seq, io_id, physical, data_pos)


def check_entry(e: Entry, position: int, geometry: Geometry, data_tail_limit: int) -> str:
    """Why entry ``e`` read at SQ ``position`` is bad ("" if it is good):
    opcode, seq, volume index, length, and the payload inside the data area
    without crossing its end and not past ``data_tail_limit`` (the end of
    what the host may have written: ``data_pos`` of a later entry cannot be
    checked here, so the card passes its own expectation)."""
    if e.opcode != OP_WRITE:
        return f"opcode {e.opcode} (only {OP_WRITE}, write)"
    if e.flags & ~F_MORE:
        return f"unknown flags {e.flags:#x}"
    if e.seq != position & 0xFFFFFFFF:
        return f"seq {e.seq} at position {position} (stale or torn entry)"
    if e.volume >= MAX_VOLUMES:
        return f"volume {e.volume} >= {MAX_VOLUMES}"
    if not 0 < e.length <= geometry.data_size:
        return f"length {e.length} not in [1, {geometry.data_size}]"
    off = e.data_pos % geometry.data_size
    if off + e.length > geometry.data_size:
        return f"payload at {e.data_pos} (+{e.length}) crosses the end of the data area"
    if e.data_pos + e.length > data_tail_limit:
        return f"payload at {e.data_pos} (+{e.length}) past the data the host may have written"
    if e.physical < PAGE or e.physical + e.length > 1 << 62:
        return f"physical offset {e.physical} out of range (the volume header's first page is never written)"
    return ""


def pack_completion(buf: memoryview, off: int, io_id: int, status: int, seq: int) -> None:
    CQE.pack_into(buf, off, io_id, status, seq & 0xFFFFFFFF)


def unpack_completion(buf: memoryview, off: int) -> tuple[int, int, int]:
    """(io_id, status, seq)."""
    return CQE.unpack_from(buf, off)


def check_header(counters: memoryview) -> Geometry:
    """The geometry a mapped header announces; ShadowFormatError if it is not a
    device queue of this version."""
    if counters[Counter.MAGIC] != MAGIC:
        raise ShadowFormatError(f"not a shadow device queue (magic {counters[Counter.MAGIC]:#x})")
    if counters[Counter.VERSION] != VERSION:
        raise ShadowFormatError(f"device queue version {counters[Counter.VERSION]}, we speak {VERSION}")
    return Geometry(int(counters[Counter.ENTRIES]), int(counters[Counter.DATA_SIZE]))


DEFAULT_GEOMETRY = Geometry(DEFAULT_ENTRIES, DEFAULT_DATA_SIZE)


def volume_file(index: int) -> str:
    """The datastore's file name of volume ``index`` (an entry's ``volume``):
    the card opens it in the datastore directory. The same name as
    `nicsplit.host.datastore.volume.volume_name` (a unit test keeps them equal:
    the card does not import the host's layer)."""
    return f"vol-{index:04d}.dsk"
