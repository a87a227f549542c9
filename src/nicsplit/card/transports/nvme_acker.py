"""The card's fast path on the nvme-pi transport: `NvmeAcker` takes NVMe
commands from the SQ, checks them and their protection information,
completes them on the CQ and hands each accepted one to the pipeline worker
through the handoff queue (`nicsplit.card.handoff`), as `RingAcker` does for
the ring. With it the nvme-pi card runs as two processes like the ring's
(`nicsplit.card.fastpath`): no batch, compression, seal or TLS write of the
pipeline ever delays a completion.

Per command, in submission order (the checks are `NvmePiEndpoint`'s, the
same code):

1. check it (a Write's PI guard, tags and range: `NvmePiEndpoint._check_write`);
2. post its completion (status 0 or the first check that failed) and store
   the CQ position;
3. an accepted Write: drop its PI (the data of blocks 1.. moves down over
   the PI before it), so the payload is one contiguous view of the hidden
   volume at ``data_pos``;
4. write a ring descriptor (`nicsplit.wire.ring.DESC`) for it into the
   handoff slot: the worker's `HandoffEndpoint` reads nvme-pi writes exactly
   as ring writes (``transport = "nvme-pi"`` only tells it where payload
   positions wrap). The payload's end goes in the slot's ``ends``: the
   handoff floor frees namespace blocks in order, and moves ``DATA_HEAD``,
   which is where the host learns that space is free, as it does inline.

A refused Write whose blocks were in range goes into the handoff queue
flagged REFUSED: its blocks are freed in order and hold skips its seq; it is
reported to the lost log (``on_refused``) first, as on the ring. A command
with no blocks of its own that was refused NOT READY (the card is full)
goes in REFUSED too, since its seq is real. A duplicate io_id among the
writes not finished is refused with Command ID Conflict (the inline
endpoint's rule, the ring acker's live set).

The guard and PI error counts go to the handoff header (`H.GUARD_ERRORS`,
`H.PI_ERRORS`) so the worker reports them (``card_transport`` in status).

Not one Python object per command beyond the unpacked fields, as on the
ring; a round's completions are published one by one (the Phase Tag of each
is its publication) and CQ_TAIL once per round.
"""

from __future__ import annotations

import os

from nicsplit.card.handoff import H, NAPPING, REFUSED, SLEEPING
from nicsplit.card.transports.nvme_endpoint import NvmePiEndpoint, status_name
from nicsplit.card.transports.ring_acker import RingAcker
from nicsplit.card.transports.ring_shared import CQ_HEAD, CQ_TAIL, DATA_HEAD, K_OUTCOME, SQ_HEAD, SQ_TAIL, fence
from nicsplit.wire import nvme as N
from nicsplit.wire import ring as R

__all__ = ["NvmeAcker"]

S = N.Status
_OK, _FIELD, _OPCODE, _CID = 0, int(S.INVALID_FIELD), int(S.INVALID_OPCODE), int(S.CID_CONFLICT)
_NOT_READY, _GUARD = int(S.NS_NOT_READY), int(S.GUARD_CHECK)
_PI_STATUSES = frozenset((int(S.APP_TAG_CHECK), int(S.REF_TAG_CHECK), int(S.INVALID_PI)))
_O_WRITE, _O_OUTCOME = int(N.Opc.WRITE), int(N.Opc.OUTCOME)
# the ring descriptor kind of each command that carries no data
_NODATA_KIND = {int(N.Opc.WRITE_ZEROES): int(R.Kind.ZERO), int(N.Opc.DSM): int(R.Kind.TRIM),
                int(N.Opc.FLUSH): int(R.Kind.BARRIER)}
_K_WRITE = int(R.Kind.WRITE)
_K_BARRIER = int(R.Kind.BARRIER)
_P, _C, _F = H.PRODUCED // 8, H.CONSUMED // 8, H.FLOOR // 8
_WSTATE, _FULL, _ACKED, _REF, _HFULL = H.WSTATE // 8, H.FULL // 8, H.ACKED // 8, H.REFUSED // 8, H.HANDOFF_FULL // 8
_DX, _GE, _PE = H.DATA_EXPECT // 8, H.GUARD_ERRORS // 8, H.PI_ERRORS // 8
sqe_unpack = N.SQE.unpack_from
cqe14_pack = N.CQE14.pack_into
desc_pack = R.DESC.pack_into


