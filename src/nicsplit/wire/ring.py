"""Sans-IO layout of the hidden volume's rings (splitter <-> card).

This module owns every byte of the shared-memory format and nothing else: it
packs and unpacks on a ``memoryview`` and never opens, maps or waits.
`nicsplit.card.hidden` maps the file; `nicsplit.card.transports.ring` runs the
producer (host) and consumer (card) loops around these codecs.  The
byte-by-byte table is in docs/formats.md ("Hidden volume and ring").

Theory of operation
===================
The volume is one file: a 4 KiB header page, the submission ring (SQ), the
completion ring (CQ) and the payload data area, each starting on a page::

    0        4096            4096+SQ            ...            total
    | header | SQ: N x 64 B  | CQ: M x 16 B (page-rounded) | data area (D B) |

Rules
-----
1. Single producer, single consumer per ring.  Every counter has exactly one
   writer and lives alone on its own 64-byte cache line (so the two cores never
   write the same line and the reader's line is only invalidated when the
   value really changes)::

       host writes : sq_tail, cq_head, data_tail
       card writes : sq_head, cq_tail, data_head, card state/heartbeat, card counters

2. Counters are free-running unsigned 64-bit positions, never wrapped; a slot
   is ``position & (entries - 1)`` (entry counts are powers of two), a data
   byte is ``position % data_size``.  Wrap-around of the u64 itself is out of
   reach: 2**64 SQ entries at 10 M entries/s is ~58,000 years; 2**64 data
   bytes at 10 GB/s is ~58 years.
3. ``tail - head`` is the occupancy; the producer may write only when
   ``tail - head < entries`` (for data: ``new_tail - data_head <= data_size``).
4. A payload is contiguous in the data area.  If it does not fit before the
   end of the area, the producer skips to the start of the next lap (the skipped
   bytes are padding, reclaimed with the entry that follows them).  The
   descriptor carries the *logical* (free-running) start, so the card can check
   order and bounds and free space by advancing ``data_head``.
5. Publication order (x86-64 TSO, see MEMORY ORDERING): producer writes the
   payload, then the descriptor, then ``data_tail``, then ``sq_tail``.  The
   consumer reads ``sq_tail``, then ``data_tail``, then the descriptor and the
   payload.  Completions: card writes the entry, then ``cq_tail``; host reads
   ``cq_tail``, then the entry.
6. Outcomes (committed / failed after the datastore replied) travel on the SQ
   as OUTCOME descriptors, so they stay ordered after the write they describe.
   They get no completion.
7. Each descriptor and completion carries the low 32 bits of its ring position
   (``seq``); a mismatch means a stale or torn entry and the entry is rejected.

MEMORY ORDERING
===============
This is written for x86-64 (TSO): stores become visible to other cores in
program order and loads are not reordered with older loads, so "payload, then
descriptor, then tail" published with plain stores through the shared mapping
is seen in that order by the card.  CPython performs each ``pack_into`` /
slice assignment as ordinary stores in program order, and counters are read and
written through a ``memoryview.cast("Q")`` view, i.e. one aligned 8-byte
``mov`` each, which is atomic (never torn) on x86-64.  ``struct`` with a ``<``
format packs byte by byte, so it is never used for counters.

The only reordering TSO allows is a later load passing an earlier store (store
buffer).  That matters exactly once: the doorbell handshake (virtio-style
notification suppression), which is Dekker's pattern::

    card:  state = SLEEPING ; FENCE ; if sq_tail != sq_head: don't sleep
    host:  sq_tail = t      ; FENCE ; if state == SLEEPING: ring eventfd

The completions have the same handshake the other way (the host sleeps on
the completion eventfd while it waits for acks, instead of spinning)::

    host:  waiting = 1      ; FENCE ; if cq_tail != cq_head: don't sleep
    card:  cq_tail = t      ; FENCE ; if waiting: write the completion eventfd

Without the fences both could read the stale value and the wake-up is lost.
`full_fence()` executes a locked instruction (uncontended lock
acquire/release), a full barrier on x86.  On a weakly ordered CPU (arm64)
this module would need release/acquire fences at every publication; `check_platform()`
refuses to run elsewhere rather than be silently wrong.
"""

from __future__ import annotations

import _thread
import enum
import platform
import struct
from dataclasses import dataclass

from xxhash import xxh3_64_intdigest as _xxh3

