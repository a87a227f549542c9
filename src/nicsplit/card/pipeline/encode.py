"""The card's own record encoder: a batch's records encoded as they join it.

``encode_record_fields`` gives ``frames.encode_record``'s bytes for the record
its fields make, without building a `frames.Record` and without the
per-record checks: the card builds these records itself from writes resolve
checked, one per write on its steady path (the appliance still checks every
record it decodes). A field out of range still raises the ValueError
``encode_record`` gives. ``join_records`` makes the batch plaintext
(``frames.encode_records``'s layout) from records already encoded.

The layouts are frames' (``RECORD_HEAD``, ``REF``, ``RECORDS_COUNT``);
tests/unit/test_frames_fields.py holds both encoders to the same bytes.

Example::

    enc = encode_record_fields(seq, io_id, vdisk_id, op, flags, offset, length, time_ns, data)
    plain = join_records([enc, ...])
"""

from __future__ import annotations

import struct

from nicsplit.wire.frames import RECORD_HEAD, RECORDS_COUNT, REF, Record, encode_record

_head = RECORD_HEAD.pack
_ref = REF.pack
_count = RECORDS_COUNT.pack


def encode_record_fields(seq: int, io_id: int, vdisk_id: int, op: int, flags: int, offset: int, length: int,
                         time_ns: int, data: bytes | bytearray | memoryview,
                         refs: tuple[tuple[int, bytes], ...] = ()) -> bytes:
    """``frames.encode_record(Record(...))`` of these fields, byte for byte."""
    try:
        if not refs:
            return _head(seq, io_id, vdisk_id, op, flags, offset, length, time_ns, 0, len(data)) + data
        nrefs = len(refs)
        head = _head(seq, io_id, vdisk_id, op, flags, offset, length, time_ns, nrefs, len(data))
    except struct.error:  # encode_record names the culprit
        return encode_record(Record(seq, io_id, vdisk_id, op, flags, offset, length, time_ns, bytes(data), refs))
    if nrefs == 1:  # one 4 KiB block by reference: the common dedup hit
        ((b, fp),) = refs
        return b"".join((head, _ref(b, fp), data))
    return b"".join([head, *(_ref(b, fp) for b, fp in refs), data])


def join_records(encoded: list[bytes]) -> bytes:
    """The plaintext of a batch from records already encoded: the bytes
    ``frames.encode_records`` gives for the same records."""
    return b"".join([_count(len(encoded)), *encoded])