class NvmeAcker(NvmePiEndpoint, RingAcker):
    """`NvmePiEndpoint` whose consumer is the handoff queue (module doc).
    `RingAcker` gives it the handoff, the worker's doorbell, the spin
    (`wait_entries`), the counters and `set_data_head`."""

    def pump(self, max_entries: int = 256) -> int:
        """Complete up to ``max_entries`` commands into the handoff queue;
        returns how many SQ entries were consumed."""
        c = self._ctr
        head = self._sq_head  # a slot index, like the doorbell
        tail = c[SQ_TAIL]
        self.blocked = False
        if tail == head:
            return 0
        sq_mask = self._sq_mask
        if tail > sq_mask:
            self._warn("nvme-pi: host rang the SQ Tail doorbell with %d (queue of %d): ignored", tail, self._sq_n)
            return 0
        ho = self.handoff
        hc = ho.c
        produced = hc[_P]
        floor = hc[_F]
        room = ho.n - (produced - floor)
        if room <= 0:
            hc[_HFULL] += 1
            self.blocked = True
            return 0
        full = self._full or hc[_FULL] == 1  # the worker asks for refusals (FULL in the handoff header)
        avail = (tail - head) & sq_mask
        sq, cq, cq16 = self._sq, self._cq, self._cq16
        cq_mask, cq_full = self._cq_mask, self._cq_n - 1
        cq_tail, phase = self._cq_tail, self._cq_phase
        slots, ends, flags, hmask = ho.slots, ho.ends, ho.flags, ho.mask
        live, order = self._live, self._live_order
        data_head = c[DATA_HEAD]
        n = min(avail, max_entries, room)
        consumed = acked = refused = nbytes = 0
        barrier = False
        while consumed < n:
            if ((cq_tail - self._cq_head_c) & cq_mask) >= cq_full:
                self._cq_head_c = c[CQ_HEAD]
                if ((cq_tail - self._cq_head_c) & cq_mask) >= cq_full:
                    self._n_cq_full += 1
                    self.blocked = True
                    break  # the rest waits in the SQ until the host consumes completions
            (opc, _fuse, cid, nsid, cg_id, length, io_id, prp1, cg_seq, slba, cdw12, cdw13,
             ts) = sqe_unpack(sq, head << 6)
            head = (head + 1) & sq_mask
            consumed += 1
            vdisk, voffset = slba, prp1
            end = -1  # the Write's blocks' end (>= 0: the card frees them, in order)
            kind = 0
            if opc == _O_WRITE:
                status, vdisk, voffset, end = self._check_write(nsid, length, prp1, slba, cdw12, cdw13, data_head,
                                                                 full)
                if not status and live and live.get(io_id, -1) >= floor:
                    status = _CID
                kind = _K_WRITE
            elif opc == _O_OUTCOME:
                status = _FIELD if nsid or length or cdw12 or cdw13 > 1 or prp1 or slba else _OK
            elif opc in _NODATA_KIND:
                kind = _NODATA_KIND[opc]
                if nsid != N.NSID or cdw12 & ~N.FUA or cdw13 & ~0x30000 or (opc == N.Opc.FLUSH) != (length == 0):
                    status = _FIELD
                else:
                    status = _NOT_READY if full else _OK
                    barrier = barrier or kind == _K_BARRIER  # its PIT waits for the worker: ring a napping one
            else:
                status = _OPCODE
            off = (cq_tail & cq_mask) << 4
            cqe14_pack(cq, off, 0, 0, head, 1, cid)
            cq16[(off >> 1) + 7] = (status << 1) | phase  # the completion is out before the next command
            cq_tail += 1
            if not cq_tail & cq_mask:
                phase ^= 1
            s = produced & hmask
            if opc == _O_OUTCOME:
                if status:
                    self._n_bad += 1
                    self._warn("nvme-pi: bad outcome command for io %d (CID %d): dropped", io_id, cid)
                    continue
                self._n_outcomes += 1
                desc_pack(slots, s << 6, K_OUTCOME, 0, 0, cdw13, 0, io_id, 0, 0, 0, 0, 0, 0, 0, 0)
                ends[s] = 0
                flags[s] = 0
                produced += 1
                continue
            if end >= 0:
                self._data_expect = end
            if status:
                refused += 1
                if length and self.on_refused is not None:
                    self.on_refused(io_id, vdisk, voffset, length, status_name(status))
                if end >= 0 or status == _NOT_READY:  # its seq is real (and its blocks to free): hold skips it
                    desc_pack(slots, s << 6, kind, 0, 0, 0, length, io_id, cg_seq, cg_id, vdisk, voffset, ts,
                              0, 0, 0)
                    ends[s] = end if end >= 0 else 0
                    flags[s] = REFUSED
                    produced += 1
                if status == _NOT_READY:
                    self._n_refused_full += 1
                else:
                    self._n_bad += 1
                    if status == _GUARD:
                        self._n_guard += 1
                        hc[_GE] += 1
                    elif status in _PI_STATUSES:
                        self._n_pi += 1
                        hc[_PE] += 1
                    self._warn("nvme-pi: refused io %d (CID %d, opcode %02xh, %d bytes, vdisk %d at %d): %s", io_id,
                               cid, opc, length, vdisk, voffset, status_name(status))
                continue
            acked += 1
            data_pos = 0
            if kind == _K_WRITE:
                self._drop_pi(prp1, (cdw12 & 0xFFFF) + 1)
                data_pos = end - ((cdw12 & 0xFFFF) + 1) * N.EXT + (cdw13 & 0xFFFF)  # the block's position + head
                ends[s] = end
                live[io_id] = produced
                order.append((produced, io_id))
                nbytes += length
            else:
                ends[s] = 0
            desc_pack(slots, s << 6, kind, cdw13 >> 16, 0, 0, length, io_id, cg_seq, cg_id, vdisk, voffset, ts,
                      data_pos, 0, 0)
            flags[s] = 0
            produced += 1
        while order and order[0][0] < floor:  # io_ids below the floor are no longer live
            pos0, io0 = order.popleft()
            if live.get(io0) == pos0:
                del live[io0]
        if consumed:
            self._sq_head = head
            self._cq_tail, self._cq_phase = cq_tail, phase
            c[SQ_HEAD] = head
            c[CQ_TAIL] = cq_tail  # free-running, for a host that attaches later (wire/nvme.py rule 1)
            self._wake_host()
            self._n_entries += consumed
        if acked:
            hc[_ACKED] += acked
            self._n_writes += acked
            self._n_bytes += nbytes
        if refused:
            hc[_REF] += refused
        if produced != hc[_P]:
            hc[_DX] = self._data_expect
            hc[_P] = produced
            fence()  # PRODUCED visible before we read the worker's state (Dekker)
            ws = hc[_WSTATE]
            if ws == SLEEPING or (barrier and ws == NAPPING):  # a barrier closes its batch now, not at the nap's end
                self._n_rings += 1
                os.eventfd_write(self.wake_fd, 1)
        return consumed
