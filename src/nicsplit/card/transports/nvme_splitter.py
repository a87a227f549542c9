"""Host half of the nvme-pi transport: `NvmePiSplitter`, used by the
splitter filter like `RingSplitter` (whose set-up, health, tracker table,
late/abandoned verdicts and close it inherits). The protocol is in
`nicsplit.card.transports.nvme_pi`, the layout in `nicsplit.wire.nvme`.

What differs from the ring, per write:

1. room: an SQ slot (full at entries-1, the card's head learnt from SQHD)
   and ``nb`` contiguous extended blocks in the hidden namespace;
2. each block's data is copied and its PI packed: Guard = CRC-16/T10-DIF of
   the block's 4096 data bytes, Application Tag = vdisk id, Reference Tag =
   virtual LBA; the command is a Write (01h) with PRACT = 0, PRCHK = guard;
3. the SQ Tail doorbell gets the new slot index; the eventfd only if the
   card sleeps (as the ring);
4. the verdict is the completion whose CID is the command's slot, found by
   its Phase Tag; a non-zero status (e.g. 282h, End-to-end Guard Check
   Error) is a refusal: ``split`` returns False and the filter marks.

No reservations (``reserve`` returns None): a payload received in place
would need its PI written around it block by block; the copy path is used.

``fault_after_pi`` (tests only, fault injection production opts into): when
set, it is called with (data area, byte offset of the first block, blocks)
after the PI is written and before the command is published, so a test can
corrupt a data byte the guard already covers. Across processes the
failpoint ``host.nvme-pi.after-pi`` does the same: its ``error`` action
flips the write's first payload byte (docs/faults.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from time import monotonic_ns
from typing import Callable

from nicsplit.card.transports.base import TransportUnavailable
from nicsplit.core import failpoints as _fp
from nicsplit.card.transports.ring_shared import (
    CQ_HEAD, CQ_TAIL, DATA_TAIL, K_WRITE, M32, SLEEPING, SQ_HEAD, SQ_TAIL, STATE, fence,
)
from nicsplit.card.transports.ring_splitter import RingSplitter, RingStats
from nicsplit.card.transports.ring_splitter import TRACK_ABANDONED as _ABANDONED
from nicsplit.card.transports.ring_splitter import TRACK_LATE as _LATE
from nicsplit.card.transports.ring_splitter import TRACK_WAITING as _WAITING
from nicsplit.core.records import AugmentedWrite, Status
from nicsplit.wire import nvme as N
from nicsplit.wire.crc16 import crc16_t10dif

__all__ = ["NvmePiSplitter", "NvmeStats"]

BLOCK, EXT, LBADS, NSID = N.BLOCK, N.EXT, N.LBADS, N.NSID
_OPC = {1: N.Opc.WRITE, 2: N.Opc.WRITE_ZEROES, 3: N.Opc.DSM, 4: N.Opc.FLUSH}  # records.Op -> opcode
_O_OUTCOME = int(N.Opc.OUTCOME)
_GUARD = int(N.Status.GUARD_CHECK)
_PI_ERRORS = frozenset(int(s) for s in (N.Status.APP_TAG_CHECK, N.Status.REF_TAG_CHECK, N.Status.INVALID_PI))
_FP = _fp.ACTIVE  # armed failpoints (nicsplit.core.failpoints): empty unless a test arms some
_OUTCOME_CID = -1  # a CID table entry for an outcome command: its completion is consumed silently
sqe_pack = N.SQE.pack_into
cqe14_unpack = N.CQE14.unpack_from
pi_pack = N.PI.pack_into


@dataclass(frozen=True, slots=True)
class NvmeStats(RingStats):
    guard_errors: int = 0  # completions with 282h End-to-end Guard Check Error
    pi_errors: int = 0  # completions with another PI error (tag check, invalid PI)
    refused_status: int = 0  # the last non-zero status (SCT << 8 | SC) a completion carried


class NvmePiSplitter(RingSplitter):
    """Host half of the nvme-pi transport (see module docstring)."""

    TRANSPORT = "nvme-pi"

    def __init__(self, sock, hv, doorbell: int, card_pid: int, **kw) -> None:
        kw["checksum"] = False  # the guard is the checksum
        super().__init__(sock, hv, doorbell, card_pid, **kw)
        g = hv.geometry
        if g.sq_entries > N.MAX_QUEUE or g.cq_entries > N.MAX_QUEUE:
            self.close()
            raise TransportUnavailable(f"nvme-pi queues hold at most {N.MAX_QUEUE} entries, the card has "
                                       f"{g.sq_entries}/{g.cq_entries}")
        self._nsze = N.namespace_blocks(g.data_size)
        self._dsize = self._nsze * EXT  # payload positions wrap at the namespace's end
        c = self._ctr
        # Doorbells hold slot indexes; internally the positions run free (rule 1 of wire/nvme.py).
        sqt = c[SQ_TAIL] & self._sq_mask
        self._sq_tail = sqt
        self._sq_head_c = sqt - ((sqt - c[SQ_HEAD]) & self._sq_mask)
        self._cq_n = g.cq_entries
        cqt = c[CQ_TAIL]  # the card's free-running CQ position
        self._cq_head = cqt - ((cqt - c[CQ_HEAD]) & self._cq_mask)
        self._cq_phase = N.phase_of(self._cq_head, self._cq_n)
        self._cq16 = self._cq.cast("H")
        self._cid_io: list[int] = [_OUTCOME_CID] * g.sq_entries  # CID (= SQ slot) -> io_id
        self._n_guard = self._n_pi = self._last_status = 0
        self.fault_after_pi: Callable[[memoryview, int, int], None] | None = None

    def reserve(self, length: int) -> None:
        """No reservations on this transport (module docstring): the copy path."""
        return None

    # -- the hot path ------------------------------------------------------------

    def submit(self, w: AugmentedWrite) -> bool:
        if not self._live(monotonic_ns()):
            return False
        tail = self._sq_tail
        if self._sq_full(tail):
            return False
        io_id = w.io_id
        if io_id in self._inflight:
            return self._invalid_record(w, "io_id already in flight")
        op, length, slot = w.op, w.length, tail & self._sq_mask
        flags = int(w.flags)  # one conversion: & on an IntFlag builds a new enum member each time
        end = 0
        if op == K_WRITE:
            payload = w.data
            if payload is None or len(payload) != length or not length:
                return self._invalid_record(w, "WRITE payload missing or not `length` bytes")
            vdisk, voff = w.vdisk_id, w.voffset
            head, vlba = voff & (BLOCK - 1), voff >> LBADS
            nb = (head + length + BLOCK - 1) >> LBADS
            if vdisk > N.MAX_VDISK_ID or vlba + nb - 1 > N.MAX_VLBA or nb > 0x10000:
                return self._invalid_record(w, "vdisk id above FFFEh, virtual LBA above 32 bits or more than "
                                               "65536 blocks: not expressible in 16b Guard PI")
            place = self._place(nb * EXT)
            if place is None:
                self._full_data += 1
                return False
            pos, off, end = place
            self._fill_blocks(payload, off, head, length, nb, vdisk, vlba)
            if self.fault_after_pi is not None:
                self.fault_after_pi(self._data, off, nb)
            elif _FP:
                self._failpoint_corrupt(off, head)
            try:
                sqe_pack(self._sq, slot << 6, 1, 0, slot, NSID, w.cg_id, length, io_id, off, w.cg_seq,
                         off // EXT, (nb - 1) | N.PRCHK_GUARD | (N.FUA if flags & 1 else 0),
                         head | (flags << 16), w.timestamp_ns)
            except Exception as e:  # struct.error: a field out of range (caller bug)
                return self._invalid_record(w, str(e))
        else:
            try:
                sqe_pack(self._sq, slot << 6, _OPC[op], 0, slot, NSID, w.cg_id, length, io_id, w.voffset,
                         w.cg_seq, w.vdisk_id, N.FUA if flags & 1 else 0, flags << 16, w.timestamp_ns)
            except Exception as e:  # struct.error or KeyError: not encodable (caller bug)
                return self._invalid_record(w, str(e))
        self._cid_io[slot] = io_id
        if end:
            self._data_tail = end
            if end > self._rtail:
                self._rtail = end
            self._ctr[DATA_TAIL] = end
            self.last_position = end
            self._bytes += length
        else:
            self.last_position = self._data_tail + 1  # as the ring: durable once a later payload is released
        self._inflight[io_id] = _WAITING
        self._submitted += 1
        self._publish(tail + 1)
        return True

    def _failpoint_corrupt(self, off: int, head: int) -> None:
        """The failpoint ``host.nvme-pi.after-pi``: its ``error`` action here
        means "corrupt one payload byte the guard already covers" (the card
        must complete the Write 282h and the filter mark); kill / stop / delay
        act as anywhere else."""
        try:
            _fp.hit("host.nvme-pi.after-pi")
        except OSError:
            self._data[off + head] ^= 0x01

    def _fill_blocks(self, payload, off: int, head: int, length: int, nb: int, vdisk: int, vlba: int) -> None:
        """Copy the payload into ``nb`` extended blocks at ``off`` and write each block's PI."""
        data = self._data
        if nb == 1:
            data[off + head: off + head + length] = payload
            pi_pack(data, off + BLOCK, crc16_t10dif(data[off: off + BLOCK]), vdisk, vlba)
            return
        src = payload if isinstance(payload, memoryview) else memoryview(payload)
        s, o, b0 = 0, off, head
        for i in range(nb):
            n = BLOCK - b0 if length - s > BLOCK - b0 else length - s
            data[o + b0: o + b0 + n] = src[s: s + n]
            s += n
            pi_pack(data, o + BLOCK, crc16_t10dif(data[o: o + BLOCK]), vdisk, (vlba + i) & M32)
            o += EXT
            b0 = 0

    def _sq_full(self, tail: int) -> bool:
        """True (and counted) if the SQ holds entries-1 commands (NVMe's full
        condition) even after reaping the completions that tell the card's head."""
        if tail - self._sq_head_c >= self._sq_n - 1:
            self.reap()
            if tail - self._sq_head_c >= self._sq_n - 1:
                self._full_sq += 1
                return True
        return False

    def _publish(self, tail: int) -> None:
        """Ring the SQ Tail doorbell (slot index) and wake the card if it sleeps."""
        self._sq_tail = tail
        self._ctr[SQ_TAIL] = tail & self._sq_mask
        fence()
        if self._ctr[STATE] == SLEEPING:
            self._ring()

    def _new_completion(self) -> bool:
        return (self._cq16[((self._cq_head & self._cq_mask) << 3) + 7] & 1) == self._cq_phase

    _completion_pending = _new_completion  # `arm_wake`'s look: by phase tag, not CQ_TAIL

    def wait_ack(self, io_id: int, deadline_ns: int) -> bool:
        """Spin until ``io_id``'s completion arrives or ``deadline_ns`` passes
        (then False, and a late completion is recognised and dropped)."""
        done = self._done.pop(io_id, None) if self._done else None
        if done is not None:
            return done
        cq16, mask = self._cq16, self._cq_mask
        while True:
            if (cq16[((self._cq_head & mask) << 3) + 7] & 1) == self._cq_phase:
                got = self._drain(0, io_id)
                if got is not None:
                    return got
            if monotonic_ns() > deadline_ns:
                return self._timed_out(io_id)
            self._spins += 1

    def poll_ack(self, io_id: int) -> bool | None:
        self.reap()
        return self.take_ack(io_id)

    def reap(self) -> None:
        if self._new_completion():
            self._drain(0, -1)

    def _drain(self, _ctail: int, want: int) -> bool | None:
        """Consume every new completion (by phase); the verdict for ``want`` if seen."""
        cq, cq16, mask = self._cq, self._cq16, self._cq_mask
        head, phase = self._cq_head, self._cq_phase
        inflight, cid_io = self._inflight, self._cid_io
        sq_mask, n_sq = self._sq_mask, self._sq_n
        got = None
        while True:
            slot = head & mask
            word = cq16[(slot << 3) + 7]
            if (word & 1) != phase:
                break
            _dw0, _dw1, sqhd, _sqid, cid = cqe14_unpack(cq, slot << 4)
            head += 1
            if not head & mask:
                phase ^= 1
            if sqhd < n_sq:
                h = self._sq_tail - ((self._sq_tail - sqhd) & sq_mask)
                if h > self._sq_head_c:
                    self._sq_head_c = h
            status = word >> 1
            io_id = cid_io[cid] if cid < n_sq else _OUTCOME_CID
            if io_id == _OUTCOME_CID:
                if status:
                    self._warn("nvme-pi: card refused an outcome command (CID %d): status %03xh", cid, status)
                continue
            state = inflight.pop(io_id, None)
            if state is None:
                self._unknown += 1
                self._warn("nvme-pi: completion for unknown io %d (CID %d)", io_id, cid)
                continue
            ok = status == 0
            if not ok:
                self._last_status = status
                if status == _GUARD:
                    self._n_guard += 1
                elif status in _PI_ERRORS:
                    self._n_pi += 1
            if state == _ABANDONED:
                self._late += 1
                self._n_abandoned -= 1
                continue
            if ok:
                self._acked += 1
            else:
                self._rejected += 1
                self._warn("nvme-pi: card refused io %d: status %03xh (%s)", io_id, status, _status_name(status))
            if state == _LATE:
                self._late += 1
                self._n_late -= 1
                self._late_verdicts.append((io_id, ok))
            elif io_id == want:
                got = ok
            else:
                self._done[io_id] = ok
        if head != self._cq_head:
            self._cq_head, self._cq_phase = head, phase
            self._ctr[CQ_HEAD] = head & mask  # the CQ Head doorbell
        return got

    # -- outcomes ------------------------------------------------------------------

    def post_outcome(self, io_id: int, status: Status) -> bool:
        if self._dead:
            return False
        tail = self._sq_tail
        if self._sq_full(tail):
            return False
        slot = tail & self._sq_mask
        sqe_pack(self._sq, slot << 6, _O_OUTCOME, 0, slot, 0, 0, 0, io_id, 0, 0, 0, 0, int(status), 0)
        self._cid_io[slot] = _OUTCOME_CID
        self._outcomes += 1
        self._publish(tail + 1)
        return True

    def statistics(self) -> NvmeStats:
        base = super().statistics()
        return NvmeStats(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)},
                         guard_errors=self._n_guard, pi_errors=self._n_pi, refused_status=self._last_status)


def _status_name(status: int) -> str:
    try:
        return N.Status(status).name
    except ValueError:
        return "unknown"

