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
from pathlib import Path
from typing import Iterator

from nicsplit.core.records import BLOCK_SIZE
from nicsplit.storage.blob import BlobSealer
from nicsplit.storage.sealing import ENTRY_SIZE

__all__ = ["undo_key_usage", "UNDO_MAGIC", "UNDO_DATA", "UNDO_ZEROS", "UNDO_SEALED", "UNDO_IMAGE", "STATE_VERSION",
           "STATE_VERSIONS", "UID_SIZE", "UNDO_HEAD", "UNDO_CRC", "body_len", "crc_len", "Kept"]

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