__all__ = [
    "MAGIC", "VERSION", "PAGE", "CACHE_LINE", "HEADER_SIZE",
    "IDENTITY", "DESC", "CQE", "CARD_LINE",
    "Kind", "DescFlag", "AckStatus", "AckReason", "CardState", "CsumAlg",
    "Geometry", "Identity", "Descriptor", "Completion",
    "RingFormatError", "Counter", "CardCounter",
    "pack_identity", "unpack_identity", "pack_descriptor", "unpack_descriptor",
    "validate_descriptor", "check_fields", "pack_completion", "unpack_completion",
    "payload_checksum", "full_fence", "check_platform",
]


class RingFormatError(ValueError):
    """A header, descriptor or completion that breaks the format (the peer
    wrote garbage, or a value does not fit its field)."""


# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

MAGIC = b"NSPLITHV"  # 8 bytes at offset 0 of the volume
VERSION = 2  # 2: HOST_WAITING and the completion eventfd (the hello carries two descriptors)
PAGE = 4096  # every region starts on a page: mmap granularity, no false sharing between regions
CACHE_LINE = 64  # x86-64 line size; each counter gets a line of its own
HEADER_SIZE = PAGE  # identity (128 B) + card line + 6 counter lines + counters + host lines: 768 B used, rest reserved

MIN_ENTRIES = 2
MAX_ENTRIES = 1 << 20  # 1 Mi x 64 B = 64 MiB of SQ: far beyond any useful queue depth
MIN_DATA = 64 * 1024  # 16 x 4 KiB writes: smallest area that still exercises wrap-around
MAX_DATA = 1 << 40  # 1 TiB: a sanity bound for a header read from a file
MAX_IO_LENGTH = (1 << 32) - 1  # the descriptor's length field is u32 (NBD lengths are u32 too)

# ---------------------------------------------------------------------------
# Header page
# ---------------------------------------------------------------------------

# Identity: bytes 0..127 (two cache lines), written once by the card at create,
# read-only afterwards.
IDENTITY = struct.Struct(
    "<"
    "8s"  # 0   magic            b"NSPLITHV"
    "I"  # 8   version          format version (1)
    "I"  # 12  header_size      bytes of the header page (4096)
    "16s"  # 16  fake_uid         uuid4 bytes; the file name carries its hex
    "I"  # 32  sq_entries       SQ slots, power of two
    "I"  # 36  cq_entries       CQ slots, power of two
    "Q"  # 40  sq_offset        byte offset of the SQ in the file
    "Q"  # 48  cq_offset        byte offset of the CQ in the file
    "Q"  # 56  data_offset      byte offset of the data area in the file
    "Q"  # 64  data_size        bytes of the data area (multiple of PAGE)
    "Q"  # 72  total_size       file size in bytes
    "I"  # 80  card_pid         pid of the card process that created the volume
    "I"  # 84  csum_alg         payload checksum algorithm (CsumAlg)
    "Q"  # 88  created_ns       time.time_ns() at creation (wall clock, for humans)
    "32x"  # 96  reserved         zero
)
assert IDENTITY.size == 128

# Native-order u64 indexes into the header viewed as memoryview.cast("Q")
# (index = byte offset / 8).  Each counter owns one 64-byte line.
CARD_LINE = 128  # byte offset of the card's status line (card writes)


class Counter(enum.IntEnum):
    """u64 slot indexes of the ring counters in the header (cast("Q") view)."""

    CARD_STATE = 128 // 8  # 128: CardState (POLLING/SLEEPING)             card writes
    CARD_HEARTBEAT = 136 // 8  # 136: time.monotonic_ns() of the last beat  card writes
    SQ_TAIL = 192 // 8  # 192: next SQ position the host will fill          host writes
    SQ_HEAD = 256 // 8  # 256: next SQ position the card will consume       card writes
    CQ_TAIL = 320 // 8  # 320: next CQ position the card will fill          card writes
    CQ_HEAD = 384 // 8  # 384: next CQ position the host will consume       host writes
    DATA_TAIL = 448 // 8  # 448: logical end of payload bytes published     host writes
    DATA_HEAD = 512 // 8  # 512: logical start of payload still held        card writes
    HOST_PID = 640 // 8  # 640: pid of the attached host (0 = none)         host writes
    HOST_ATTACH_NS = 648 // 8  # 648: time.monotonic_ns() of the attach      host writes
    HOST_WAITING = 704 // 8  # 704: 1 while the host sleeps on the completion eventfd   host writes


