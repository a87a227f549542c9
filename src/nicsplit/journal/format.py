"""The journal's on-disk format: the one codec of segments, entries, commits
and carried blocks (docs/journal.md §1 lists every byte).  No IO here.

Every module that reads or writes journal bytes — the writer, the recovery
scanner (`nicsplit.journal.scan`), the record readers (`nicsplit.journal.reader`)
— takes its layouts, tags and names from this module, so a format change is
made in one place and a reader can never silently disagree with the writer.

A journal directory holds segments ``00000001.seg``, ``00000002.seg``, ...
(numbered from 1, no gaps but for the oldest ones trimmed by retention) and
possibly ``carried.blk``.  A segment is a 24-byte header then entries; an
entry is a 12-byte head (size, tag, CRC-32 over head and payload) then its
payload:

* RECORD — one `nicsplit.wire.frames.Record` in the wire record layout, data
  blocks inline and deduplicated blocks kept as references (fingerprints);
  in a sealed segment (version 2) everything after the record head is sealed
  with AES-256-GCM (`seal_record_entry`, `open_record_payload`);
* COMMIT — closes a batch: batch id, seq range, time range, record count.

Example::

    buf = segment_head(1, 0) + encode_entry(TAG_COMMIT, encode_commit(7, 1, 3, t0, t1, 0))
    key_id, why = parse_segment_head(buf, 1, "here")      # (0, None)
    size, tag, crc = ENTRY.unpack_from(buf, SEGMENT_HEAD.size)
"""

from __future__ import annotations

import struct
from typing import Callable, Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from nicsplit.core.records import Op
from nicsplit.storage import atrest
from nicsplit.wire.frames import (
    BLOCK_SIZE, RECORD_HEAD, RECORD_HEAD_SIZE, REF_SIZE, FrameError, Record, block_spans, decode_record, decode_record_split,
)
from nicsplit.core.crc32 import crc32

__all__ = [
    "JournalError", "JournalCorrupt", "SEGMENT_SUFFIX", "SEGMENT_MAGIC", "JOURNAL_VERSION", "SEALED_VERSION",
    "FLAG_SEALED", "SEGMENT_HEAD", "ENTRY", "TAG_RECORD", "TAG_COMMIT", "COMMIT", "COMMIT_PREFIX", "RECORD_HEAD",
    "SEALED_OVERHEAD", "CARRIED_NAME", "CARRY", "CARRY_MAGIC", "CARRY_SEGMENT", "OPS",
    "seg_name", "seg_number", "segment_head", "parse_segment_head", "encode_entry", "encode_commit",
    "seal_record_entry", "seal_record_entries_into", "sealed_entries_size", "open_record_payload", "read_record_at",
    "read_payload_at", "read_payloads_at",
    "data_blocks", "data_offset",
    "encode_carried", "carried_entries", "open_carried",
]


class JournalError(Exception):
    """The journal cannot be used (IO failure, failed state, lock held)."""


class JournalCorrupt(JournalError):
    """Committed data failed its check: names the segment and offset."""


# -- segments ---------------------------------------------------------------------------

SEGMENT_SUFFIX = ".seg"
SEGMENT_MAGIC = b"NSJS"
JOURNAL_VERSION = 1  # records in clear (every journal before at-rest encryption)
SEALED_VERSION = 2  # RECORD payloads sealed with AES-256-GCM
FLAG_SEALED = 0x0001  # version 2 flags: the one flag, always set

SEGMENT_HEAD = struct.Struct(
    ">"
    "4s"  # magic: b"NSJS"
    "H"  # version: JOURNAL_VERSION (clear) or SEALED_VERSION
    "H"  # flags: 0 (version 1), FLAG_SEALED (version 2)
    "Q"  # segment number: equals the number in the file name
    "I"  # key id: 0 (version 1); the at-rest key sealing the records (version 2)
    "I"  # crc: zlib.crc32 of the 20 bytes before it
)
assert SEGMENT_HEAD.size == 24


def seg_name(n: int) -> str:
    """The file name of segment ``n``: ``00000001.seg``."""
    return f"{n:08d}{SEGMENT_SUFFIX}"


