"""A distribution step of whole-block records, coalesced per block.

Theory of operation
===================
When every record of a step covers whole 4 KiB blocks (its offset is
block-aligned and it ends on a block boundary or at the end of its vdisk:
what guests and fio write), the step works per block instead of per record
(`plan`):

1. the blocks the step touches are read once each, per image in one bulk
   call (`Image.read_blocks`: sorted, nearby entries and adjacent blocks in
   one syscall, never-written blocks without a data read or an AEAD call);
2. the records are walked in seq order over an in-memory map block ->
   current content; each record's undo pre-image is what the map holds for
   its blocks just before it (the image's bytes, or an earlier record of the
   same step), exactly what the record-by-record path reads, so one undo
   entry per record and every PIT inside the step stays reachable;
3. only the last content of each block is written (last writer wins inside
   the step), per image in one bulk call (`Image.write_blocks`: runs of
   adjacent blocks in one ``pwrite`` of their data plus one of their entries).

A crash anywhere in the image writes is repaired like before: the step's
undo entries are durable before the first image byte changes, and laying
them back in reverse order restores every block the step touched (each
block's oldest entry of the step holds its bytes from before the step).

Steps with any other record (a partial block) take the record-by-record
path of `nicsplit.recovery.replica`.
"""

from __future__ import annotations

from typing import Any

from nicsplit.core.records import BLOCK_SIZE

__all__ = ["IMAGE", "aligned", "plan"]

BS = BLOCK_SIZE

Content = Any  # bytes | memoryview | None (None: zeros)


def aligned(off: int, length: int, size: int) -> bool:
    """Does a record at ``off`` of ``length`` bytes cover whole blocks of a vdisk of ``size`` bytes?"""
    return length > 0 and not off % BS and (not length % BS or off + length == size)


class _Stored:
    """The marker of `IMAGE`."""

    def __repr__(self) -> str:
        return "IMAGE"


IMAGE: Any = _Stored()  # a pre-image that is the image's blocks as they are (`plan`'s ``stored``)


def plan(records: list[tuple[int, int, int, int, Content]], imgs: dict[int, Any], stored: frozenset[int] = frozenset()
         ) -> tuple[list[Content], dict[int, dict[int, Content]]]:
    """``records``: (seq, vdisk id, offset, length, payload; None = zeros)
    of one step, all `aligned`, in seq order.  Returns (the pre-image of
    each record: bytes, or None when it was all zeros as far as the images
    tell; {vdisk id: {block: its content after the step}}).

    For the vdisks in ``stored`` the images are not read: a record whose
    blocks are all first touched in this step gets `IMAGE` as its pre-image
    (the caller keeps those blocks as stored: `SealedImage.read_stored_blocks`);
    only blocks that a record covers together with blocks an earlier record
    of the step wrote are read and opened."""
    touched: dict[int, set[int]] = {}
    for _, vid, off, ln, _ in records:
        s = touched.get(vid)
        if s is None:
            s = touched[vid] = set()
        if ln <= BS:
            s.add(off // BS)
        else:
            s.update(range(off // BS, -(-(off + ln) // BS)))
    state: dict[int, dict[int, Content]] = {}
    for vid, bs in touched.items():
        blocks = sorted(bs)
        state[vid] = dict.fromkeys(blocks, IMAGE) if vid in stored else dict(zip(blocks, imgs[vid].read_blocks(blocks)))
    pres: list[Content] = []
    mixed: list[tuple[int, int, list[Content], int, int]] = []  # (index in pres, vdisk, parts, first block, length)
    for _, vid, off, ln, data in records:
        st = state[vid]
        b0 = off // BS
        if ln <= BS:  # one block (the common case): no joining
            pres.append(st[b0])
            st[b0] = data
            continue
        nb = -(-ln // BS)
        parts = [st[b] for b in range(b0, b0 + nb)]
        if all(p is None for p in parts):
            pres.append(None)
        elif all(p is IMAGE for p in parts):
            pres.append(IMAGE)
        elif any(p is IMAGE for p in parts):
            mixed.append((len(pres), vid, parts, b0, ln))
            pres.append(None)  # filled in below
        else:
            pres.append(b"".join(p if p is not None else bytes(min(BS, ln - i * BS)) for i, p in enumerate(parts)))
        if data is None:
            for b in range(b0, b0 + nb):
                st[b] = None
        else:
            mv = memoryview(data)
            for i in range(nb):
                st[b0 + i] = mv[i * BS : (i + 1) * BS]
    for at, vid, parts, b0, ln in mixed:  # the images are unchanged until the step's writes
        need = [b0 + i for i, p in enumerate(parts) if p is IMAGE]
        got = dict(zip(need, imgs[vid].read_blocks(need)))
        parts = [got[b0 + i] if p is IMAGE else p for i, p in enumerate(parts)]
        pres[at] = None if all(p is None for p in parts) else \
            b"".join(p if p is not None else bytes(min(BS, ln - i * BS)) for i, p in enumerate(parts))
    return pres, state
