"""The card's fast path on the shadow transport: `ShadowAcker` is the ring's
acker (`ring_acker.RingAcker`: fake halves checked, acked, handed off) that
also serves the emulated device queue (`shadow_device.CardDevice`): it writes
each real half to its volume file, posts the completion the host's writer
waits for, and hands the write's ``Outcome(COMMITTED)`` to the pipeline
worker as an OUTCOME slot flagged `REAL_HALF`.

Why here and not in the worker: the host's datastore write (the real half)
waits for the device's completion, i.e. for a round of whatever loop serves
the device. The inline card served it between pipeline rounds (batching,
compression, sealing, shipping), which put a whole round on every real
write; the acker does nothing heavy, spins briefly and wakes on the ring's
doorbell (the host's device rings it too), as it does for acks.

The worker (`ring_handoff.HandoffEndpoint` with ``transport="shadow"``)
counts the halves as they meet (`shadow_match.HalfMatcher`); the device's
error and byte counts go to the handoff header (`H.DEV_ERRORS`,
`H.DEV_BYTES`) with the acker's other statistics.

Room: a real half is taken from the device queue only while the handoff
queue has a slot for its outcome, so no completed real half loses its
outcome (its fake half would be orphaned, and its region resynced).
"""

from __future__ import annotations

import os
from time import monotonic_ns

from nicsplit.card.handoff import H, REAL_HALF, SLEEPING
from nicsplit.card.transports.ring_acker import SQ_TAIL_I, RingAcker
from nicsplit.card.transports.ring_shared import K_OUTCOME, desc_pack, fence
from nicsplit.card.transports.shadow_endpoint import ShadowEndpoint
from nicsplit.wire import shadow as S

__all__ = ["ShadowAcker"]

_P, _F, _WSTATE, _HFULL = H.PRODUCED // 8, H.FLOOR // 8, H.WSTATE // 8, H.HANDOFF_FULL // 8
_DEV_TAIL = int(S.Counter.SQ_TAIL)


class ShadowAcker(ShadowEndpoint, RingAcker):
    """`RingAcker` that serves the shadow device queue (see module doc)."""

    def pump(self, max_entries: int = 256) -> int:
        # The device first: a host writer waits for each real half's
        # completion; nobody waits for a fake half's ack.
        n = self._serve_device(max_entries) if self._dev.pending() else 0
        blocked = self.blocked
        m = super().pump(max_entries)
        self.blocked = self.blocked or blocked
        return n + m

    def _serve_device(self, max_entries: int) -> int:
        """Write up to ``max_entries`` device entries (as many as the handoff
        queue has slots for) and hand off their outcomes; returns how many
        device entries were consumed."""
        ho = self.handoff
        hc = ho.c
        produced = hc[_P]
        room = ho.n - (produced - hc[_F])
        self.blocked = False
        if room <= 0:
            hc[_HFULL] += 1
            self.blocked = True
            return 0
        dev = self._dev
        head0 = dev.head
        done = dev.poll(min(max_entries, room))
        slots, ends, flags, mask = ho.slots, ho.ends, ho.flags, ho.mask
        for io_id, status in done:
            if status:
                continue  # the host writes it itself and posts FAILED for the fake half
            s = produced & mask
            desc_pack(slots, s << 6, K_OUTCOME, 0, REAL_HALF, 0, 0, io_id, 0, 0, 0, 0, 0, 0, 0, 0)
            ends[s] = 0
            flags[s] = 0
            produced += 1
        if produced != hc[_P]:
            hc[_P] = produced
            fence()  # PRODUCED visible before we read the worker's state (Dekker)
            if hc[_WSTATE] == SLEEPING:
                self._n_rings += 1
                os.eventfd_write(self.wake_fd, 1)
        return dev.head - head0

    def wait_entries(self, deadline_ns: int) -> bool:
        """The acker's spin, on the ring's SQ_TAIL and the device's."""
        c, head, clock = self._ctr, self._sq_head, monotonic_ns
        dc, dhead = self._dev.mem.counters, self._dev.head
        while c[SQ_TAIL_I] == head and dc[_DEV_TAIL] == dhead:
            if clock() > deadline_ns:
                return False
        return True

    def _store_counters(self) -> None:
        super()._store_counters()
        d, hc = self._dev, self.handoff.c
        hc[H.DEV_ERRORS // 8] = d.bad + d.failed
        hc[H.DEV_BYTES // 8] = d.bytes