def seg_number(name: str) -> int | None:
    """The number of a segment file name, None for any other name (an
    irregular one like ``1.seg`` too: `seg_name` would not give it)."""
    if not name.endswith(SEGMENT_SUFFIX):
        return None
    stem = name[: -len(SEGMENT_SUFFIX)]
    if not stem.isdigit() or seg_name(int(stem)) != name:
        return None
    return int(stem)


def segment_head(seg: int, key_id: int) -> bytes:
    """The header of segment ``seg``: version 1 (records in clear) when
    ``key_id`` is 0, else version 2 sealed under at-rest key ``key_id``."""
    if key_id:
        head = SEGMENT_HEAD.pack(SEGMENT_MAGIC, SEALED_VERSION, FLAG_SEALED, seg, key_id, 0)[:20]
    else:
        head = SEGMENT_HEAD.pack(SEGMENT_MAGIC, JOURNAL_VERSION, 0, seg, 0, 0)[:20]
    return head + struct.pack(">I", crc32(head))


def parse_segment_head(buf: bytes | memoryview, seg: int, where: str) -> tuple[int, str | None]:
    """(key id, None) for an intact header of segment ``seg`` (key id 0 =
    records in clear); (0, why) for a damaged one (torn, bad magic or CRC).
    An intact header this code cannot read (version, flags, number) raises
    `JournalCorrupt` naming ``where``."""
    if len(buf) < SEGMENT_HEAD.size:
        return 0, f"segment header truncated ({len(buf)} bytes)"
    magic, version, flags, number, key_id, crc = SEGMENT_HEAD.unpack_from(buf, 0)
    if crc32(buf[:20]) != crc or magic != SEGMENT_MAGIC:
        return 0, "bad segment header"
    if not ((version == JOURNAL_VERSION and flags == 0 and key_id == 0)
            or (version == SEALED_VERSION and flags == FLAG_SEALED and key_id)):
        raise JournalCorrupt(f"{where}: journal version {version} flags {flags} not supported")
    if number != seg:
        raise JournalCorrupt(f"{where}: header says segment {number}")
    return key_id, None


# -- entries ----------------------------------------------------------------------------

ENTRY = struct.Struct(
    ">"
    "I"  # size: payload bytes that follow the head
    "B"  # tag: TAG_RECORD or TAG_COMMIT
    "3s"  # padding: zero (read as bytes so a reader can check it)
    "I"  # crc: zlib.crc32 of the first 8 head bytes followed by the payload
)
assert ENTRY.size == 12

TAG_RECORD = 1
TAG_COMMIT = 2

COMMIT = struct.Struct(
    ">"
    "Q"  # batch_id: from the card's Batch
    "Q"  # first_seq: first seq this commit applies (after duplicate trimming)
    "Q"  # last_seq: last seq covered; the journal's last_seq after it (a PIT's seq)
    "Q"  # t_first_ns: batch time range start
    "Q"  # t_last_ns: batch time range end (a PIT's time)
    "I"  # records: RECORD entries since the previous COMMIT
)
assert COMMIT.size == 44

# What every COMMIT entry head starts with (size + tag + padding): searched for
# after a damaged entry to resynchronise (`nicsplit.journal.scan.find_commit`).
COMMIT_PREFIX = ENTRY.pack(COMMIT.size, TAG_COMMIT, b"", 0)[:8]

# RECORD_HEAD (nicsplit.wire.frames, docs/wire.md §3) is in clear in sealed
# segments too, so the keyless scanner reads seq, vdisk, op, flags, offset,
# length and time from it; it is re-exported here with the journal's layouts.

OPS = frozenset(int(o) for o in Op)

# A sealed RECORD payload: the wire record head (clear) ‖ 12-byte nonce ‖
# GCM(refs ‖ data) ‖ 16-byte tag — 28 bytes more than the clear payload.
SEALED_OVERHEAD = atrest.NONCE_SIZE + atrest.TAG_SIZE
assert SEALED_OVERHEAD == 28


_CRC = struct.Struct(">I")
_POS = struct.Struct(">Q")  # a sealed record's segment offset in its AAD (`_aad`)


def encode_entry(tag: int, payload: bytes) -> bytes:
    """An entry: head (size, tag, CRC over head and payload), then ``payload``."""
    head8 = ENTRY.pack(len(payload), tag, b"", 0)[:8]
    return b"".join((head8, _CRC.pack(crc32(payload, crc32(head8))), payload))  # one copy of the payload