class CardCounter(enum.IntEnum):
    """Card statistics: one line at byte 576 (u64 slots 72..79), card writes."""

    ENTRIES = 72  # 576: SQ entries consumed
    WRITES = 73  # 584: write-like entries acked OK
    OUTCOMES = 74  # 592: OUTCOME entries consumed
    BAD = 75  # 600: descriptors rejected (FAILED completion or dropped outcome)
    BYTES = 76  # 608: payload bytes received
    SLEEPS = 77  # 616: times the card went to sleep on the doorbell
    WAKEUPS = 78  # 624: sleeps ended by a doorbell (not by timeout)
    RELEASED = 79  # 632: payload bytes released (data_head advanced)


assert len({c.value for c in Counter} | {c.value for c in CardCounter}) == len(Counter) + len(CardCounter)
assert max(Counter) * 8 + 8 <= 768 <= HEADER_SIZE


class CardState(enum.IntEnum):
    POLLING = 0  # card spins on the SQ: no doorbell needed
    SLEEPING = 1  # card blocks on the eventfd: the host must ring it
    CLOSED = 2  # card shut down cleanly: the host must not submit


class CsumAlg(enum.IntEnum):
    NONE = 0
    XXH3_LOW32 = 1  # low 32 bits of XXH3-64: ~0.34 us per 4 KiB here vs ~0.92 us for XXH32


def payload_checksum(data) -> int:
    """The descriptor's payload checksum (CsumAlg.XXH3_LOW32)."""
    return _xxh3(data) & 0xFFFFFFFF


# ---------------------------------------------------------------------------
# Submission descriptor (64 bytes = one cache line)
# ---------------------------------------------------------------------------


class Kind(enum.IntEnum):
    """Descriptor kind: the four write-like ops share records.Op's values."""

    WRITE = 1  # payload in the data area
    ZERO = 2  # no payload
    TRIM = 3  # no payload
    BARRIER = 4  # flush barrier; length 0, no payload
    OUTCOME = 16  # io_id + status: the datastore's verdict on an earlier write


WRITE_LIKE = frozenset({Kind.WRITE, Kind.ZERO, Kind.TRIM, Kind.BARRIER})
_KINDS = frozenset(int(k) for k in Kind)


class DescFlag(enum.IntFlag):
    NONE = 0
    CSUM = 1  # the csum field is valid (CsumAlg from the header)


_KNOWN_WFLAGS = 0x03  # records.WFlag.FUA | records.WFlag.GAP
_KNOWN_DFLAGS = int(DescFlag.CSUM)

DESC = struct.Struct(
    "<"
    "B"  # 0   kind             Kind (WRITE/ZERO/TRIM/BARRIER/OUTCOME)
    "B"  # 1   wflags           records.WFlag (bit 0 FUA, bit 1 GAP)
    "B"  # 2   dflags           DescFlag (bit 0 CSUM)
    "B"  # 3   status           OUTCOME only: records.Status (0 committed, 1 failed)
    "I"  # 4   length           IO length in bytes (payload length for WRITE)
    "Q"  # 8   io_id            host-unique IO id (the NBD request's id)
    "Q"  # 16  cg_seq           position in the CG's write order (from 1)
    "I"  # 24  cg_id            consistency group id
    "I"  # 28  vdisk_id         datastore vdisk id
    "Q"  # 32  voffset          virtual byte offset in the vdisk
    "Q"  # 40  timestamp_ns     time.time_ns() when the write entered the splitter
    "Q"  # 48  data_pos         WRITE: logical start of the payload in the data area
    "I"  # 56  csum             payload checksum if dflags & CSUM
    "I"  # 60  seq              low 32 bits of this entry's SQ position
)
assert DESC.size == 64 == CACHE_LINE  # one line per descriptor: no two entries share a line

CQE = struct.Struct(
    "<"
    "Q"  # 0   io_id            the descriptor's io_id
    "B"  # 8   status           AckStatus (0 OK, 1 FAILED)
    "B"  # 9   reason           AckReason when FAILED
    "H"  # 10  reserved         zero
    "I"  # 12  seq              low 32 bits of this entry's CQ position
)
assert CQE.size == 16  # 4 completions per cache line, like NVMe's 16-byte CQE


class AckStatus(enum.IntEnum):
    OK = 0  # the card holds the write: the host may pass it down
    FAILED = 1  # the card refused it: the host goes to marking


