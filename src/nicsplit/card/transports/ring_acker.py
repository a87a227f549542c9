"""The card's fast path on the ring transport: `RingAcker` takes SQ entries,
checks them, posts the ack on the CQ and copies each checked descriptor into
the handoff queue (`nicsplit.card.handoff`) for the pipeline worker; the
worker's side is `HandoffEndpoint`.

It owns what the host attaches to (the hidden volume, the doorbell and the
control socket, all from `RingEndpoint`) and keeps it across worker
restarts. Per entry it does what the inline `RingEndpoint.poll` does up to
the ack (field checks, payload range; the common WRITE's checks inline);
it builds no Python object per write. It works a *round* at a time (what
the SQ holds, up to ``max_entries``): the descriptors are read in bulk
(``iter_unpack``), the round's acks are published with one CQ_TAIL store,
and only then is the round handed to the worker (its descriptors copied a
run at a time, one PRODUCED store). At QD1 a round is one entry, as before;
in a burst the first ack waits for the round's checks (~1 µs an entry).

The payload checksum is not on the ack path: hashing a 1 MiB payload here
cost ~70 µs of every 1 MiB ack (issue 9, docs/benchmarks.md). The acker
checks the descriptor only (fields, seq, range, order, duplicates); the
pipeline worker verifies the payload against the descriptor's checksum when
it takes the write (`HandoffEndpoint.poll`), before anything is shipped, and
sends a mismatch to the lost log (the host marks and resyncs the region)
instead of shipping it.
"""

from __future__ import annotations

import collections
import os
from time import monotonic_ns
from itertools import chain

from nicsplit.core import failpoints as _fp
from nicsplit.card.handoff import H, NAPPING, REFUSED, SLEEPING, Handoff
from nicsplit.card.transports.ring_endpoint import RingEndpoint
from nicsplit.card.transports.ring_shared import (
    CQ_HEAD, DATA_HEAD, DATA_TAIL, FAILED, K_OUTCOME, K_WRITE, M32, OK, R_FULL, SQ_HEAD, SQ_TAIL,
    cqe_pack, desc_unpack, fence, reason_name,
)
from nicsplit.wire import ring as R

_FP = _fp.ACTIVE  # armed failpoints (nicsplit.core.failpoints): empty unless a test arms some

__all__ = ["RingAcker"]

_P, _C, _F = H.PRODUCED // 8, H.CONSUMED // 8, H.FLOOR // 8
_WSTATE, _FULL, _ACKED, _REF, _HFULL = H.WSTATE // 8, H.FULL // 8, H.ACKED // 8, H.REFUSED // 8, H.HANDOFF_FULL // 8
_DX = H.DATA_EXPECT // 8
_KB = int(R.Kind.BARRIER)