def encode_commit(batch_id: int, first_seq: int, last_seq: int, t_first_ns: int, t_last_ns: int,
                  records: int) -> bytes:
    """The COMMIT entry closing a batch of ``records`` RECORD entries."""
    return encode_entry(TAG_COMMIT, COMMIT.pack(batch_id, first_seq, last_seq, t_first_ns, t_last_ns, records))


def data_blocks(rec: Record) -> Iterator[tuple[int, int, int]]:
    """(block index, offset in rec.data, length) of the blocks carried inline."""
    if rec.op != Op.WRITE:
        return
    refs = {b for b, _ in rec.refs}
    dpos = 0
    for i in range(block_spans(rec.length)):
        n = min(BLOCK_SIZE, rec.length - i * BLOCK_SIZE)
        if i not in refs:
            yield i, dpos, n
            dpos += n


def data_offset(rec: Record) -> int:
    """Offset of ``rec.data`` inside its encoded record (wire layout)."""
    return RECORD_HEAD_SIZE + REF_SIZE * len(rec.refs)


# -- sealed records (at-rest encryption) ---------------------------------------------


def _aad(head8: bytes | memoryview, pos: int, rec_head: bytes | memoryview) -> bytes:
    # What a sealed record authenticates besides its ciphertext: entry size and
    # tag, where the entry is (a moved entry fails), the clear record head.
    return bytes(head8) + pos.to_bytes(8, "big") + bytes(rec_head)


def seal_record_entry(cipher: AESGCM, pos: int, encoded: bytes, nonce: bytes) -> bytes:
    """The sealed RECORD entry of the wire record ``encoded`` written at
    segment offset ``pos``.  ``nonce``: 12 fresh random bytes."""
    head8 = ENTRY.pack(len(encoded) + SEALED_OVERHEAD, TAG_RECORD, b"", 0)[:8]
    view = memoryview(encoded)
    rec_head = view[:RECORD_HEAD_SIZE]
    sealed = cipher.encrypt(nonce, view[RECORD_HEAD_SIZE:], _aad(head8, pos, rec_head))
    crc = crc32(sealed, crc32(nonce, crc32(rec_head, crc32(head8))))
    return b"".join((head8, struct.pack(">I", crc), rec_head, nonce, sealed))


def sealed_entries_size(records: list[bytes | memoryview]) -> int:
    """Bytes the sealed RECORD entries of ``records`` (wire records) take."""
    return len(records) * (ENTRY.size + SEALED_OVERHEAD) + sum(map(len, records))


# A sealed RECORD entry up to its ciphertext, as `seal_record_entry` lays it
# out, and the associated data it seals with (`_aad`'s bytes), as one pack each.
_SEALED_HEAD = struct.Struct(
    ">"
    "8s"  # entry head: size, tag, padding
    "I"  # entry CRC: 0 here, written once the entry is complete
    f"{RECORD_HEAD_SIZE}s"  # the wire record head (in clear)
    f"{atrest.NONCE_SIZE}s"  # the record's nonce
)
assert _SEALED_HEAD.size == ENTRY.size + RECORD_HEAD_SIZE + atrest.NONCE_SIZE == 82
_AAD = struct.Struct(f">8sQ{RECORD_HEAD_SIZE}s")  # entry head8, entry offset, record head
assert _AAD.size == 74


