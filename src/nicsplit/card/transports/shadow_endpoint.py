"""Card half of the shadow transport: `ShadowEndpoint`, a `RingEndpoint`
that also serves the emulated device queue (`shadow_device.CardDevice`) and
turns each completed real half into its write's ``Outcome(io_id, COMMITTED)``
for the pipeline, whose hold stage matches it with the fake half by io_id
whichever came first. The protocol is in `nicsplit.card.transports.shadow`.

Matching statistics (`ShadowEndpointStats`) are counted by a
`shadow_match.HalfMatcher` (bounded, expired at ``match_timeout_ms``, the
hold's outcome timeout): pairs matched, reversed, commit-only drops, and
orphans (the hold reports a fake one lost, and the host marks and resyncs
its region; a real one's early outcome expires in the hold).

On the card's fast path (``fast_path = "process"``) the acker serves the
device queue instead (`shadow_acker.ShadowAcker`) and the pipeline worker
counts the halves.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from time import monotonic_ns

from nicsplit.card.transports.ring_endpoint import EndpointStats, RingEndpoint
from nicsplit.card.transports.shadow_device import CardDevice, DeviceMemory
from nicsplit.card.transports.shadow_match import HalfMatcher
from nicsplit.core.records import AugmentedWrite, Op, Outcome, Status
from nicsplit.wire import shadow as S

__all__ = ["ShadowEndpoint", "ShadowEndpointStats"]

@dataclass(frozen=True, slots=True)
class ShadowEndpointStats(EndpointStats):
    fake_halves: int = 0  # data writes taken from the ring (fake halves; also resync copies, whose outcome is on the ring)
    real_halves: int = 0  # physical writes completed OK on the device queue (the real halves)
    matched: int = 0  # pairs that met (either order)
    reversed: int = 0  # ... whose real half came first
    failed_fake: int = 0  # fake halves dropped by a FAILED outcome (failed below the splitter)
    orphan_fake: int = 0  # fake halves unmatched at the timeout (the hold loses them: marked, resynced)
    orphan_real: int = 0  # real halves unmatched at the timeout (dropped, counted)
    device_errors: int = 0  # device entries completed with an error (bad entry or failed pwrite)
    device_bytes: int = 0  # bytes written to volume files
    unmatched_fake: int = 0  # fake halves waiting for their real half now
    unmatched_real: int = 0  # real halves waiting for their fake half now


class ShadowEndpoint(RingEndpoint):
    """Card half of the shadow transport (see module docstring)."""

    TRANSPORT = "shadow"

    def __init__(self, run_dir, *, volume_dir: str | None = None, device_entries: int = S.DEFAULT_ENTRIES,
                 device_data_size: int = S.DEFAULT_DATA_SIZE, match_timeout_ms: float = 5000, **kw) -> None:
        # The device exists before the ring's control thread can send a hello naming it.
        mem = DeviceMemory.create(S.Geometry(device_entries, device_data_size))
        self._dev = CardDevice(mem, os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC), volume_dir)
        try:
            super().__init__(run_dir, **kw)
        except BaseException:
            self._dev.close()
            raise
        self.match = HalfMatcher(match_timeout_ms)

    # -- the hot path --------------------------------------------------------------
    def poll(self, max_entries: int = 256) -> list[AugmentedWrite | Outcome]:
        # The device queue first: a host writer waits for each real half's
        # completion, nobody waits for a fake half (its ack is collected late).
        done = self._dev.poll(max_entries) if self._dev.pending() else None
        out = super().poll(max_entries) if self._ctr_pending() else []
        now = 0
        m = self.match
        if done:
            now = monotonic_ns()
            for io_id, status in done:
                if not status:  # else the host writes it itself and posts FAILED for the fake half
                    m.real(io_id, now)
        if out:
            now = now or monotonic_ns()
            for r in out:
                if type(r) is AugmentedWrite:
                    if r.op is Op.WRITE:
                        m.fake(r.io_id, now)
                else:
                    m.outcome(r.io_id, r.status is Status.COMMITTED)
        if done:
            # after this poll's fake halves: the hold takes an outcome before its write as well
            out.extend(Outcome(io_id, Status.COMMITTED) for io_id, status in done if not status)
        if now:
            m.expire(now)
        return out

    def _ctr_pending(self) -> bool:
        return super().pending()

    def pending(self) -> bool:
        return super().pending() or self._dev.pending()

    def heartbeat(self) -> None:
        super().heartbeat()
        m = self.match
        if m.fakes or m.reals:
            m.expire(monotonic_ns())

    def wait_doorbell(self, timeout: float) -> bool:
        if self._dev.pending():
            return True
        return super().wait_doorbell(timeout) or self._dev.pending()

    # -- hello, stats, close ----------------------------------------------------------
    def _hello(self) -> bytes:
        info = json.loads(super()._hello())
        g = self._dev.mem.geometry
        info.update(transport=self.TRANSPORT, device_version=S.VERSION, device_entries=g.entries,
                    device_data_size=g.data_size)
        return json.dumps(info).encode()

    def _hello_fds(self) -> list[int]:
        """The ring's two (doorbell, completion eventfd), the device queue's memfd and its completion eventfd."""
        return [*super()._hello_fds(), self._dev.mem.fd, self._dev.done_fd]

    def statistics(self) -> ShadowEndpointStats:
        base = super().statistics()
        d = self._dev
        return ShadowEndpointStats(
            **{f.name: getattr(base, f.name) for f in dataclasses.fields(base)}, **self.match.statistics(),
            device_errors=d.bad + d.failed, device_bytes=d.bytes)

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        self._dev.close()