class AckReason(enum.IntEnum):  # values mirrored as ints in check_fields
    NONE = 0
    BAD_KIND = 1  # unknown kind or flag bits
    BAD_RANGE = 2  # payload outside the published data area, or out of order
    BAD_CHECKSUM = 3  # payload does not match csum
    BAD_SEQ = 4  # seq does not match the ring position (stale/torn)
    DUPLICATE = 5  # io_id still held by the card
    BAD_FIELD = 6  # a field inconsistent with the kind (e.g. BARRIER with length)
    FULL = 7  # the card is full (its pipeline cannot take more): not the host's fault


# ---------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------


def _page_up(n: int) -> int:
    return (n + PAGE - 1) // PAGE * PAGE


@dataclass(frozen=True, slots=True)
class Geometry:
    """Sizes and offsets of the regions; derived entirely from the three sizes."""

    sq_entries: int
    cq_entries: int
    data_size: int

    def __post_init__(self) -> None:
        for name in ("sq_entries", "cq_entries"):
            n = getattr(self, name)
            if not (MIN_ENTRIES <= n <= MAX_ENTRIES) or n & (n - 1):
                raise RingFormatError(f"{name}={n}: must be a power of two in [{MIN_ENTRIES}, {MAX_ENTRIES}]")
        if not (MIN_DATA <= self.data_size <= MAX_DATA) or self.data_size % PAGE:
            raise RingFormatError(
                f"data_size={self.data_size}: must be a multiple of {PAGE} in [{MIN_DATA}, {MAX_DATA}]"
            )

    @property
    def sq_offset(self) -> int:
        return HEADER_SIZE

    @property
    def cq_offset(self) -> int:
        return self.sq_offset + _page_up(self.sq_entries * DESC.size)

    @property
    def data_offset(self) -> int:
        return self.cq_offset + _page_up(self.cq_entries * CQE.size)

    @property
    def total_size(self) -> int:
        return self.data_offset + self.data_size


@dataclass(frozen=True, slots=True)
class Identity:
    version: int
    fake_uid: bytes  # 16 bytes
    geometry: Geometry
    card_pid: int
    csum_alg: int
    created_ns: int


def pack_identity(buf, ident: Identity) -> None:
    g = ident.geometry
    IDENTITY.pack_into(
        buf, 0, MAGIC, ident.version, HEADER_SIZE, ident.fake_uid, g.sq_entries, g.cq_entries,
        g.sq_offset, g.cq_offset, g.data_offset, g.data_size, g.total_size, ident.card_pid,
        ident.csum_alg, ident.created_ns,
    )


def unpack_identity(buf) -> Identity:
    """Parse and check the identity block; RingFormatError names the bad field."""
    if len(buf) < IDENTITY.size:
        raise RingFormatError(f"header is {len(buf)} bytes, need {IDENTITY.size}")
    (magic, version, header_size, uid, sqn, cqn, sq_off, cq_off, data_off, data_size, total,
     pid, csum_alg, created) = IDENTITY.unpack_from(buf, 0)
    if magic != MAGIC:
        raise RingFormatError(f"bad magic {magic!r} (expected {MAGIC!r}): not a nicsplit hidden volume")
    if version != VERSION:
        raise RingFormatError(f"unsupported hidden volume version {version} (this build speaks {VERSION})")
    if header_size != HEADER_SIZE:
        raise RingFormatError(f"header_size {header_size} != {HEADER_SIZE}")
    g = Geometry(sqn, cqn, data_size)
    if (sq_off, cq_off, data_off, total) != (g.sq_offset, g.cq_offset, g.data_offset, g.total_size):
        raise RingFormatError(
            f"region offsets {(sq_off, cq_off, data_off, total)} do not match geometry "
            f"{(g.sq_offset, g.cq_offset, g.data_offset, g.total_size)}"
        )
    if csum_alg not in (CsumAlg.NONE, CsumAlg.XXH3_LOW32):
        raise RingFormatError(f"unknown checksum algorithm {csum_alg}")
    return Identity(version, uid, g, pid, csum_alg, created)


# ---------------------------------------------------------------------------
# Descriptors and completions
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Descriptor:
    """A decoded SQ entry (the hot paths use DESC directly; this is for tests,
    tools and validation)."""

    kind: int
    wflags: int
    dflags: int
    status: int
    length: int
    io_id: int
    cg_seq: int
    cg_id: int
    vdisk_id: int
    voffset: int
    timestamp_ns: int
    data_pos: int
    csum: int
    seq: int


