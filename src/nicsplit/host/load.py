"""How many client requests the host is executing right now, across every
session (`NBDSession` counts them in and out).

Why: a write waiting for the card (its ack, or a shadow real half's
completion) first spins, then sleeps on the card's eventfd. A sleep costs the
write a wake-up of the host's loop (tens of µs here), which a QD1 client
pays on every write; a spin holds the loop, which other requests need. So a
waiter spins long only while its request is the only one the host executes
(`alone`: nothing else for the loop to do), and briefly otherwise.
"""

from __future__ import annotations

__all__ = ["HostLoad", "ALONE_SPIN_US"]

# The spin of a lone waiter: longer than a doorbell wake-up of a sleeping
# acker plus its round (30-150 us measured here, docs/benchmarks.md).
ALONE_SPIN_US = 200


class HostLoad:
    __slots__ = ("requests", "backlog")

    def __init__(self) -> None:
        self.requests = 0  # executing now: started and not yet replied
        # While a session runs a request at once: more bytes of its input wait
        # unparsed (a pipelined client's next requests), so it is not alone.
        self.backlog = False

    def alone(self) -> bool:
        return self.requests <= 1 and not self.backlog
