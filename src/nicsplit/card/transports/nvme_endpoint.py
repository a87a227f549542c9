"""Card half of the nvme-pi transport: `NvmePiEndpoint`, a `RingEndpoint`
(hidden volume, doorbell eventfd, control socket, heartbeat, doorbell
sleep, payload release in any order, set_full, statistics) whose queues
hold NVMe commands and completions. The protocol is in
`nicsplit.card.transports.nvme_pi`, the layout in `nicsplit.wire.nvme`.

Per command (``poll``), in submission order:

1. a Write (01h): fields (NSID, CDW12: PRACT = 0 and PRCHK guard set, NLB
   matching head + length), blocks inside the namespace at PRP1 = SLBA x
   4104, at or after the last accepted Write's blocks (within one lap of
   what the card holds); then per block the PI: Guard = CRC-16/T10-DIF of
   the block's data (else 282h, End-to-end Guard Check Error), the same
   Application Tag in every block (else 283h), consecutive Reference Tags
   (else 284h), Application Tag not FFFFh (else 181h Invalid Protection
   Information). The identity is the PI's: vdisk id = Application Tag,
   virtual offset = Reference Tag x 4096 + head. The PI is then dropped:
   the data of blocks 1.. moves down over the PI before it (one memmove a
   block; a one-block write moves nothing), so the payload is one
   contiguous view of the hidden volume, as on the ring;
2. Write Zeroes (08h), Dataset Management (09h), Flush (00h): the
   identity is in the command (SLBA = vdisk id, PRP1 = virtual offset);
3. vendor 80h: an outcome, returned as `Outcome`;
4. every command is completed at once, before the next is looked at
   (status 0, or the first check that failed); the write is then returned
   as an `AugmentedWrite` like the ring's, so the pipeline, the hold and
   the journal see the same records.

A refused Write whose blocks were in range frees its space in order and
its seq is skipped by hold (``skipped``), and it is reported through
``on_refused`` (the lost log), exactly as the ring does for a refused
descriptor. The CQ full (entries-1 completions unread) stops the poll: the
rest waits in the SQ until the host moves the CQ Head doorbell.

With ``fast_path = "process"`` (the default) the card's acker runs
`nicsplit.card.transports.nvme_acker.NvmeAcker`, which does the checks
above, completes the command and hands the write to the pipeline worker
as the ring's acker does; with ``fast_path = "inline"`` the `CardProcess`
loop polls this endpoint itself.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from nicsplit.card.transports.ring_endpoint import EndpointStats, RingEndpoint
from nicsplit.card.transports.ring_shared import CQ_HEAD, CQ_TAIL, M32, SQ_HEAD, SQ_TAIL, STATUSES, WFLAGS
from nicsplit.core.records import AugmentedWrite, Op, Outcome
from nicsplit.wire import nvme as N
from nicsplit.wire.crc16 import crc16_t10dif

__all__ = ["NvmePiEndpoint", "NvmeEndpointStats"]

log = logging.getLogger("nicsplit.card.transports.nvme")

BLOCK, EXT, NSID = N.BLOCK, N.EXT, N.NSID
S = N.Status
_OK, _FIELD, _OPCODE, _CID = 0, int(S.INVALID_FIELD), int(S.INVALID_OPCODE), int(S.CID_CONFLICT)
_RANGE, _NOT_READY, _GUARD = int(S.LBA_OUT_OF_RANGE), int(S.NS_NOT_READY), int(S.GUARD_CHECK)
_APP, _REF, _BAD_PI = int(S.APP_TAG_CHECK), int(S.REF_TAG_CHECK), int(S.INVALID_PI)
_PI_STATUSES = frozenset((_APP, _REF, _BAD_PI))
_CDW12_BAD = ~(0xFFFF | N.PRCHK_GUARD | N.PRCHK_APP | N.PRCHK_REF | N.FUA) & 0xFFFFFFFF  # incl. PRACT, LR, DTYPE
assert all(N.check_cdw12(v) == (not v & _CDW12_BAD and bool(v & N.PRCHK_GUARD))
           for v in (N.PRCHK_GUARD, N.PRCHK_GUARD | N.PRACT, N.PRCHK_GUARD | 1 << 31, 7, N.PRCHK_GUARD | N.FUA | 5))
_NODATA = {int(N.Opc.WRITE_ZEROES): Op.ZERO, int(N.Opc.DSM): Op.TRIM, int(N.Opc.FLUSH): Op.BARRIER}
_O_WRITE, _O_OUTCOME = int(N.Opc.WRITE), int(N.Opc.OUTCOME)
sqe_unpack = N.SQE.unpack_from
cqe14_pack = N.CQE14.pack_into
pi_unpack = N.PI.unpack_from


@dataclass(frozen=True, slots=True)
class NvmeEndpointStats(EndpointStats):
    guard_errors: int = 0  # Writes completed 282h (End-to-end Guard Check Error)
    pi_errors: int = 0  # Writes completed with another PI error (283h, 284h, 181h)


def status_name(status: int) -> str:
    try:
        return S(status).name
    except ValueError:
        return f"status {status:03x}h"


class NvmePiEndpoint(RingEndpoint):
    """Card half of the nvme-pi transport (see module docstring)."""

    def __init__(self, run_dir, *, verify_guard: bool = True, **kw) -> None:
        kw.pop("verify_checksums", None)  # the ring's option; the guard is this transport's check
        super().__init__(run_dir, verify_checksums=False, **kw)
        g = self._hv.geometry
        if g.sq_entries > N.MAX_QUEUE or g.cq_entries > N.MAX_QUEUE:
            self.close()
            raise ValueError(f"nvme-pi queues hold at most {N.MAX_QUEUE} entries (sq_entries {g.sq_entries}, "
                             f"cq_entries {g.cq_entries})")
        self._nsze = N.namespace_blocks(g.data_size)
        self._dsize = self._nsze * EXT  # free-running payload positions wrap at the namespace's end
        self._cq16 = self._cq.cast("H")
        self._cq_phase = 1  # NVMe: the first pass through the CQ writes P = 1
        self._verify_guard = verify_guard
        self._n_guard = self._n_pi = 0

    def _hello(self) -> bytes:
        info = json.loads(super()._hello())
        info.update(transport="nvme-pi", nvme_version=N.VERSION, nsid=NSID, lbads=N.LBADS, ms=N.MS)
        return json.dumps(info).encode()

    # -- the hot path ------------------------------------------------------------

    def poll(self, max_entries: int = 256) -> list[AugmentedWrite | Outcome]:
        c = self._ctr
        head = self._sq_head  # a slot index, like the doorbell
        tail = c[SQ_TAIL]
        if tail == head:
            return []
        sq_mask = self._sq_mask
        if tail > sq_mask:
            self._warn("nvme-pi: host rang the SQ Tail doorbell with %d (queue of %d): ignored", tail, self._sq_n)
            return []
        avail = (tail - head) & sq_mask
        sq, cq, cq16 = self._sq, self._cq, self._cq16
        cq_mask, cq_full = self._cq_mask, self._cq_n - 1
        cq_tail, phase = self._cq_tail, self._cq_phase
        out: list[AugmentedWrite | Outcome] = []
        consumed = 0
        for _ in range(avail if avail < max_entries else max_entries):
            if ((cq_tail - self._cq_head_c) & cq_mask) >= cq_full:
                self._cq_head_c = c[CQ_HEAD]
                if ((cq_tail - self._cq_head_c) & cq_mask) >= cq_full:
                    self._n_cq_full += 1
                    break  # the rest waits in the SQ until the host consumes completions
            (opc, _fuse, cid, nsid, cg_id, length, io_id, prp1, cg_seq, slba, cdw12, cdw13,
             ts) = sqe_unpack(sq, head << 6)
            head = (head + 1) & sq_mask
            consumed += 1
            rec: AugmentedWrite | Outcome | None = None
            track = False
            vdisk, voffset = slba, prp1
            if opc == _O_WRITE:
                status, track, vdisk, voffset, view = self._write(io_id, nsid, length, prp1, slba, cdw12, cdw13)
                if not status:
                    rec = AugmentedWrite(io_id, cg_id, cg_seq, vdisk, Op.WRITE, WFLAGS[cdw13 >> 16], voffset,
                                         length, ts, view)
            elif opc == _O_OUTCOME:
                if nsid or length or cdw12 or cdw13 > 1 or prp1 or slba:
                    status = _FIELD
                else:
                    status = _OK
                    rec = Outcome(io_id, STATUSES[cdw13])
            elif opc in _NODATA:
                op = _NODATA[opc]
                if nsid != NSID or cdw12 & ~N.FUA or cdw13 & ~0x30000 or (op is Op.BARRIER) != (length == 0):
                    status = _FIELD
                elif self._full:
                    status = _NOT_READY
                else:
                    status = _OK
                    rec = AugmentedWrite(io_id, cg_id, cg_seq, slba, op, WFLAGS[cdw13 >> 16], prp1, length, ts, None)
            else:
                status = _OPCODE
            off = (cq_tail & cq_mask) << 4
            cqe14_pack(cq, off, 0, 0, head, 1, cid)
            cq16[(off >> 1) + 7] = (status << 1) | phase  # the completion is out before the next command
            cq_tail += 1
            if not cq_tail & cq_mask:
                phase ^= 1
            if opc == _O_OUTCOME:
                if status:
                    self._n_bad += 1
                    self._warn("nvme-pi: bad outcome command for io %d (CID %d): dropped", io_id, cid)
                else:
                    self._n_outcomes += 1
                    out.append(rec)  # type: ignore[arg-type]
                continue
            if status:
                if length and self.on_refused is not None:
                    self.on_refused(io_id, vdisk, voffset, length, status_name(status))
                if track or status == _NOT_READY:  # its seq is real: hold skips it
                    self.skipped.append((cg_id, cg_seq))
                if status == _NOT_READY:
                    self._n_refused_full += 1
                else:
                    self._n_bad += 1
                    if status == _GUARD:
                        self._n_guard += 1
                    elif status in _PI_STATUSES:
                        self._n_pi += 1
                    self._warn("nvme-pi: refused io %d (CID %d, opcode %02xh, %d bytes, vdisk %d at %d): %s", io_id,
                               cid, opc, length, vdisk, voffset, status_name(status))
            else:
                self._n_writes += 1
                out.append(rec)  # type: ignore[arg-type]
        if consumed:
            self._sq_head = head
            self._cq_tail, self._cq_phase = cq_tail, phase
            c[SQ_HEAD] = head
            c[CQ_TAIL] = cq_tail  # free-running, for a host that attaches later (wire/nvme.py rule 1)
            self._wake_host()
            self._n_entries += consumed
            if self._order and self._order[0][2]:  # refused payloads at the front
                self._advance()
        return out

    def _write(self, io_id: int, nsid: int, length: int, prp1: int, slba: int, cdw12: int,
               cdw13: int) -> tuple[int, bool, int, int, memoryview | None]:
        """Check a Write and take its payload: (status, track, vdisk id,
        virtual offset, payload view). ``track``: its blocks are the card's to
        free, in order, good or bad."""
        status, vdisk, voffset, end = self._check_write(nsid, length, prp1, slba, cdw12, cdw13, self._data_head,
                                                         self._full)
        if end < 0:
            return status, False, 0, 0, None
        if not status and io_id in self._held:
            status = _CID
        h = [io_id, end, status != 0]
        self._order.append(h)
        self._data_expect = end
        if status:
            return status, True, vdisk, voffset, None
        self._held[io_id] = h
        self._n_bytes += length
        hd = cdw13 & 0xFFFF
        return _OK, True, vdisk, voffset, self._drop_pi(prp1, (cdw12 & 0xFFFF) + 1)[hd: hd + length]

    def _check_write(self, nsid: int, length: int, prp1: int, slba: int, cdw12: int, cdw13: int,
                     data_head: int, full: bool) -> tuple[int, int, int, int]:
        """The checks of a Write, with no bookkeeping: (status, vdisk id,
        virtual offset, end) where ``end`` is the free-running position after
        its blocks, or -1 when its blocks are not the card's to free (a bad
        field or range: nothing to track). ``data_head``: the first position
        not yet free (the card's own, or the handoff floor's)."""
        nb = (cdw12 & 0xFFFF) + 1
        hd = cdw13 & 0xFFFF
        if (nsid != NSID or cdw12 & _CDW12_BAD or not cdw12 & N.PRCHK_GUARD or cdw13 & ~0x3FFFF or hd >= BLOCK
                or not length or (hd + length + BLOCK - 1) >> 12 != nb):  # `N.check_cdw12` inline
            return _FIELD, 0, 0, -1
        nsze, size = self._nsze, self._dsize
        if slba + nb > nsze or prp1 != slba * EXT:
            return _RANGE, 0, 0, -1
        expect = self._data_expect
        pos = expect + ((slba - (expect // EXT) % nsze) % nsze) * EXT  # first position >= expect at that slot
        end = pos + nb * EXT
        if end - data_head > size:
            return _RANGE, 0, 0, -1
        data = self._data
        g0, app, ref0 = pi_unpack(data, prp1 + BLOCK)
        vdisk, voffset = app, ref0 * BLOCK + hd
        status = _OK
        if full:
            status = _NOT_READY
        elif app == N.APP_TAG_ESCAPE:
            status = _BAD_PI
        elif nb == 1:  # the common case: no loop
            if self._verify_guard and crc16_t10dif(data[prp1: prp1 + BLOCK]) != g0:
                status = _GUARD
        else:
            verify = self._verify_guard
            o = prp1
            for i in range(nb):
                g, a, r = pi_unpack(data, o + BLOCK) if i else (g0, app, ref0)
                if verify and crc16_t10dif(data[o: o + BLOCK]) != g:
                    status = _GUARD
                    break
                if a != app:
                    status = _APP
                    break
                if r != (ref0 + i) & M32:
                    status = _REF
                    break
                o += EXT
        return status, vdisk, voffset, end

    def _drop_pi(self, prp1: int, nb: int) -> memoryview:
        """Drop an accepted Write's PI: the data of blocks 1.. moves down over
        the PI before it (memmove, overlapping; a one-block write moves
        nothing), so its payload is one contiguous view from ``prp1``."""
        data = self._data
        for i in range(1, nb):
            data[prp1 + i * BLOCK: prp1 + (i + 1) * BLOCK] = data[prp1 + i * EXT: prp1 + i * EXT + BLOCK]
        return data[prp1: prp1 + nb * BLOCK]

    # -- stats ---------------------------------------------------------------------------

    def statistics(self) -> NvmeEndpointStats:
        base = super().statistics()
        return NvmeEndpointStats(**{f: getattr(base, f) for f in EndpointStats.__dataclass_fields__},
                                 guard_errors=self._n_guard, pi_errors=self._n_pi)

