"""A replica's undo log (``undo.log``): the entry layout and its kinds, and
what reads it without a `Distributor` (`undo_key_usage`).  docs/recovery.md
§4 lists every byte; `nicsplit.recovery.replica` writes and lays back the
entries.

Kinds: UNDO_DATA (the replaced bytes in clear), UNDO_ZEROS (they were all
zero: nothing follows), UNDO_SEALED (sealed by `storage.blob.BlobSealer`
with the head's first 36 bytes as associated data), UNDO_IMAGE (state
version 2: the replaced blocks exactly as the sealed image stored them,
tag entries and ciphertext, so a step neither opens the pre-image nor seals
it again; they authenticate only at that image's uid and blocks, and are
checked when laid back).

Example::

    undo_key_usage(Layout(data).replica("cg1") / "undo.log")  # {key id: entries}
"""

from __future__ import annotations

import json
import os
import struct
from array import array
from pathlib import Path
from typing import Any, Iterator

from nicsplit.core.crc32 import crc32
from nicsplit.core.records import BLOCK_SIZE
from nicsplit.recovery.coalesce import IMAGE
from nicsplit.storage.atrest import NONCE_SIZE
from nicsplit.storage.blob import BlobSealer
from nicsplit.storage.sealing import ENTRY_SIZE, ZEROS

__all__ = ["undo_key_usage", "UNDO_MAGIC", "UNDO_DATA", "UNDO_ZEROS", "UNDO_SEALED", "UNDO_IMAGE", "STATE_VERSION",
           "STATE_VERSIONS", "UID_SIZE", "UNDO_HEAD", "UNDO_CRC", "body_len", "crc_len", "Kept", "build_entries"]

UNDO_HEAD = struct.Struct(
    ">"
    "4s"  # magic: b"NSUN"
    "B"  # kind: UNDO_DATA (the replaced bytes follow) or UNDO_ZEROS (they were all zero; nothing follows)
    "3x"  # padding: zero
    "Q"  # seq: the record whose application replaced these bytes
    "Q"  # vdisk_id
    "Q"  # offset: virtual byte offset in the vdisk (= in its image)
    "I"  # length: bytes replaced
    "I"  # crc: zlib.crc32 of the 36 bytes before it followed by the payload (UNDO_IMAGE: up to its ciphertext)
)
assert UNDO_HEAD.size == 40
UNDO_MAGIC = b"NSUN"
UNDO_DATA = 1
UNDO_ZEROS = 2
UNDO_SEALED = 3  # the replaced bytes follow sealed (`storage.blob.BlobSealer`, the 36 head bytes as AAD)
# The replaced blocks as the sealed image stored them, nothing opened or sealed
# again: image uid (16) || the blocks' tag entries (32 each) || their
# ciphertext (length).  They authenticate only at that image's uid and blocks.
UNDO_IMAGE = 4
UNDO_CRC = struct.Struct(">I")  # an undo entry's crc
_UNDO_PAYLOAD = {UNDO_DATA: 0, UNDO_ZEROS: None, UNDO_SEALED: BlobSealer.SEALED_OVERHEAD, UNDO_IMAGE: 16}
UID_SIZE = 16  # a sealed image's uid (`storage.sealed`)
# 2: undo entries of kind UNDO_IMAGE (version 1 has kinds 1-3 only, and stays readable).
STATE_VERSION = 2
STATE_VERSIONS = (1, 2)