def seal_record_entries_into(cipher: AESGCM, pos: int, records: list[bytes | memoryview], nonces: bytes,
                             buf: bytearray | memoryview, start: int = 0) -> list[int]:
    """`seal_record_entry` for consecutive entries from segment offset
    ``pos`` on (``nonces``: 12 fresh bytes per record), written into
    ``buf`` from index ``start`` on: ``buf[start:start + sealed_entries_size(records)]``
    is then byte for byte the concatenation of the `seal_record_entry` results.
    Each record is sealed straight into its place (``encrypt_into``: no
    ciphertext object per record, no join), the part before its ciphertext is
    one ``pack_into``, and its entry CRC is one call over the contiguous
    record head ‖ nonce ‖ ciphertext.  Returns each entry's segment offset."""
    at: list[int] = []
    heads: dict[int, tuple[bytes, int]] = {}  # entry size -> (head8, crc of head8): records share sizes
    encrypt, put_crc = cipher.encrypt_into, _CRC.pack_into
    put_head, aad = _SEALED_HEAD.pack_into, _AAD.pack
    mv = memoryview(buf)
    ns, h, e, c = atrest.NONCE_SIZE, RECORD_HEAD_SIZE, ENTRY.size, _SEALED_HEAD.size
    p, k = start, 0
    for enc in records:
        size = len(enc) + SEALED_OVERHEAD
        hc = heads.get(size)
        if hc is None:
            head8 = ENTRY.pack(size, TAG_RECORD, b"", 0)[:8]
            hc = heads[size] = (head8, crc32(head8))
        head8, crc = hc
        rec_head = bytes(enc[:h])
        nonce = nonces[k : k + ns]
        k += ns
        end = p + e + size
        put_head(buf, p, head8, 0, rec_head, nonce)
        encrypt(nonce, enc[h:], aad(head8, pos, rec_head), mv[p + c : end])
        put_crc(buf, p + 8, crc32(mv[p + e : end], crc))
        at.append(pos)
        pos += e + size
        p = end
    return at


def open_record_payload(cipher: AESGCM | None, pos: int, head8: bytes | memoryview, payload: bytes | memoryview,
                        where: str) -> Record:
    """The record of a RECORD entry whose CRC was checked: decrypted when its
    segment is sealed (``cipher``), decoded.  Every record read goes through
    here — the one place that decrypts."""
    if cipher is not None:
        if len(payload) < RECORD_HEAD_SIZE + SEALED_OVERHEAD:
            raise JournalCorrupt(f"{where}: sealed record entry of {len(payload)} bytes is too short")
        view = memoryview(payload)
        rec_head = view[:RECORD_HEAD_SIZE]
        nonce = bytes(view[RECORD_HEAD_SIZE : RECORD_HEAD_SIZE + atrest.NONCE_SIZE])
        try:
            plain = cipher.decrypt(nonce, view[RECORD_HEAD_SIZE + atrest.NONCE_SIZE :], _aad(head8, pos, rec_head))
        except InvalidTag:
            raise JournalCorrupt(f"{where}: record fails authentication (altered on disk, "
                                 f"or sealed under another key)") from None
        try:
            return decode_record_split(rec_head, plain)
        except FrameError as e:
            raise JournalCorrupt(f"{where}: record does not decode: {e}") from None
    try:
        rec, end = decode_record(payload)
    except FrameError as e:
        raise JournalCorrupt(f"{where}: record does not decode: {e}") from None
    if end != len(payload):
        raise JournalCorrupt(f"{where}: trailing bytes after record")
    return rec


def read_record_at(pread: Callable[[int, int], bytes | memoryview], cipher: AESGCM | None, pos: int,
                   where: str) -> Record:
    """The record whose entry starts at ``pos`` of a segment read through
    ``pread(offset, length)``: entry CRC checked, then `open_record_payload`."""
    head = pread(pos, ENTRY.size)
    if len(head) != ENTRY.size:
        raise JournalCorrupt(f"{where}: entry head truncated")
    size, tag, _pad, crc = ENTRY.unpack(head)
    payload = pread(pos + ENTRY.size, size)
    # A sealed entry's GCM tag authenticates every byte the CRC covers (the
    # head and record head as associated data, the nonce through the key
    # stream), so the CRC, a second pass over the payload, is skipped there.
    if tag != TAG_RECORD or len(payload) != size or (
            cipher is None and crc32(payload, crc32(head[:8])) != crc):
        raise JournalCorrupt(f"{where}: record entry fails its check")
    return open_record_payload(cipher, pos, head[:8], payload, where)


