"""Card half of the shadow transport: `ShadowEndpoint`, a `RingEndpoint`
that also serves the emulated device queue (`shadow_device.CardDevice`) and
turns each completed real half into its write's ``Outcome(io_id, COMMITTED)``
for the pipeline, whose hold stage matches it with the fake half by io_id
whichever came first. The protocol is in `nicsplit.card.transports.shadow`.

Matching statistics (`ShadowEndpointStats`): the endpoint keeps the io_ids
of unmatched halves of either kind (bounded, expired at ``match_timeout_ms``,
the hold's outcome timeout) only to count what happened: pairs matched,
pairs whose real half came first (*reversed*), fake halves dropped by a
FAILED outcome (commit-only), and halves left unmatched at the timeout
(*orphans*: the hold reports a fake one lost, and the host marks and
resyncs its region; a real one's early outcome expires in the hold).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from dataclasses import dataclass
from time import monotonic_ns

from nicsplit.card.transports.ring_endpoint import EndpointStats, RingEndpoint
from nicsplit.card.transports.shadow_device import CardDevice, DeviceMemory
from nicsplit.core.records import AugmentedWrite, Op, Outcome, Status
from nicsplit.wire import shadow as S

__all__ = ["ShadowEndpoint", "ShadowEndpointStats"]

_MATCH_CAP = 1 << 18  # unmatched io_ids remembered for the statistics (hold's max_writes is 65536)


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
        self._match_ns = int(match_timeout_ms * 1_000_000)
        self._fake: collections.OrderedDict[int, int] = collections.OrderedDict()  # io_id -> arrival ns
        self._real: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._n_fake = self._n_real = self._n_matched = self._n_reversed = self._n_failed = 0
        self._n_orphan_fake = self._n_orphan_real = 0
        self._expire_at = 0

    # -- the hot path --------------------------------------------------------------
    def poll(self, max_entries: int = 256) -> list[AugmentedWrite | Outcome]:
        # The device queue first: a host writer waits for each real half's
        # completion, nobody waits for a fake half (its ack is collected late).
        done = self._dev.poll(max_entries) if self._dev.pending() else None
        out = super().poll(max_entries) if self._ctr_pending() else []
        now = 0
        fake, real = self._fake, self._real
        if done:
            now = monotonic_ns()
            for io_id, status in done:
                if status:
                    continue  # the host writes it itself and posts FAILED for the fake half
                self._n_real += 1
                if fake.pop(io_id, None) is not None:
                    self._n_matched += 1
                else:
                    real[io_id] = now
        if out:
            now = now or monotonic_ns()
            for r in out:
                if type(r) is AugmentedWrite:
                    if r.op is Op.WRITE:
                        self._n_fake += 1
                        if real.pop(r.io_id, None) is not None:
                            self._n_matched += 1
                            self._n_reversed += 1
                        else:
                            fake[r.io_id] = now
                elif fake.pop(r.io_id, None) is not None and r.status is not Status.COMMITTED:
                    self._n_failed += 1  # commit-only: the hold drops it
                # (a COMMITTED outcome on the ring: a resync copy, whose outcome the filter posts)
        if done:
            # after this poll's fake halves: the hold takes an outcome before its write as well
            out.extend(Outcome(io_id, Status.COMMITTED) for io_id, status in done if not status)
        if now and now >= self._expire_at:
            self._expire(now)
        return out

    def _ctr_pending(self) -> bool:
        return super().pending()

    def _expire(self, now: int) -> None:
        """Count (and forget) halves unmatched for longer than the timeout."""
        self._expire_at = now + 100_000_000
        limit = now - self._match_ns
        for table, kind in ((self._fake, "fake"), (self._real, "real")):
            n = 0
            while table:
                io_id, t = next(iter(table.items()))
                if t > limit and len(table) <= _MATCH_CAP:
                    break
                table.popitem(last=False)
                n += 1
            if kind == "fake":
                self._n_orphan_fake += n
            else:
                self._n_orphan_real += n

    def pending(self) -> bool:
        return super().pending() or self._dev.pending()

    def heartbeat(self) -> None:
        super().heartbeat()
        if self._fake or self._real:
            now = monotonic_ns()
            if now >= self._expire_at:
                self._expire(now)

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
            **{f.name: getattr(base, f.name) for f in dataclasses.fields(base)},
            fake_halves=self._n_fake, real_halves=self._n_real, matched=self._n_matched,
            reversed=self._n_reversed, failed_fake=self._n_failed, orphan_fake=self._n_orphan_fake,
            orphan_real=self._n_orphan_real, device_errors=d.bad + d.failed, device_bytes=d.bytes,
            unmatched_fake=len(self._fake), unmatched_real=len(self._real))

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        self._dev.close()