def body_len(kind: int, length: int) -> int | None:
    """Bytes of an undo entry's payload after its 40-byte head; None for an unknown kind."""
    extra = _UNDO_PAYLOAD.get(kind, -1)
    if extra is None:
        return 0
    if extra < 0:
        return None
    if kind == UNDO_IMAGE:
        return UID_SIZE + ENTRY_SIZE * -(-length // BLOCK_SIZE) + length
    return length + extra


def crc_len(kind: int, body_len: int, length: int) -> int:
    """Payload bytes an entry's CRC covers (after the head's 36): all of
    them, but for UNDO_IMAGE only uid and tag entries - the ciphertext is
    covered by the GCM tags in those entries, checked when it is laid back
    (a CRC over it cost ~2 us per 4 KiB block, as much as the AEAD call)."""
    return body_len - length if kind == UNDO_IMAGE else body_len


class Kept:
    """The payload of an UNDO_IMAGE entry: image uid, the blocks' tag entries and ciphertext."""

    __slots__ = ("uid", "entries", "ct")

    def __init__(self, uid: bytes, entries: memoryview, ct: memoryview) -> None:
        self.uid, self.entries, self.ct = uid, entries, ct

    def blocks(self) -> Iterator[tuple[int, memoryview, memoryview]]:
        """(index, entry, ciphertext) of each block."""
        for i in range(len(self.entries) // ENTRY_SIZE):
            yield i, self.entries[i * ENTRY_SIZE : (i + 1) * ENTRY_SIZE], self.ct[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE]

    def key_ids(self) -> set[int]:
        return {UNDO_CRC.unpack_from(self.entries, i)[0] for i in range(0, len(self.entries), ENTRY_SIZE)} - {0}


def undo_key_usage(path: str | Path, end: int | None = None, start: int | None = None) -> dict[int, int]:
    """{key id: sealed entries} of an undo log (from ``start`` up to
    ``end``; by default what the replica's state.json says), from the
    entries' heads and key ids alone (nothing is decrypted)."""
    out: dict[int, int] = {}
    if start is None or end is None:
        try:
            st = json.loads((Path(path).parent / "state.json").read_text())
        except (OSError, ValueError):
            st = {}
        start = st.get("undo_start", 0) if start is None else start
        end = st.get("undo_end") if end is None else end
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return out
    try:
        stop = os.fstat(fd).st_size if end is None else end
        pos = start
        while pos + UNDO_HEAD.size <= stop:
            magic, kind, _, _, _, length, _ = UNDO_HEAD.unpack(os.pread(fd, UNDO_HEAD.size, pos))
            size = body_len(kind, length)
            if magic != UNDO_MAGIC or size is None:
                break
            if kind == UNDO_SEALED:
                (k,) = struct.unpack(">I", os.pread(fd, 4, pos + UNDO_HEAD.size))
                if k:
                    out[k] = out.get(k, 0) + 1
            elif kind == UNDO_IMAGE:
                raw = os.pread(fd, size - length - UID_SIZE, pos + UNDO_HEAD.size + UID_SIZE)
                for k in Kept(b"", memoryview(raw), memoryview(b"")).key_ids():
                    out[k] = out.get(k, 0) + 1
            pos += UNDO_HEAD.size + size
    finally:
        os.close(fd)
    return out


def build_entries(recs: list[tuple[int, int, int, int, Any]], pres: list[Any], kept: dict[tuple[int, int], Any],
                  uids: dict[int, bytes], cipher: Any, base: int) -> tuple[list[Any], int, array]:
    """The undo entries of a coalesced step (`nicsplit.recovery.coalesce`),
    to append at offset ``base`` of the log: (the buffers to write in order,
    their total bytes, each entry's offset).  ``recs``: (seq, vdisk, offset,
    length, payload) per record; ``pres``: their pre-images from
    `coalesce.plan` (`IMAGE`: kept as stored, from ``kept`` {(vdisk, block):
    (tag entry, ciphertext) | None (unwritten)}, at image uid ``uids[vdisk]``);
    ``cipher``: `BlobSealer.sealing_cipher()` (None: in clear)."""
    # Sizes first, so the step's undo entries are built in one buffer:
    # heads packed in place, sealed bodies encrypted into it (seal_into).
    # The kept ciphertext of UNDO_IMAGE entries is not copied in: it goes
    # to the log from the buffers read_stored_blocks read it into, as
    # iovecs between the buffer's pieces (`sealing.pwritev_all`).
    zeros = ZEROS
    kinds = []
    total = 0  # bytes of the buffer: the entries but the kept ciphertext
    head_size, sealed_kind = UNDO_HEAD.size, UNDO_SEALED if cipher is not None else UNDO_DATA
    for (_, vid, off, length, _), pre in zip(recs, pres):
        if pre is IMAGE:
            if length <= BLOCK_SIZE:
                unwritten = kept[vid, off // BLOCK_SIZE] is None
            else:
                b0 = off // BLOCK_SIZE
                unwritten = all(kept[vid, b] is None for b in range(b0, -(-(off + length) // BLOCK_SIZE)))
            if unwritten:
                kinds.append(UNDO_ZEROS)
                total += head_size
            else:
                kinds.append(UNDO_IMAGE)
                total += head_size + UID_SIZE + ENTRY_SIZE * -(-length // BLOCK_SIZE)
            continue
        if pre is None or (pre == zeros if len(pre) == BLOCK_SIZE else not bytes(pre).strip(b"\0")):
            kind = UNDO_ZEROS
        else:
            kind = sealed_kind
        kinds.append(kind)
        total += head_size if kind == UNDO_ZEROS else head_size + body_len(kind, length)  # type: ignore[operator]
    undo = bytearray(total)
    mv = memoryview(undo)
    zview = memoryview(zeros)
    nonces = os.urandom(NONCE_SIZE * kinds.count(UNDO_SEALED)) if cipher is not None else b""
    seal_into, pack_into, crc_into = BlobSealer.seal_into, UNDO_HEAD.pack_into, UNDO_CRC.pack_into
    offs = array("Q")
    parts: list[Any] = []  # the log's bytes in order: pieces of the buffer and kept ciphertext
    p = q = cut = ct = 0  # ct: kept ciphertext bytes so far (file offset = base + p + ct)
    offs_append, parts_append = offs.append, parts.append
    for (seq, vid, off, length, _), pre, kind in zip(recs, pres, kinds):
        offs_append(base + p + ct)
        pack_into(undo, p, UNDO_MAGIC, kind, seq, vid, off, length, 0)
        head = mv[p : p + 36]
        if kind == UNDO_ZEROS:  # nothing follows the head (the most common entry on a fresh replica)
            crc_into(undo, p + 36, crc32(head))
            p += head_size
            continue
        b0 = p + head_size
        if kind == UNDO_IMAGE:
            # uid || entries || ciphertext; an unwritten block: a zero entry, zero bytes
            nb = -(-length // BLOCK_SIZE)
            mv[b0 : b0 + UID_SIZE] = uids[vid]
            e = b0 + UID_SIZE + nb * ENTRY_SIZE
            if nb == 1:  # one block (the common case)
                got = kept[vid, off // BLOCK_SIZE]
                mv[e - ENTRY_SIZE : e] = got[0]
                crc_into(undo, p + 36, crc32(mv[b0:e], crc32(head)))
                parts_append(mv[cut:e])
                parts_append(got[1])
                if len(got[1]) < length:  # the image's short last block, resized since
                    parts_append(zview[: length - len(got[1])])
            else:
                blk = off // BLOCK_SIZE
                gots = [kept[vid, blk + i] for i in range(nb)]
                for i, got in enumerate(gots):
                    if got is not None:
                        x = b0 + UID_SIZE + i * ENTRY_SIZE
                        mv[x : x + ENTRY_SIZE] = got[0]
                crc_into(undo, p + 36, crc32(mv[b0:e], crc32(head)))
                parts_append(mv[cut:e])
                for i, got in enumerate(gots):
                    n = min(BLOCK_SIZE, length - i * BLOCK_SIZE)
                    c = got[1] if got is not None else zview[:0]
                    parts_append(c)
                    if len(c) < n:
                        parts_append(zview[: n - len(c)])
            cut = p = e
            ct += length
            continue
        if kind == UNDO_SEALED:
            e = b0 + length + BlobSealer.SEALED_OVERHEAD
            seal_into(cipher[0], cipher[1], nonces[q : q + NONCE_SIZE], pre, head, mv[b0:e])  # type: ignore[index]
            q += NONCE_SIZE
        else:
            e = b0 + length
            mv[b0:e] = pre
        crc_into(undo, p + 36, crc32(mv[b0:e], crc32(head)))
        p = e
    if cut < p:
        parts_append(mv[cut:p])
    return parts, p + ct, offs
