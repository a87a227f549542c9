"""Ring transport: splitter -> card over the hidden volume's shared-memory rings.

Host half `RingSplitter` (`ring_splitter.py`, used by the splitter filter) and
card half `RingEndpoint` (`ring_endpoint.py`, used by the card pipeline); what
both use is in `ring_shared.py`; a demo card is `ring_echo.py`.  This module
states the protocol and names the two halves (`TRANSPORTS` in `base` loads
them from here).  Formats and memory ordering are in `nicsplit.wire.ring` and
docs/formats.md; the interface in `nicsplit.card.transports.base`.

Theory of operation
===================
Set-up.  The card creates the hidden volume and two eventfds (the doorbell,
and the completion eventfd that wakes a host sleeping for acks) and listens
on ``RUN_DIR/card.sock`` (AF_UNIX, SOCK_SEQPACKET, mode 0600).  A host
connects; the card answers with one message: JSON (path, fake UID, geometry,
card pid) plus both eventfds as SCM_RIGHTS.  The host attaches the volume and
checks it against the JSON.  One host at a time: a second one gets
``{"error": ...}`` and no descriptors.  The socket stays open for the life of
the attachment; its EOF tells each side the other is gone.

Write (host, synchronous, one producer):

1. health: card state not CLOSED, heartbeat younger than ``stale_after_ns``;
2. room: a SQ slot and, for WRITE, ``length`` contiguous bytes in the data
   area (re-reading the card's heads only when the cached ones say full);
3. copy the payload once (memoryview slice assignment), checksum it, pack the
   descriptor with a pre-built ``struct.Struct.pack_into``; a payload that was
   received into a reservation (``reserve``, see `ring_splitter`) and is still
   next in ring order is neither copied nor hashed again: its descriptor only;
4. publish ``data_tail`` then ``sq_tail``; full fence; ring the eventfd only
   if the card state is SLEEPING (notification suppression);
5. spin on ``cq_tail`` until a completion for this io_id arrives (True if OK)
   or ``timeout_ns`` passes (False).  The pipelined host (`CardLink`) spins
   briefly, then sleeps on the completion eventfd: ``arm_wake`` sets
   HOST_WAITING, fences and looks again; the card writes the eventfd after a
   round's CQ_TAIL store while the flag is set (rule 5's handshake, reversed).  Completions for other io_ids (late acks
   of timed-out splits) are matched against the tracker table and dropped.

``split`` = ``submit`` (steps 1-4, never waits) + ``wait_ack`` (step 5); the
two halves are public for tests and for a future batching host (several
submits, then waits in any order: verdicts are matched by io_id).

Card loop (single thread)::

    ep = RingEndpoint(run_dir)
    while running:
        recs = ep.poll()                  # acks each write before returning it
        if recs: handle(recs); idle_since = now
        elif now - idle_since > IDLE_SPELL: ep.wait_doorbell(0.01)
        ep.heartbeat()                    # at least every few ms
        ... ep.release(io_id) once a payload is shipped durably (any order)
        ... ep.set_full(True/False) when the pipeline cannot take more

Rules
-----
1. ``split`` never raises for card trouble and never waits longer than
   ``timeout_ns`` (plus the payload copy itself, ~0.1 us per KiB).  Card
   trouble = False; the filter marks.
2. The card acks (CQ) every write-like entry as soon as it has validated it,
   before returning it; a bad descriptor is acked FAILED with a reason, logged
   with its io_id, and never returned.  Outcomes get no completion.
3. The card stops consuming (leaves entries in the SQ) when the CQ is full;
   the host drains the whole CQ on every split, so this only happens if the
   host stopped splitting.
4. Payloads stay in the data area until ``release(io_id)``; ``data_head``
   advances over the released prefix in submission order, so releases may
   come in any order.
5. No lost wake-up: the card publishes SLEEPING, fences, re-checks the SQ,
   and only then blocks on the eventfd; the host publishes the tail, fences,
   then reads the state (Dekker; see wire/ring.py MEMORY ORDERING).
6. Neither half is thread-safe; the card's control socket is served by one
   daemon thread owned (and joined) by the endpoint, which never touches the
   rings.
"""

from nicsplit.card.transports.ring_endpoint import EndpointStats, RingEndpoint
from nicsplit.card.transports.ring_shared import DEFAULT_STALE_AFTER_NS, SOCKET_NAME
from nicsplit.card.transports.ring_splitter import RingSplitter, RingStats

__all__ = [
    "RingSplitter", "RingEndpoint", "RingStats", "EndpointStats", "SOCKET_NAME",
    "DEFAULT_STALE_AFTER_NS",
]
