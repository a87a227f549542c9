"""A batch's records as slices of its plaintext: the appliance's one-pass decode.

The wire record layout is the journal's RECORD payload layout (docs/wire.md §3,
docs/journal.md §1), so ingest need not build a `Record`, copy its data out
and encode it again: `decode_wire_records` walks the plaintext once and gives,
per record, its head fields, its references and two views into the
plaintext — the record's whole wire bytes (what the journal stores) and its
inline data (what it fingerprints).  It checks exactly what
`nicsplit.wire.frames.decode_records` checks (same `FrameError`s), so a
batch that one refuses the other refuses too.

Example::

    recs = decode_wire_records(unseal(batch.body, key, batch_aad(batch)))
    recs[0].seq, bytes(recs[0].wire) == encode_record(decode_records(plain)[0])
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

from nicsplit.core.records import BLOCK_SIZE, Op
from nicsplit.wire.frames import (
    RECORD_HEAD, REF_SIZE, FrameError, Record, block_spans, encode_records,
)
from nicsplit.wire.frames import REF as _REF
from nicsplit.wire.frames import RECORDS_COUNT as _COUNT

__all__ = ["WireRecord", "decode_wire_records", "wire_records"]

_OPS = frozenset(int(o) for o in Op)
_WRITE = int(Op.WRITE)
_HEAD = RECORD_HEAD.size


class WireRecord(NamedTuple):
    """One record of a batch plaintext, not copied: ``wire`` is its wire
    bytes (head, refs, data), ``data`` its inline data, both views of the
    plaintext (which must stay unmodified while they are used)."""

    seq: int
    io_id: int
    vdisk_id: int
    op: int
    flags: int
    offset: int
    length: int
    time_ns: int
    refs: tuple[tuple[int, bytes], ...]
    wire: memoryview
    data: memoryview

    @property
    def data_offset(self) -> int:
        """Offset of ``data`` inside ``wire`` (`journal.format.data_offset`)."""
        return _HEAD + REF_SIZE * len(self.refs)

    def blocks(self) -> list[tuple[int, int]]:
        """(offset in data, length) of each block carried inline
        (`journal.format.data_blocks` without the block index)."""
        if self.op != _WRITE:
            return []
        if not self.refs:
            n = self.length
            return [(o, min(BLOCK_SIZE, n - o)) for o in range(0, n, BLOCK_SIZE)]
        refs = {b for b, _ in self.refs}
        out = []
        dpos = 0
        for i in range(block_spans(self.length)):
            if i not in refs:
                n = min(BLOCK_SIZE, self.length - i * BLOCK_SIZE)
                out.append((dpos, n))
                dpos += n
        return out


def _check(seq: int, op: int, length: int, refs: tuple, data_len: int) -> None:
    # nicsplit.wire.frames._check_record on the raw fields, same messages.
    if op not in _OPS:
        raise FrameError(f"record seq {seq}: unknown op {op}")
    if seq < 1:
        raise FrameError(f"record seq {seq}: sequence numbers start at 1")
    if op != _WRITE:
        if data_len or refs:
            raise FrameError(f"record seq {seq}: op {Op(op).name} carries no data or refs")
        return
    nblocks = block_spans(length)
    ref_bytes = 0
    prev = -1
    for block, _fp in refs:
        if not prev < block < nblocks:
            raise FrameError(f"record seq {seq}: ref block {block} out of order or outside 0..{nblocks - 1}")
        prev = block
        ref_bytes += min(BLOCK_SIZE, length - block * BLOCK_SIZE)
    if data_len != length - ref_bytes:
        raise FrameError(f"record seq {seq}: {data_len} data bytes, expected {length - ref_bytes} "
                         f"(length {length} minus {len(refs)} blocks by reference)")


def decode_wire_records(plain: bytes | memoryview) -> list[WireRecord]:
    """The records of a batch plaintext (`frames.encode_records`' layout),
    one pass, no copies of data; FrameError on anything malformed, as
    `frames.decode_records`.  Record order is not checked here."""
    mv = memoryview(plain)
    total = len(mv)
    if total < _COUNT.size:
        raise FrameError("records: truncated count")
    (n,) = _COUNT.unpack_from(mv, 0)
    if n > (total - _COUNT.size) // _HEAD:
        raise FrameError(f"records: count {n} cannot fit in {total} bytes")
    unpack = RECORD_HEAD.unpack_from
    pos = _COUNT.size
    out = []
    append = out.append
    new = tuple.__new__  # a NamedTuple without its Python-level __new__: ~0.3 us less per record
    for _ in range(n):
        if total - pos < _HEAD:
            raise FrameError(f"record at offset {pos}: truncated header")
        seq, io_id, vdisk_id, op, flags, offset, length, time_ns, nrefs, data_len = unpack(mv, pos)
        dpos = pos + _HEAD + nrefs * REF_SIZE
        end = dpos + data_len
        if end > total:
            raise FrameError(f"record seq {seq}: {nrefs} refs and {data_len} data bytes run past the end")
        refs = tuple((b, bytes(fp)) for b, fp in _REF.iter_unpack(mv[pos + _HEAD : dpos])) if nrefs else ()
        if seq < 1 or op != _WRITE or refs or data_len != length:
            _check(seq, op, length, refs, data_len)  # the common case (a WRITE all inline) passes as is
        append(new(WireRecord, (seq, io_id, vdisk_id, op, flags, offset, length, time_ns, refs, mv[pos:end],
                                mv[dpos:end])))
        pos = end
    if pos != total:
        raise FrameError(f"records: {total - pos} trailing bytes after {n} records")
    return out


def wire_records(records: Iterable[Record]) -> list[WireRecord]:
    """`Record`s as WireRecords (encoded once; ValueError for an invalid
    record, as `frames.encode_record`)."""
    return decode_wire_records(encode_records(records))