class RingAcker(RingEndpoint):
    """`RingEndpoint` whose consumer is the handoff queue (see module doc)."""

    def __init__(self, run_dir, *, handoff: Handoff, **kw) -> None:
        # verify_checksums is the worker's (HandoffEndpoint, from the same transport_options): never on the ack path
        kw.pop("verify_checksums", None)
        super().__init__(run_dir, verify_checksums=False, **kw)
        self.handoff = handoff
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK)  # inherited by the worker: its doorbell
        self._n_rings = 0
        self.blocked = False  # the last pump left entries in the SQ: no room in the handoff queue or the CQ
        # io_ids of payload writes handed off and not yet below the floor: a
        # second write with one of them is refused DUPLICATE (as the inline
        # endpoint does), never acked OK and then dropped by the worker.
        self._live: dict[int, int] = {}
        self._live_order: collections.deque[tuple[int, int]] = collections.deque()  # (position, io_id)

    def pump(self, max_entries: int = 256) -> int:
        """Ack up to ``max_entries`` SQ entries into the handoff queue;
        returns how many SQ entries were consumed."""
        c = self._ctr
        head = self._sq_head
        tail = c[SQ_TAIL]
        self.blocked = False
        if tail == head:
            return 0
        if tail - head == 1:  # QD1: one entry, the common case without the round's machinery
            n = self._pump_one(c, head)
            if n:
                return n
        avail = tail - head
        if avail > self._sq_n or avail < 0:
            self._warn("ring: host published sq_tail %d with sq_head %d: ignored", tail, head)
            return 0
        ho = self.handoff
        hc = ho.c
        produced = hc[_P]
        room = ho.n - (produced - hc[_F])
        if room <= 0:
            hc[_HFULL] += 1
            self.blocked = True
            return 0
        live, order = self._live, self._live_order
        floor = hc[_F]  # a live io_id below it is finished (pruned after the round's acks are out)
        full = self._full or hc[_FULL] == 1
        data_tail = c[DATA_TAIL]
        sq, cq = self._sq, self._cq
        slots, ends, flags, hmask = ho.slots, ho.ends, ho.flags, ho.mask
        cq_mask = self._cq_mask
        cq_tail = cq_tail0 = self._cq_tail
        cq_n, cq_room = self._cq_n, self._cq_n - (cq_tail - self._cq_head_c)
        size, expect = self._dsize, self._data_expect
        n = min(avail, max_entries, room)
        acked = refused = nbytes = 0
        barrier = False
        # The descriptors are read in bulk (iter_unpack over at most two runs
        # of SQ slots: the SQ wraps) and copied into the handoff queue a run
        # at a time (`copy`: a run breaks at a dropped entry, at either
        # queue's wrap and at the end); the acks of the round are published
        # with one CQ_TAIL store before any of its entries is handed off.
        sq_mask = self._sq_mask
        first = head & sq_mask
        last = first + n
        descs = (desc_unpack(sq, first << 6),) if n == 1 else desc_iter(sq[first << 6: last << 6]) \
            if last <= self._sq_n else chain(
            desc_iter(sq[first << 6:]), desc_iter(sq[: (last - self._sq_n) << 6]))
        run_sq = run_s = run_k = 0  # the pending copy: SQ slot, handoff slot, entries
        for (kind, wflags, dflags, status, length, io_id, cg_seq, cg_id, vdisk_id, voffset, ts, data_pos,
             csum, seq) in descs:
            i = head & sq_mask
            if run_k and not i:  # the SQ wraps: copy what is pending first
                slots[run_s << 6: (run_s + run_k) << 6] = sq[run_sq << 6: (run_sq + run_k) << 6]
                run_k = 0
            s = produced & hmask
            if kind == K_WRITE and seq == head & M32 and not (wflags & _BAD_WF or dflags & _BAD_DF or status) \
                    and length:  # `check_fields` inline for the common entry
                reason = 0
            elif kind == K_OUTCOME:
                if seq == head & M32 and status <= 1 and not (wflags or dflags or length or data_pos or csum):
                    reason = 0  # `check_fields` inline for a well-formed outcome
                else:
                    reason = R.check_fields(kind, wflags, dflags, status, length, data_pos, csum, seq, head)
                if reason:
                    self._n_bad += 1
                    self._warn("ring: bad outcome for io %d at %d: %s (dropped)", io_id, head,
                               reason_name(reason))
                    if run_k:
                        slots[run_s << 6: (run_s + run_k) << 6] = sq[run_sq << 6: (run_sq + run_k) << 6]
                        run_k = 0
                else:
                    self._n_outcomes += 1
                    if run_k and s == 0:  # the handoff queue wraps: copy what is pending first
                        slots[run_s << 6: (run_s + run_k) << 6] = sq[run_sq << 6: (run_sq + run_k) << 6]
                        run_k = 0
                    if not run_k:
                        run_sq, run_s = i, s
                    run_k += 1
                    ends[s] = 0
                    flags[s] = 0
                    produced += 1
                head += 1
                continue
            else:
                reason = R.check_fields(kind, wflags, dflags, status, length, data_pos, csum, seq, head)
                if kind == _KB:
                    barrier = True  # its PIT waits for the worker: ring a napping one (below)
            if not cq_room:
                self._cq_head_c = c[CQ_HEAD]
                cq_room = cq_n - (cq_tail - self._cq_head_c)
                if not cq_room:
                    self._n_cq_full += 1
                    self.blocked = True
                    break  # leave the rest in the SQ until the host drains the CQ
            if full and not reason:
                reason = R_FULL
            track = False
            if (not reason or reason == R_FULL) and kind == K_WRITE:
                # the payload: inside what the host published, right after the last accepted one,
                # not across the wrap (`RingEndpoint._check_payload`; its checksum is the worker's)
                if (expect <= data_pos and data_pos - expect < size and data_pos + length <= data_tail
                        and data_pos % size + length <= size):
                    track = True
                    if not reason and live and live.get(io_id, -1) >= floor:
                        reason = R_DUPLICATE
                else:
                    reason = R_BAD_RANGE
            cqe_pack(cq, (cq_tail & cq_mask) << 4, io_id, FAILED if reason else OK, reason, 0, cq_tail & M32)
            cq_tail += 1
            cq_room -= 1
            # A refused entry goes on too when its seq is real (its payload
            # space to free, or refused FULL): the worker's hold skips the seq.
            if track or not reason or reason == R_FULL:
                if run_k and s == 0:
                    slots[run_s << 6: (run_s + run_k) << 6] = sq[run_sq << 6: (run_sq + run_k) << 6]
                    run_k = 0
                if not run_k:
                    run_sq, run_s = i, s
                run_k += 1
                if track:
                    expect = ends[s] = data_pos + length
                    if not reason:
                        live[io_id] = produced
                        order.append((produced, io_id))
                else:
                    ends[s] = 0
                flags[s] = REFUSED if reason else 0
                produced += 1
            elif run_k:  # dropped: the copy run ends here
                slots[run_s << 6: (run_s + run_k) << 6] = sq[run_sq << 6: (run_sq + run_k) << 6]
                run_k = 0
            if reason:
                refused += 1
                if length and self.on_refused is not None:
                    self.on_refused(io_id, vdisk_id, voffset, length, reason_name(reason))
                if reason == R_FULL:
                    self._n_refused_full += 1
                else:
                    self._n_bad += 1
                    self._warn("ring: refused io %d at %d (kind %d, %d bytes at %d): %s", io_id, head, kind,
                               length, data_pos, reason_name(reason))
            else:
                acked += 1
                if kind == K_WRITE:
                    nbytes += length
            head += 1
        if cq_tail != cq_tail0:
            self._cq_tail = cq_tail
            c[CQ_TAIL_I] = cq_tail  # the round's acks are out before any of its entries is handed off
            self._wake_host()
            if _FP:
                _fp.hit("card.acker.after-ack")  # acked, not yet in the handoff queue
        if run_k:  # the last run's copy (not a publication: PRODUCED below is) after the acks
            slots[run_s << 6: (run_s + run_k) << 6] = sq[run_sq << 6: (run_sq + run_k) << 6]
        while order and order[0][0] < floor:  # io_ids below the floor are no longer live
            pos0, io0 = order.popleft()
            if live.get(io0) == pos0:
                del live[io0]
        consumed = head - self._sq_head
        self._sq_head = head
        self._data_expect = expect
        c[SQ_HEAD] = head
        self._n_entries += consumed
        if acked:
            hc[_ACKED] += acked
            self._n_writes += acked
            self._n_bytes += nbytes
        if refused:
            hc[_REF] += refused
        if produced != hc[_P]:
            hc[_DX] = expect
            hc[_P] = produced
            fence()  # PRODUCED visible before we read the worker's state (Dekker)
            ws = hc[_WSTATE]
            if ws == SLEEPING or (barrier and ws == NAPPING):
                # A napping worker takes writes at its nap's end; a barrier
                # (bookmark, verify, failover) closes its batch now.
                self._n_rings += 1
                os.eventfd_write(self.wake_fd, 1)
        return consumed

    def _pump_one(self, c, head: int) -> int:
        """`pump` of a lone well-formed WRITE or OUTCOME at ``head`` that the
        round would accept (room in the handoff queue and the CQ, the card
        not full, the payload where expected, no live duplicate): the same
        stores in the same order as `pump`'s round of one (ack, CQ_TAIL, the
        slot's copy, pruning, SQ_HEAD, counters, PRODUCED, the worker's
        doorbell), with none of the round's set-up. Returns 1, or 0 having
        changed nothing (anything else: `pump` handles it)."""
        ho = self.handoff
        hc = ho.c
        produced = hc[_P]
        floor = hc[_F]
        if produced - floor >= ho.n:
            return 0
        off = (head & self._sq_mask) << 6
        sq = self._sq
        (kind, wflags, dflags, status, length, io_id, _cg_seq, _cg_id, _vd, _vo, _ts, data_pos, csum,
         seq) = desc_unpack(sq, off)
        if seq != head & M32:
            return 0
        if kind == K_WRITE:
            if wflags & _BAD_WF or dflags & _BAD_DF or status or not length or self._full or hc[_FULL] == 1:
                return 0
            cq_tail = self._cq_tail
            if cq_tail - self._cq_head_c >= self._cq_n:
                return 0
            expect, size = self._data_expect, self._dsize
            if not (expect <= data_pos and data_pos - expect < size and data_pos + length <= c[DATA_TAIL]
                    and data_pos % size + length <= size):
                return 0
            live = self._live
            if live and live.get(io_id, -1) >= floor:
                return 0
            cqe_pack(self._cq, (cq_tail & self._cq_mask) << 4, io_id, OK, 0, 0, cq_tail & M32)
            cq_tail += 1
            self._cq_tail = cq_tail
            c[CQ_TAIL_I] = cq_tail  # the ack is out before the entry is handed off
            self._wake_host()
            if _FP:
                _fp.hit("card.acker.after-ack")
            s = produced & ho.mask
            ho.slots[s << 6: (s + 1) << 6] = sq[off: off + 64]
            expect = ho.ends[s] = data_pos + length
            ho.flags[s] = 0
            live[io_id] = produced
            self._live_order.append((produced, io_id))
            self._data_expect = expect
            hc[_ACKED] += 1
            self._n_writes += 1
            self._n_bytes += length
        elif kind == K_OUTCOME:
            if status > 1 or wflags or dflags or length or data_pos or csum:
                return 0
            self._n_outcomes += 1
            s = produced & ho.mask
            ho.slots[s << 6: (s + 1) << 6] = sq[off: off + 64]
            ho.ends[s] = 0
            ho.flags[s] = 0
        else:
            return 0
        order = self._live_order
        while order and order[0][0] < floor:  # io_ids below the floor are no longer live
            pos0, io0 = order.popleft()
            if self._live.get(io0) == pos0:
                del self._live[io0]
        head += 1
        self._sq_head = head
        c[SQ_HEAD] = head
        self._n_entries += 1
        hc[_DX] = self._data_expect
        hc[_P] = produced + 1
        fence()  # PRODUCED visible before we read the worker's state (Dekker)
        if hc[_WSTATE] == SLEEPING:
            self._n_rings += 1
            os.eventfd_write(self.wake_fd, 1)
        return 1

    def wait_entries(self, deadline_ns: int) -> bool:
        """The acker's spin: poll SQ_TAIL alone until the host publishes or
        ``monotonic_ns()`` passes ``deadline_ns``; True if entries wait. One
        counter read and one clock read a poll (~0.2 µs) instead of a whole
        loop round (~2 µs), so a QD1 write is seen within a fraction of a µs."""
        c, head, clock = self._ctr, self._sq_head, monotonic_ns
        while c[SQ_TAIL_I] == head:
            if clock() > deadline_ns:
                return False
        return True

    def count_sleep(self, woken: bool) -> None:
        """The acker's loop slept on the doorbell (woken: by a ring)."""
        self._n_sleeps += 1
        self._n_wakeups += woken

    def _store_counters(self) -> None:
        super()._store_counters()
        hc = self.handoff.c
        hc[H.REFUSED_FULL // 8] = self._n_refused_full
        hc[H.CQ_FULL // 8] = self._n_cq_full
        hc[H.HOST_PID // 8] = self.host_pid
        hc[H.BAD // 8] = self._n_bad
        hc[H.RINGS // 8] = self._n_rings

    def set_data_head(self, end: int) -> None:
        """The handoff floor moved: payload space up to ``end`` is free."""
        if end > self._ctr[DATA_HEAD]:
            self._ctr[DATA_HEAD] = end

    def fill(self) -> float:
        return (self._data_expect - self._ctr[DATA_HEAD]) / self._dsize

    def close(self) -> None:
        super().close()
        os.close(self.wake_fd)


CQ_TAIL_I = R.Counter.CQ_TAIL.value
SQ_TAIL_I = R.Counter.SQ_TAIL.value
desc_iter = R.DESC.iter_unpack  # SQ slots are DESC.size (64) bytes apart
assert R.DESC.size == 64
# `check_fields`' common case inline: flag bits a WRITE may carry
_BAD_WF = ~0x03 & 0xFF  # records.WFlag.FUA | GAP (wire/ring.py _KNOWN_WFLAGS)
_BAD_DF = ~int(R.DescFlag.CSUM) & 0xFF
R_DUPLICATE, R_BAD_RANGE = int(R.AckReason.DUPLICATE), int(R.AckReason.BAD_RANGE)
