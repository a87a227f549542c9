"""shadow transport: the patent's "fake write" channel. The splitter sends
each data write to the card as a *fake* write (its data and virtual
identity) and the card, inline in the physical path like a DPU that
emulates the storage device, later sees the *real* write — the datastore's
physical write, already translated — and matches the two by IO id.

Host half `ShadowSplitter` (`shadow_splitter.py`), card half
`ShadowEndpoint` (`shadow_endpoint.py`), the emulated device
(`shadow_device.py`, layout `nicsplit.wire.shadow`), the host's real-half
path (`nicsplit.host.shadowio`); listed in `base.TRANSPORTS["shadow"]` and
byte by byte in docs/formats.md ("shadow transport").

Theory of operation
===================
Set-up is the ring's (`nicsplit.card.transports.ring`): the card creates the
hidden volume and serves ``RUN_DIR/card.sock``; its hello names the
transport ``"shadow"`` and carries four descriptors (SCM_RIGHTS): the
ring's doorbell and completion eventfds, the device queue's memfd and the
device's completion eventfd. The card opens the datastore's volume files itself, by
index, in the data directory it shares with the host.

Write (a data write of a vdisk on shadow):

1. fake half: the splitter filter builds the `AugmentedWrite` (CG seq, io
   id, vdisk id, virtual offset, data) and publishes it on the ring exactly
   as the ring transport does (the ring's format is unchanged: the
   transport agreed in the hello makes every data write of this card a fake
   half). It does not wait for its ack: the write is unconfirmed, as a late
   write, until the card's ack arrives through the late-verdict path, then
   kept until the card releases it;
2. real half: the write goes down the chain; at the bottom, the datastore
   translates it (allocation, extent log: on the host) and queues each
   piece (volume, physical offset, bytes, io id) on the device queue instead
   of ``os.pwrite``; the card writes it to the volume file and completes it;
   the host's writer awaits the completion (a short spin, then the
   completion eventfd: the loop is never busy-waited) and marks the volume
   dirty for the datastore's sync (fdatasync on the host covers the card's
   page-cache write of the same file, so flush and FUA keep their meaning);
3. match: in the card, a completed real half is the write's
   ``Outcome(io_id, COMMITTED)``; the hold stage matches it with the fake
   half by io id whichever came first (an early outcome waits there), and
   ships only matched writes, in CG order. On the card's fast path
   (``fast_path = "process"``, the default) the acker serves the device
   queue next to the ring (`shadow_acker.ShadowAcker`) and hands each real
   half's outcome to the pipeline worker, so a real write waits for the
   acker, never for a pipeline round;
4. zero, trim, flush and barriers are not shadowed: they take the ring's
   acked path (ack, then the outcome the filter posts).

Rules
-----
1. Commit-only: a write failed below the splitter posts ``FAILED`` (the
   hold drops the fake half); so does a real half the card did not write
   (device gone or full): the host then writes it directly and marks the
   region (P4: production first; the vdisk goes marking, resyncing,
   protected when the card is back).
2. Bounded: unmatched halves live in the hold (``max_writes``,
   ``max_bytes``) for at most ``outcome_timeout_ms``. An unmatched fake
   half at the timeout is an orphan: lost (``on_lost``), its region goes to
   the lost-writes log, the host marks and resyncs it. An unmatched real
   half's outcome expires (counted, ``stray_outcomes``; its fake half was
   refused or marked already).
3. Why the orphan verdict is the lost log and not a refusal on the CQ: the
   card acks the fake half when it holds it (the card half's contract: it
   acks before returning an entry), and the lost log is the card's one
   durable report of a write it acked and cannot ship (read by a running
   host, and by the next one after a restart), already used by every card
   transport. Deferring the CQ entry to the match would have let a verdict
   die with a host restart and would have changed the ring's ack rule for
   one transport.
4. The device queue: at most N writes outstanding, completed in order;
   doorbells both ways with notification suppression (wire/shadow.py).
5. Neither half is thread-safe; the device queue is served by the card's
   loop thread, beside the ring.
"""

from nicsplit.card.transports.shadow_endpoint import ShadowEndpoint, ShadowEndpointStats
from nicsplit.card.transports.shadow_splitter import ShadowSplitter, ShadowStats

__all__ = ["ShadowSplitter", "ShadowEndpoint", "ShadowStats", "ShadowEndpointStats"]
