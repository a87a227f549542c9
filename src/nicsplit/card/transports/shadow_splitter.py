"""Host half of the shadow transport: `ShadowSplitter`, a `RingSplitter`
(set-up, health, tracker table, late verdicts, close) that also attaches the
emulated device queue the card sends with its hello and lends it to the
datastore plugin (`nicsplit.host.shadowio`). The protocol is in
`nicsplit.card.transports.shadow`.

The fake half is an ordinary ring WRITE descriptor: nothing in the ring's
format changes. What makes it a fake half is the transport both ends agreed
on in the hello ("shadow"): every data write a shadow card takes from its
ring waits in the hold stage for the real half, which is its outcome.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from nicsplit.card.transports.base import TransportUnavailable
from nicsplit.card.transports.ring_shared import SLEEPING, STATE
from nicsplit.card.transports.ring_splitter import RingSplitter, RingStats
from nicsplit.card.transports.shadow_device import DeviceMemory, HostDevice
from nicsplit.wire import shadow as S

__all__ = ["ShadowSplitter", "ShadowStats"]


@dataclass(frozen=True, slots=True)
class ShadowStats(RingStats):
    device_submitted: int = 0  # real halves queued to the card's device
    device_completed: int = 0  # ... completed (any status)
    device_errors: int = 0  # ... completed with an error (the host wrote them itself and marked)
    device_full: int = 0  # times the device queue had no room (the writer waited, or wrote directly)
    device_async_waits: int = 0  # real halves whose completion was awaited off the spin
    device_outstanding: int = 0


class ShadowSplitter(RingSplitter):
    """Host half of the shadow transport (see module docstring)."""

    TRANSPORT = "shadow"
    HELLO_FDS = 4  # the ring's doorbell and completion eventfd, the device queue's memfd, its completion eventfd
    shadow = True  # the splitter filter does not wait for the fake half's ack (`nicsplit.host.filters.split`)

    device: HostDevice

    @classmethod
    def _from_hello(cls, s, hv, fds, card_pid, info, **kw) -> "ShadowSplitter":
        try:
            if info.get("device_version") != S.VERSION:
                raise TransportUnavailable(f"card's device queue is v{info.get('device_version')}, "
                                           f"we speak v{S.VERSION}")
            try:
                mem = DeviceMemory.attach(fds[2])
            except (OSError, ValueError) as e:  # ShadowFormatError is a ValueError
                raise TransportUnavailable(f"card's device queue: {e}") from None
        except BaseException:
            s.close()
            hv.close()
            for fd in fds:
                os.close(fd)
            raise
        t = cls(s, hv, fds[0], card_pid, cq_wake=fds[1], **kw)
        t.device = HostDevice(mem, fds[3], wake_card=t._wake_card, healthy=t.healthy)
        return t

    def _wake_card(self) -> None:
        if self._ctr[STATE] == SLEEPING:
            self._ring()

    def statistics(self) -> ShadowStats:
        base = super().statistics()
        d = self.device
        return ShadowStats(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)},
                           device_submitted=d.submitted, device_completed=d.completed, device_errors=d.errors,
                           device_full=d.full, device_async_waits=d.async_waits,
                           device_outstanding=d.statistics()["outstanding"])

    def close(self) -> None:
        if not self._closed:
            self.device.close()
        super().close()