def read_payload_at(buf: memoryview, base: int, cipher: AESGCM | None, pos: int, where: str
                    ) -> tuple[int, bytes] | None:
    """(seq, payload: a WRITE's data, b"" for other ops) of the record whose
    entry starts at segment offset ``pos``, from ``buf`` (the segment's bytes
    from offset ``base``); None when the entry is not wholly in ``buf`` or
    the record carries references (read those with `read_record_at`).  The
    checks are `read_record_at`'s and `decode_record_split`'s, without
    building a `Record`: what a distribution step reads per record."""
    at = pos - base
    if at < 0 or at + ENTRY.size > len(buf):
        return None
    size, tag, _pad, crc = ENTRY.unpack_from(buf, at)
    if at + ENTRY.size + size > len(buf):
        return None
    payload = buf[at + ENTRY.size : at + ENTRY.size + size]
    if tag != TAG_RECORD:
        raise JournalCorrupt(f"{where}: record entry fails its check")
    if cipher is not None:
        if size < RECORD_HEAD_SIZE + SEALED_OVERHEAD:
            raise JournalCorrupt(f"{where}: sealed record entry of {size} bytes is too short")
        rec_head = payload[:RECORD_HEAD_SIZE]
        n0 = RECORD_HEAD_SIZE + atrest.NONCE_SIZE
        try:
            body = cipher.decrypt(payload[RECORD_HEAD_SIZE:n0], payload[n0:],
                                  _aad(buf[at : at + 8], pos, rec_head))
        except InvalidTag:
            raise JournalCorrupt(f"{where}: record fails authentication (altered on disk, "
                                 f"or sealed under another key)") from None
    else:
        if crc32(payload, crc32(buf[at : at + 8])) != crc:
            raise JournalCorrupt(f"{where}: record entry fails its check")
        rec_head, body = payload[:RECORD_HEAD_SIZE], payload[RECORD_HEAD_SIZE:]
    if len(rec_head) != RECORD_HEAD_SIZE:
        raise JournalCorrupt(f"{where}: record does not decode: record head of {len(rec_head)} bytes")
    seq, _, _, op, _, _, length, _, nrefs, data_len = RECORD_HEAD.unpack(rec_head)
    if nrefs:
        return None
    bad = None
    if data_len != len(body):
        bad = f"record seq {seq}: {nrefs} refs and {data_len} data bytes do not fill {len(body)} bytes"
    elif op not in OPS:
        bad = f"record seq {seq}: unknown op {op}"
    elif seq < 1:
        bad = f"record seq {seq}: sequence numbers start at 1"
    elif op != Op.WRITE and data_len:
        bad = f"record seq {seq}: op {Op(op).name} carries no data or refs"
    elif op == Op.WRITE and data_len != length:
        bad = f"record seq {seq}: {data_len} data bytes, expected {length} (length {length} minus 0 blocks by reference)"
    if bad:
        raise JournalCorrupt(f"{where}: record does not decode: {bad}")
    return seq, (body if isinstance(body, bytes) else bytes(body)) if op == Op.WRITE else b""


def read_payloads_at(buf: memoryview, base: int, cipher: AESGCM | None, positions: list[int], where: str
                     ) -> list[tuple[int, bytes | memoryview] | None]:
    """`read_payload_at` of each record at ``positions`` (entries in ``buf``,
    the segment's bytes from ``base``), with its checks and answers; the
    error text is ``where`` + " offset N", built only for an error, and the
    associated data is packed into one reused buffer.  (``decrypt_into``
    into one buffer for the whole read measured slower here: 5.3 against
    4.4 us per 4 KiB record, the buffer has to be zeroed or faulted in
    first.)  Clear payloads are views of ``buf``."""
    if cipher is None:
        return [read_payload_at(buf, base, None, pos, f"{where} offset {pos}") for pos in positions]
    unpack_entry, n = ENTRY.unpack_from, len(buf)
    aad = bytearray(8 + 8 + RECORD_HEAD_SIZE)  # entry size and tag, pos, record head (`_aad`), refilled per record
    pack_pos, unpack_head, decrypt = _POS.pack_into, RECORD_HEAD.unpack_from, cipher.decrypt
    write, ops = int(Op.WRITE), OPS
    out: list[tuple[int, bytes | memoryview] | None] = []
    h0, n0, c0 = ENTRY.size, ENTRY.size + RECORD_HEAD_SIZE, ENTRY.size + RECORD_HEAD_SIZE + atrest.NONCE_SIZE
    for pos in positions:
        at = pos - base
        if at < 0 or at + ENTRY.size > n:
            out.append(None)
            continue
        size, tag, _pad, _crc = unpack_entry(buf, at)
        end = at + ENTRY.size + size
        if end > n:
            out.append(None)
            continue
        if tag != TAG_RECORD:
            raise JournalCorrupt(f"{where} offset {pos}: record entry fails its check")
        if size < RECORD_HEAD_SIZE + SEALED_OVERHEAD:
            raise JournalCorrupt(f"{where} offset {pos}: sealed record entry of {size} bytes is too short")
        blen = size - RECORD_HEAD_SIZE - SEALED_OVERHEAD
        aad[0:8] = buf[at : at + 8]
        pack_pos(aad, 8, pos)
        aad[16:] = buf[at + h0 : at + n0]
        try:
            body = decrypt(buf[at + n0 : at + c0], buf[at + c0 : end], aad)
        except InvalidTag:
            raise JournalCorrupt(f"{where} offset {pos}: record fails authentication (altered on disk, "
                                 f"or sealed under another key)") from None
        seq, _, _, op, _, _, length, _, nrefs, data_len = unpack_head(buf, at + h0)
        if nrefs:
            out.append(None)
            continue
        if data_len != blen or op not in ops or seq < 1 or (op != write and data_len) or \
                (op == write and data_len != length):
            read_payload_at(buf, base, cipher, pos, f"{where} offset {pos}")  # raises the precise error
            raise JournalCorrupt(f"{where} offset {pos}: record does not decode")  # (not reached)
        out.append((seq, body if op == write else b""))
    return out


