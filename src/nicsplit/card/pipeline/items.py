"""What flows between the card pipeline's stages (internal types).

    AugmentedWrite ──resolve──► Resolved ──hold──► Resolved (committed, CG order)
      ──merge──► Item ──dedup──► (frames.Record, io_ids) ──batch──► Pending
      ──compress+encrypt──► frames.Batch ──ship──► appliance

On the steady path (merge off) no `Resolved`, `Item` or `Record` is made:
hold keeps *entries*, tuples ``(write, cg, vdisk, nbytes)`` with a
`Resolved`'s fields (`nicsplit.card.pipeline.hold.Entry`), and the
pipeline encodes each into its batch (`CardPipeline._pump_direct`).

An `Item` is one record-to-be: one write, or (merge on) several writes of one
vdisk folded together. It carries the io ids of *every* write it contains,
because each of them owns a hidden-volume slot that is freed only when the
batch holding the item is acknowledged durable.
"""

from __future__ import annotations

from dataclasses import dataclass

from nicsplit.core.records import AugmentedWrite, Op


class PipelineError(Exception):
    """A pipeline stage was used against its contract (a bug, not bad input)."""


@dataclass(slots=True)
class Resolved:
    """An augmented write that passed resolve: its CG and vdisk names known."""

    write: AugmentedWrite
    cg: str  # CG name (batches and the appliance's resume use names)
    vdisk: str
    nbytes: int  # payload bytes held in the hidden volume (0 unless Op.WRITE)


@dataclass(slots=True)
class Item:
    """One record-to-be, after hold (and merge)."""

    cg: str
    seq: int  # CG sequence number; a merged item takes its last write's seq
    vdisk_id: int
    op: Op
    flags: int  # WFlag bits, plus RFLAG_IN_WINDOW
    offset: int  # virtual byte offset
    length: int
    time_ns: int  # timestamp of the (last) write
    data: bytes | bytearray | memoryview  # payload for Op.WRITE, else b""
    io_ids: tuple[int, ...]  # every write folded into this item, in seq order

    @classmethod
    def of(cls, r: Resolved) -> "Item":
        w = r.write
        return cls(
            cg=r.cg, seq=w.cg_seq, vdisk_id=w.vdisk_id, op=Op(w.op), flags=int(w.flags),
            offset=w.voffset, length=w.length, time_ns=w.timestamp_ns,
            data=(w.data if (w.op == Op.WRITE and w.data is not None) else b""),
            io_ids=(w.io_id,),
        )
