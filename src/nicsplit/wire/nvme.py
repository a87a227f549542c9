"""Sans-IO layout of the nvme-pi transport: an NVMe I/O queue pair and a
hidden namespace formatted with end-to-end protection information (PI).

Packs and unpacks on a ``memoryview``; never opens, maps or waits. The
shared memory is the hidden volume of `nicsplit.card.hidden` (same header
page, same regions), read differently: its SQ region holds NVMe submission
queue entries (64 B, like the ring's descriptors), its CQ region NVMe
completion queue entries (16 B), its data area the hidden namespace's
blocks. The byte tables, with the NVMe spec's field names, are in
docs/formats.md ("nvme-pi transport"). The loops around these codecs are
`nicsplit.card.transports.nvme_splitter` (host) and `nvme_endpoint` (card).

Theory of operation
===================
The hidden namespace (NSID 1) uses one LBA format: LBADS = 12 (4096 data
bytes per logical block) with MS = 8 metadata bytes, transferred as an
*extended LBA* (FLBAS bit 4 = 1: each block's metadata follows its data in
the same buffer), so one block is ``EXT = 4104`` bytes. The metadata is the
8-byte 16b Guard protection information (DPS: PIT = 010b, Type 2; PIP = 0,
PI in the last 8 bytes of the metadata, which are all of it here)::

    PI (big endian, as in the spec):  0 Guard (CRC-16/T10-DIF of the block's 4096 data bytes)
                                      2 Application Tag  = the vdisk id
                                      4 Logical Block Reference Tag = the *virtual* LBA (voffset // 4096 + i)

Type 2, not Type 1: the reference tag is the application's number (the
virtual LBA, initially EILBRT in the spec), not the hidden namespace's LBA.
An application tag of FFFFh disables checking in the spec, so vdisk 65535
and above cannot use this transport (the splitter refuses such a write, the
vdisk marks); reference tags are 32 bits, so a vdisk is at most 2^32
blocks = 16 TiB here.

Why 4096-byte blocks: the CRC call costs ~0.5 us whatever the block (call
overhead), so 512-byte blocks would cost a 4 KiB write 8 calls on each side;
a write that is not block-aligned (NBD allows any byte) is carried in whole
blocks with ``head`` (its offset in the first block) and its byte length in
the command; the padding bytes are whatever the buffer held and are covered
by the guard like the rest.

Commands (SQE ``OPC``): Write (01h) carries a payload in blocks with PI,
PRINFO.PRACT = 0 (the host wrote the PI) and PRINFO.PRCHK bit 2 (guard) set
(the card checks the guard; application and reference tags are read, not
checked against EILBRT/ELBAT, whose dwords carry the timestamp). Write
Zeroes (08h), Dataset Management (09h, deallocate) and Flush (00h) carry no
data: their identity travels in the command itself. Vendor-specific 80h
carries an outcome (committed / failed). Every command gets one completion.

Rules
-----
1. Queue pointers follow NVMe: the SQ Tail doorbell (host writes) and the CQ
   Head doorbell (host writes) hold *slot indexes* (0 .. entries-1); a queue
   is full when it holds entries-1 commands. The host learns the card's SQ
   head from each completion's SQHD. New completions are found by their
   Phase Tag (P): 1 on the first pass through the CQ, inverted on each pass.
   The card also keeps its free-running CQ position in the header's CQ_TAIL
   counter (not an NVMe register) so a host attaching later knows the phase.
2. Payload space is counted in free-running byte positions of the data area
   (multiples of EXT), like the ring's: the card publishes ``DATA_HEAD`` as it
   frees blocks (in submission order); the host places each Write's blocks
   contiguously after the previous Write's, skipping to block 0 of the next
   lap when they do not fit before the namespace's end; SLBA is the slot
   (position // EXT mod NSZE) and PRP1 its byte offset in the data area.
3. Publication order (x86-64 TSO, see `nicsplit.wire.ring` MEMORY ORDERING):
   host writes data and PI, then the SQE, then the SQ Tail doorbell, fence,
   then reads the card state (doorbell eventfd only if SLEEPING). The card
   writes a CQE's first 14 bytes, then its status word (P + status field) with
   one aligned 16-bit store, so a host that sees the new phase sees the whole
   entry; the host reads the status word first, then the rest.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

__all__ = [
    "VERSION", "NSID", "LBADS", "BLOCK", "MS", "EXT", "SQE", "CQE14", "PI", "Opc", "PRCHK_GUARD", "PRACT",
    "FUA", "SCT_GENERIC", "SCT_CMD", "SCT_MEDIA", "Status", "status_word", "split_status", "blocks_for",
    "namespace_blocks", "Command", "pack_command", "unpack_command", "Completion", "pack_completion",
    "unpack_completion", "phase_of", "pack_pi", "unpack_pi", "NvmeFormatError", "MAX_QUEUE", "check_cdw12",
    "STATUS_OFFSET", "CQE_SIZE", "APP_TAG_ESCAPE", "MAX_VDISK_ID", "MAX_VLBA",
]


class NvmeFormatError(ValueError):
    """A field that does not fit its place, or an entry that breaks the layout."""


VERSION = 1  # the nvme-pi layout; the hello carries it
NSID = 1  # the hidden namespace
LBADS = 12  # log2 of the data bytes per logical block
BLOCK = 1 << LBADS  # 4096
MS = 8  # metadata bytes per block: the PI alone
EXT = BLOCK + MS  # 4104: one extended logical block (data then PI)
MAX_QUEUE = 1 << 16  # NVMe: at most 64 Ki entries a queue; CIDs (16 bits) are slot indexes

# ---------------------------------------------------------------------------
# Submission queue entry (64 bytes). Field names are the spec's; a field the
# spec leaves reserved or unused in this configuration carries a nicsplit
# value (named after the colon).
# ---------------------------------------------------------------------------
SQE = struct.Struct(
    "<"
    "B"  # 0   CDW0.OPC         opcode (Opc)
    "B"  # 1   CDW0.FUSE/PSDT   0: not fused, PRPs
    "H"  # 2   CDW0.CID         command identifier = the SQ slot index
    "I"  # 4   NSID             1 (Write/Write Zeroes/DSM/Flush), 0 (outcome)
    "I"  # 8   CDW2             nicsplit: cg_id (reserved for 16b Guard PI without storage tag)
    "I"  # 12  CDW3             nicsplit: length, bytes of the IO (reserved, as CDW2)
    "Q"  # 16  MPTR             nicsplit: io_id (no metadata pointer: metadata is interleaved)
    "Q"  # 24  DPTR.PRP1        Write: byte offset of block SLBA in the data area; else nicsplit: voffset
    "Q"  # 32  DPTR.PRP2        nicsplit: cg_seq (no second PRP: the transfer is one contiguous region)
    "Q"  # 40  CDW10-11 SLBA    Write: starting LBA in the hidden namespace; else nicsplit: vdisk_id
    "I"  # 48  CDW12            NLB 15:0 (0-based), PRINFO 29:26 (PRACT 29, PRCHK 28:26), FUA 30
    "I"  # 52  CDW13            nicsplit: head 15:0 (IO's offset in the first block), WFlag 23:16; outcome: status
    "Q"  # 56  CDW14-15         nicsplit: timestamp_ns (EILBRT/ELBAT/ELBATM: not checked, PRCHK is guard only)
)
assert SQE.size == 64

PRACT = 1 << 29  # PRINFO.PRACT: 0 = the host supplies the PI
PRCHK_GUARD = 1 << 28  # PRINFO.PRCHK bit 2: check the guard
PRCHK_APP = 1 << 27  # PRINFO.PRCHK bit 1: check the application tag (not used)
PRCHK_REF = 1 << 26  # PRINFO.PRCHK bit 0: check the reference tag (not used)
FUA = 1 << 30  # CDW12.FUA
_CDW12_KNOWN = 0xFFFF | PRACT | PRCHK_GUARD | PRCHK_APP | PRCHK_REF | FUA


class Opc(enum.IntEnum):
    FLUSH = 0x00  # records.Op.BARRIER
    WRITE = 0x01  # records.Op.WRITE
    WRITE_ZEROES = 0x08  # records.Op.ZERO
    DSM = 0x09  # records.Op.TRIM (Dataset Management, deallocate)
    OUTCOME = 0x80  # vendor specific (80h-FFh): records.Outcome


# ---------------------------------------------------------------------------
# Completion queue entry (16 bytes): DW0..DW3[15:0] packed first, the
# status word (DW3[31:16]: P in bit 0, Status Field in bits 15:1) stored last.
# ---------------------------------------------------------------------------
CQE14 = struct.Struct(
    "<"
    "I"  # 0   DW0              command specific: 0
    "I"  # 4   DW1              reserved: 0
    "H"  # 8   DW2.SQHD         SQ head pointer (slot index) after this command
    "H"  # 10  DW2.SQID         submission queue id: 1 (the one I/O queue)
    "H"  # 12  DW3.CID          the command's CID
)
assert CQE14.size == 14
STATUS_OFFSET = 14  # DW3[31:16]: P (bit 0), SF = SC 8:1, SCT 11:9, CRD 13:12, M 14, DNR 15
CQE_SIZE = 16

SCT_GENERIC, SCT_CMD, SCT_MEDIA = 0, 1, 2  # Generic Command Status, Command Specific, Media and Data Integrity


class Status(enum.IntEnum):
    """Status field values (SCT << 8 | SC) this transport uses."""

    SUCCESS = 0x000
    INVALID_OPCODE = 0x001  # Invalid Command Opcode
    INVALID_FIELD = 0x002  # Invalid Field in Command
    CID_CONFLICT = 0x003  # Command ID Conflict: the io_id is already held by the card
    LBA_OUT_OF_RANGE = 0x080  # blocks outside the namespace or out of submission order
    NS_NOT_READY = 0x082  # Namespace Not Ready (DNR = 0): the card is full, try later
    INVALID_PI = 0x181  # Command Specific: Invalid Protection Information
    GUARD_CHECK = 0x282  # Media and Data Integrity: End-to-end Guard Check Error
    APP_TAG_CHECK = 0x283  # End-to-end Application Tag Check Error (tags differ between blocks)
    REF_TAG_CHECK = 0x284  # End-to-end Reference Tag Check Error (tags not consecutive)


def status_word(status: int, phase: int) -> int:
    """DW3[31:16]: the Status Field (SCT, SC; CRD, M, DNR zero) and the Phase Tag."""
    return ((status & 0x7FF) << 1) | (phase & 1)


def split_status(word: int) -> tuple[int, int, int]:
    """(phase, SCT, SC) of a status word."""
    return word & 1, (word >> 9) & 7, (word >> 1) & 0xFF


def phase_of(position: int, entries: int) -> int:
    """The Phase Tag the card writes at free-running CQ ``position``: 1 on
    the first pass (positions 0 .. entries-1), then inverted on each pass."""
    return ((position // entries) & 1) ^ 1


# ---------------------------------------------------------------------------
# Protection information (8 bytes, big endian as the spec lays it out)
# ---------------------------------------------------------------------------
PI = struct.Struct(
    ">"
    "H"  # 0   Guard                      CRC-16/T10-DIF of the block's 4096 data bytes
    "H"  # 2   Application Tag            the vdisk id (FFFFh disables checking: never used)
    "I"  # 4   Logical Block Reference Tag  the virtual LBA of this block
)
assert PI.size == MS
APP_TAG_ESCAPE = 0xFFFF
MAX_VDISK_ID = 0xFFFE
MAX_VLBA = 0xFFFFFFFF


def pack_pi(buf, offset: int, guard: int, app_tag: int, ref_tag: int) -> None:
    try:
        PI.pack_into(buf, offset, guard, app_tag, ref_tag)
    except struct.error as e:
        raise NvmeFormatError(f"PI field out of range: {e}") from None


def unpack_pi(buf, offset: int) -> tuple[int, int, int]:
    """(Guard, Application Tag, Logical Block Reference Tag)."""
    return PI.unpack_from(buf, offset)


def blocks_for(head: int, length: int) -> int:
    """Logical blocks an IO of ``length`` bytes starting ``head`` bytes into its first block covers."""
    return (head + length + BLOCK - 1) >> LBADS


def namespace_blocks(data_size: int) -> int:
    """NSZE: extended blocks that fit in a data area of ``data_size`` bytes."""
    return data_size // EXT


# ---------------------------------------------------------------------------
# Decoded entries (for tests, tools and validation; the hot paths use the
# structs directly)
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Command:
    opc: int
    cid: int
    nsid: int
    cg_id: int
    length: int
    io_id: int
    prp1: int
    cg_seq: int
    slba: int
    cdw12: int
    cdw13: int
    timestamp_ns: int

    @property
    def nlb(self) -> int:
        """Number of logical blocks, 0-based (as in CDW12)."""
        return self.cdw12 & 0xFFFF

    @property
    def head(self) -> int:
        return self.cdw13 & 0xFFFF

    @property
    def wflags(self) -> int:
        return (self.cdw13 >> 16) & 0xFF


def pack_command(buf, offset: int, c: Command) -> None:
    try:
        SQE.pack_into(buf, offset, c.opc, 0, c.cid, c.nsid, c.cg_id, c.length, c.io_id, c.prp1, c.cg_seq, c.slba,
                      c.cdw12, c.cdw13, c.timestamp_ns)
    except struct.error as e:
        raise NvmeFormatError(f"command field out of range: {e} ({c})") from None


def unpack_command(buf, offset: int) -> Command:
    try:
        opc, _fuse, cid, nsid, cg_id, length, io_id, prp1, cg_seq, slba, cdw12, cdw13, ts = SQE.unpack_from(buf, offset)
    except struct.error as e:
        raise NvmeFormatError(f"no command at offset {offset} of {len(buf)} bytes: {e}") from None
    return Command(opc, cid, nsid, cg_id, length, io_id, prp1, cg_seq, slba, cdw12, cdw13, ts)


def check_cdw12(cdw12: int) -> bool:
    """A Write's CDW12: no unknown bits, PRACT clear, the guard checked."""
    return not (cdw12 & ~_CDW12_KNOWN) and not (cdw12 & PRACT) and bool(cdw12 & PRCHK_GUARD)


@dataclass(frozen=True, slots=True)
class Completion:
    dw0: int
    sqhd: int
    sqid: int
    cid: int
    phase: int
    status: int  # SCT << 8 | SC


def pack_completion(buf, offset: int, c: Completion, status16=None) -> None:
    """The entry's 14 bytes, then its status word: through ``status16`` (the
    CQ region cast to "H") as one aligned 16-bit store when given."""
    CQE14.pack_into(buf, offset, c.dw0, 0, c.sqhd, c.sqid, c.cid)
    w = status_word(c.status, c.phase)
    if status16 is not None:
        status16[(offset + STATUS_OFFSET) >> 1] = w
    else:
        struct.pack_into("<H", buf, offset + STATUS_OFFSET, w)


def unpack_completion(buf, offset: int) -> Completion:
    try:
        dw0, _dw1, sqhd, sqid, cid = CQE14.unpack_from(buf, offset)
        (w,) = struct.unpack_from("<H", buf, offset + STATUS_OFFSET)
    except struct.error as e:
        raise NvmeFormatError(f"no completion at offset {offset} of {len(buf)} bytes: {e}") from None
    return Completion(dw0, sqhd, sqid, cid, w & 1, (w >> 1) & 0x7FF)
