"""The transport interface between the splitter filter and the card.

A *transport* moves `AugmentedWrite` and `Outcome` records (see
`nicsplit.core.records`) from the host's splitter filter to the card and
brings back one ack per write.  It has two halves:

* `SplitterTransport` — the host half, used only by the splitter filter;
* `CardEndpoint` — the card half, used only by the card pipeline's receive
  stage.

The filter and the pipeline depend on these two protocols and on
`TransportUnavailable`, never on a concrete transport, so the transports of
ARCHITECTURE.md §4 plug in side by side without touching either of them:

==========  ===========================================  ====================
name        host half / card half                          status
==========  ===========================================  ====================
ring        ring.RingSplitter / ring.RingEndpoint          implemented
nvme-pi     nvme_pi.NvmePiSplitter / nvme_pi.NvmePiEndpoint  implemented
shadow      shadow.ShadowSplitter / shadow.ShadowEndpoint  implemented
net         net.NetSplitter / (none: no card)              implemented
==========  ===========================================  ====================

A new transport adds a module here, a line to `TRANSPORTS`, and tests; the
filter picks one by name (`open_splitter`) and the card by name
(`open_endpoint`).

Contract (every transport)
==========================
Host half:

1. ``split(w, timeout_ns)`` returns True only when the card acknowledged that
   it holds ``w`` (promise P1 depends on it).  It returns False — never raises
   for card trouble, never blocks longer than ``timeout_ns`` — when the card is
   full, slow, refusing or gone; the filter then puts the vdisk in marking
   (promise P4).  The payload (``w.data``) may be reused by the caller as soon
   as ``split`` returns.
   The pipelined half: ``submit`` publishes, ``take_ack`` collects a verdict
   that arrived, ``detach`` ends a wait whose deadline passed *without*
   dropping the write: it stays in flight in order, and its verdict comes
   later through ``take_late`` (a late ack is not a lost write; the filter
   treats the write as unconfirmed until then).  ``abandon`` gives up on a
   write for good (its late ack is dropped).
2. ``post_outcome(io_id, status)`` is non-blocking and ordered after the write
   it describes; False means it could not be queued (the filter marks).
3. ``healthy()`` is cheap and says whether a split could currently succeed;
   False means the card is dead (gone, closed, or no heartbeat for seconds).
4. ``statistics()`` returns a frozen dataclass of counters.
5. Not thread-safe: one producer (the host's event-loop thread) per instance.

Card half:

1. ``poll(max_entries)`` consumes what arrived, in submission order, acks every
   write-like record before returning it (a malformed one is acked FAILED,
   logged and not returned), and returns `AugmentedWrite` / `Outcome` records.
   ``AugmentedWrite.data`` may be a view into transport memory that stays
   valid until ``release(io_id)``.
2. ``release(io_id)`` frees a write's payload (shipped durably, or dropped),
   in any order.
3. ``wait_doorbell(timeout)`` sleeps until work may have arrived or the
   timeout passes, without a lost-wakeup window; ``heartbeat()`` proves the
   card loop alive to the host.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol, runtime_checkable

from nicsplit.core.records import AugmentedWrite, Outcome, Status

__all__ = ["TransportUnavailable", "SplitterTransport", "CardEndpoint", "TRANSPORTS", "has_card_half", "open_splitter", "open_endpoint"]


class TransportUnavailable(Exception):
    """The host half cannot reach the card (no card, refused, bad hidden
    volume).  Raised only by connection set-up, never by ``split``."""


@runtime_checkable
class SplitterTransport(Protocol):
    def split(self, w: AugmentedWrite, timeout_ns: int) -> bool: ...

    # The pipelined path: publish now, collect the verdict later, so the host
    # keeps serving other requests while the card acknowledges.
    def submit(self, w: AugmentedWrite) -> bool: ...

    def reap(self) -> None: ...

    def take_ack(self, io_id: int) -> bool | None: ...

    def poll_ack(self, io_id: int) -> bool | None: ...  # `reap`, then `take_ack(io_id)`

    def abandon(self, io_id: int) -> bool: ...

    def detach(self, io_id: int) -> bool | None: ...

    def take_late(self) -> list[tuple[int, bool]]: ...

    @property
    def last_position(self) -> int: ...

    def released_position(self) -> int: ...

    def post_outcome(self, io_id: int, status: Status) -> bool: ...

    def healthy(self) -> bool: ...

    def statistics(self) -> Any: ...

    def close(self) -> None: ...


@runtime_checkable
class CardEndpoint(Protocol):
    def poll(self, max_entries: int = 256) -> list[AugmentedWrite | Outcome]: ...

    def release(self, io_id: int) -> None: ...

    def set_sleeping(self, sleeping: bool) -> None: ...

    def wait_doorbell(self, timeout: float) -> bool: ...

    def heartbeat(self) -> None: ...

    def statistics(self) -> Any: ...

    def close(self) -> None: ...


# name -> ("module:HostClass", "module:CardClass")
TRANSPORTS: dict[str, tuple[str, str]] = {
    "ring": ("nicsplit.card.transports.ring:RingSplitter", "nicsplit.card.transports.ring:RingEndpoint"),
    "nvme-pi": ("nicsplit.card.transports.nvme_pi:NvmePiSplitter", "nicsplit.card.transports.nvme_pi:NvmePiEndpoint"),
    "shadow": ("nicsplit.card.transports.shadow:ShadowSplitter", "nicsplit.card.transports.shadow:ShadowEndpoint"),
    "net": ("nicsplit.card.transports.net:NetSplitter", ""),  # no card half: the host ships to the appliance
}


def _load(spec: str) -> Any:
    if not spec:
        raise ValueError("this transport has no card half (the host ships to the appliance itself)")
    mod, _, attr = spec.partition(":")
    return getattr(importlib.import_module(mod), attr)


def _lookup(name: str) -> tuple[str, str]:
    try:
        return TRANSPORTS[name]
    except KeyError:
        raise ValueError(f"unknown transport {name!r} (known: {', '.join(sorted(TRANSPORTS))})") from None


def has_card_half(name: str) -> bool:
    """Whether transport ``name`` runs through the card (ValueError: unknown).
    One card serves one such transport at a time (docs/operations.md)."""
    return bool(_lookup(name)[1])


def splitter_class(name: str) -> Any:
    """The host half's class of transport ``name`` (ValueError: unknown)."""
    return _load(_lookup(name)[0])


def open_splitter(name: str, control_socket: str, timeout: float = 1.0, **options: Any) -> SplitterTransport:
    """Connect the host half of transport ``name``; raises TransportUnavailable.
    A host half whose class has ``open_async`` connects on the host's event
    loop instead (`nicsplit.host.cardlink`): ``connect`` refuses."""
    return splitter_class(name).connect(control_socket, timeout=timeout, **options)


def open_endpoint(name: str, run_dir: str, **options: Any) -> CardEndpoint:
    """Create the card half of transport ``name`` serving ``run_dir``."""
    return _load(_lookup(name)[1])(run_dir, **options)
