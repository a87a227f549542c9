"""nvme-pi transport: splitter -> card over an NVMe I/O queue pair in the
hidden volume, the write's identity in per-block protection information.

Host half `NvmePiSplitter` (`nvme_splitter.py`), card half `NvmePiEndpoint`
(`nvme_endpoint.py`); the layout (commands, completions, PI, the hidden
namespace's LBA format) is `nicsplit.wire.nvme`, listed byte by byte in
docs/formats.md ("nvme-pi transport"); the interface is
`nicsplit.card.transports.base` (``TRANSPORTS["nvme-pi"]``).

Theory of operation
===================
Set-up is the ring's (`nicsplit.card.transports.ring`): the card creates the
hidden volume and the doorbell eventfd and serves ``RUN_DIR/card.sock``; its
hello names the transport ``"nvme-pi"`` (a ring splitter refuses it, and
this one refuses a ring card). The volume's regions are read as an NVMe
queue pair (SQ of 64-byte commands, CQ of 16-byte completions) and a hidden
namespace of 4104-byte extended blocks (4096 data + 8 PI).

Write (host, one producer): health as the ring; an SQ slot (full at
entries-1) and ``nb`` contiguous blocks; copy the data block by block and
write each block's PI (Guard = CRC-16/T10-DIF of the block's data,
Application Tag = vdisk id, Reference Tag = virtual LBA); pack a Write
(01h, PRACT = 0, PRCHK = guard, CID = slot); ring the SQ Tail doorbell;
the eventfd only if the card sleeps; spin on the CQ entry at the head until
its Phase Tag flips; status 0 = acked.

Card (single thread, as the ring's loop): for each command, check it, check
every block's guard, take the identity from the PI, drop the PI (the data
moves down over it), complete the command (status 0, or e.g. 282h End-to-end
Guard Check Error), then hand the write to the pipeline as an
`AugmentedWrite` identical to the ring's, so the journal is too.

Rules
-----
1. ``split`` never raises for card trouble and never waits longer than its
   timeout (the ring's rule 1); a completion with a non-zero status is a
   refusal: the filter puts the vdisk in marking, then resyncs.
2. The card completes every command before it looks at the next, and stops
   consuming when the CQ is full (entries-1 unread completions).
3. Payload blocks stay in the data area until ``release(io_id)``; the card
   publishes ``DATA_HEAD`` over the released prefix (the ring's rule 4).
4. No lost wake-up: the ring's Dekker handshake on the SQ Tail doorbell.
5. Neither half is thread-safe.
"""

from nicsplit.card.transports.nvme_endpoint import NvmeEndpointStats, NvmePiEndpoint
from nicsplit.card.transports.nvme_splitter import NvmePiSplitter, NvmeStats

__all__ = ["NvmePiSplitter", "NvmePiEndpoint", "NvmeStats", "NvmeEndpointStats"]