# -- carried blocks ---------------------------------------------------------------------
# Blocks a kept record references whose segment retention trims (docs/journal.md
# §1, docs/recovery.md §10): ``carried.blk`` in the journal directory, entries
# of this head, then the block (sealed with the pseudo-segment 0's key when
# key_id is not 0: segments count from 1, so its derived key is used nowhere
# else).

CARRIED_NAME = "carried.blk"
CARRY = struct.Struct(
    ">"
    "4s"  # magic: b"NSCB"
    "I"  # at-rest key id (0: clear)
    "16s"  # fingerprint of the plain block
    "I"  # stored length (plain + 16-byte GCM tag when sealed)
    "12s"  # nonce (zeros when clear)
    "I"  # crc: zlib.crc32 of the head before it and the stored bytes
)
assert CARRY.size == 44
CARRY_MAGIC = b"NSCB"
CARRY_SEGMENT = 0  # the "segment" of a carried block's location: (0, entry offset)


def encode_carried(cipher: AESGCM | None, key_id: int, fp: bytes, plain: bytes, nonce: bytes) -> bytes:
    """The carried.blk entry of block ``fp`` (``plain``), sealed when
    ``cipher`` is given (``key_id`` names its key; ``nonce`` 12 fresh bytes)."""
    if cipher is None:
        nonce = bytes(atrest.NONCE_SIZE)
    head = CARRY.pack(CARRY_MAGIC, key_id, fp, len(plain) + (atrest.TAG_SIZE if cipher else 0), nonce, 0)[:-4]
    stored = cipher.encrypt(nonce, plain, head[:24]) if cipher is not None else plain
    return head + struct.pack(">I", crc32(stored, crc32(head))) + stored


def carried_entries(buf: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """(offset, end, key id, fingerprint) of each intact entry of a carried.blk,
    in order, up to the first torn or damaged one (a crash while carrying)."""
    view = memoryview(buf)
    pos = 0
    while pos + CARRY.size <= len(buf):
        magic, key_id, fp, n, _nonce, crc = CARRY.unpack_from(buf, pos)
        end = pos + CARRY.size + n
        if magic != CARRY_MAGIC or end > len(buf) or crc32(
                view[pos + CARRY.size : end], crc32(view[pos : pos + CARRY.size - 4])) != crc:
            return
        yield pos, end, key_id, fp
        pos = end


def open_carried(head: bytes, stored: bytes, fp: bytes, cipher_for: Callable[[int], AESGCM | None],
                 where: str) -> bytes:
    """The plain block of a carried.blk entry (``head`` and the ``stored``
    bytes after it) that must hold block ``fp``; ``cipher_for(key id)``."""
    magic, key_id, hfp, n, nonce, _crc = CARRY.unpack(head)
    if magic != CARRY_MAGIC or hfp != fp or len(stored) != n:
        raise JournalCorrupt(f"{where}: not the carried block {fp.hex()}")
    if not key_id:
        return stored
    cipher = cipher_for(key_id)
    assert cipher is not None
    try:
        return cipher.decrypt(nonce, stored, head[:24])
    except InvalidTag:
        raise JournalCorrupt(f"{where}: carried block fails authentication") from None
