"""The card pipeline: what the card does with each captured write.

    receive (transport) → resolve → hold → merge → dedup → batch
      → encode → compress → encrypt → ship → release

One module per stage; each stage class has a docstring with its options and
an example, bounds its queue (if it has one) and returns a frozen dataclass
from ``statistics()``. `CardPipeline` (pipeline.py) wires them; the card
process (`nicsplit.card.process`) runs it. Ordering invariants and options
are in docs/pipeline.md:

- per CG, records leave hold in ``cg_seq`` order, and nothing reorders them
  afterwards (merge emits a window in seq order, batches of a CG are sealed
  and shipped in id order, retransmits keep that order);
- only writes whose outcome is COMMITTED are shipped (P3);
- a hidden-volume payload is released exactly once: when dropped, or after
  the appliance acked its batch durable (or resume said it is durable);
- every write the card acked but will not ship, other than a failed one,
  goes to ``on_lost`` so its region is marked dirty (P1).
"""

from .batch import Batcher, Pending
from .compress import Compressor
from .dedup import Dedup
from .encrypt import Encryptor
from .hold import Hold
from .items import Item, Resolved
from .merge import Merger
from .pipeline import CardPipeline, PipelineConfig, PipelineStats
from .resolve import CardCatalog, Resolver
from .ship import LinkDown, Shipper, ShipWindow, tls_connector

__all__ = [
    "Batcher", "Pending", "Compressor", "Dedup", "Encryptor", "Hold", "Item", "Resolved",
    "Merger", "CardPipeline", "PipelineConfig", "PipelineStats", "CardCatalog", "Resolver", "LinkDown",
    "Shipper", "ShipWindow", "tls_connector",
]