def pack_descriptor(buf, offset: int, d: Descriptor) -> None:
    """Pack ``d`` at ``offset``; RingFormatError if a value does not fit."""
    try:
        DESC.pack_into(
            buf, offset, d.kind, d.wflags, d.dflags, d.status, d.length, d.io_id, d.cg_seq, d.cg_id,
            d.vdisk_id, d.voffset, d.timestamp_ns, d.data_pos, d.csum, d.seq,
        )
    except struct.error as e:
        raise RingFormatError(f"descriptor field out of range: {e} ({d})") from None


def unpack_descriptor(buf, offset: int) -> Descriptor:
    """The descriptor at ``offset``; RingFormatError if ``buf`` has no 64 bytes there."""
    try:
        return Descriptor(*DESC.unpack_from(buf, offset))
    except struct.error as e:
        raise RingFormatError(f"no descriptor at offset {offset} of {len(buf)} bytes: {e}") from None


_R_NONE, _R_KIND, _R_FIELD, _R_SEQ = 0, 1, 6, 4  # AckReason values as plain ints (hot path)
_KW, _KO, _KB = 1, 16, 4  # Kind.WRITE, Kind.OUTCOME, Kind.BARRIER
_M32 = 0xFFFFFFFF


def check_fields(
    kind: int, wflags: int, dflags: int, status: int, length: int, data_pos: int, csum: int, seq: int,
    position: int,
) -> int:
    """Checks that need no knowledge of the data area; returns an AckReason
    value (0 = NONE = fine).  The payload range and checksum are checked by
    the consumer, which knows the published data_tail and its own head.
    Plain ints throughout: this runs once per entry on the card."""
    if seq != position & _M32:
        return _R_SEQ
    if kind == _KW:  # the common case first
        if wflags & ~_KNOWN_WFLAGS or dflags & ~_KNOWN_DFLAGS or status:
            return _R_KIND if (wflags & ~_KNOWN_WFLAGS or dflags & ~_KNOWN_DFLAGS) else _R_FIELD
        return _R_NONE if length else _R_FIELD
    if kind not in _KINDS or wflags & ~_KNOWN_WFLAGS or dflags & ~_KNOWN_DFLAGS:
        return _R_KIND
    if dflags or data_pos or csum:  # only a WRITE has a payload
        return _R_FIELD
    if kind == _KO:
        return _R_NONE if status in (0, 1) and not (length or wflags) else _R_FIELD
    if status or (kind == _KB and length):
        return _R_FIELD
    return _R_NONE


def validate_descriptor(d: Descriptor, position: int) -> AckReason:
    """`check_fields` on a decoded descriptor."""
    return AckReason(check_fields(d.kind, d.wflags, d.dflags, d.status, d.length, d.data_pos, d.csum, d.seq, position))


@dataclass(frozen=True, slots=True)
class Completion:
    io_id: int
    status: int
    reason: int
    seq: int


def pack_completion(buf, offset: int, c: Completion) -> None:
    try:
        CQE.pack_into(buf, offset, c.io_id, c.status, c.reason, 0, c.seq)
    except struct.error as e:
        raise RingFormatError(f"completion field out of range: {e} ({c})") from None


def unpack_completion(buf, offset: int) -> Completion:
    """The completion at ``offset``; RingFormatError if ``buf`` has no 16 bytes there."""
    try:
        io_id, status, reason, _reserved, seq = CQE.unpack_from(buf, offset)
    except struct.error as e:
        raise RingFormatError(f"no completion at offset {offset} of {len(buf)} bytes: {e}") from None
    return Completion(io_id, status, reason, seq)


# ---------------------------------------------------------------------------
# Memory ordering helpers
# ---------------------------------------------------------------------------

_fence_lock = _thread.allocate_lock()


def full_fence() -> None:
    """A full memory barrier: an uncontended lock acquire/release executes a
    locked read-modify-write (``lock cmpxchg`` / ``lock xadd`` in the
    semaphore fast path), which orders every earlier store before every later
    load on x86-64.  Costs ~0.1 us."""
    _fence_lock.acquire()
    _fence_lock.release()


def check_platform() -> None:
    """The ring relies on x86-64 TSO (see MEMORY ORDERING); refuse elsewhere."""
    m = platform.machine().lower()
    if m not in ("x86_64", "amd64"):
        raise RuntimeError(
            f"the ring transport assumes x86-64 (TSO) memory ordering; this machine is {m!r}"
        )
