"""Volume files (`vol-NNNN.dsk`) and the raw file operations on them.

Rules:
- A volume is ``volume_size`` bytes at most: extent 0 holds the header, data
  extents 1.. follow. Physical extent ``p`` lives at byte ``(p + 1) *
  extent_size``, so no vdisk byte ever sits at physical == virtual by accident.
- The file is sparse and its length is ``(1 + high water mark) *
  extent_size``; it only grows by whole extents (ftruncate), so a read inside
  an allocated extent is never short.
- Freed space is given back with ``fallocate(PUNCH_HOLE | KEEP_SIZE)``; a
  punched range reads zeros, which is what makes extent reuse safe.
- Filesystems without PUNCH_HOLE or ZERO_RANGE fall back to writing zeros
  (`nicsplit.core.fsutil`).
"""

from __future__ import annotations

import os
import struct
import uuid as _uuid

from nicsplit.core.fsutil import fsync_dir

from .errors import CorruptDatastore, DatastoreError
from nicsplit.core.crc32 import crc32

VOLUME_MAGIC = b"NSDSVOL1"
VOLUME_VERSION = 1

# Volume header, at byte 0 of every volume; the rest of extent 0 is a hole.
VOLUME_HEADER = struct.Struct(
    "<"
    "8s"  # magic: b"NSDSVOL1"
    "I"  # version: 1
    "I"  # volume index: N of vol-NNNN.dsk
    "16s"  # datastore uuid (raw bytes), ties the volume to its catalog
    "Q"  # extent size in bytes
    "Q"  # volume size (max bytes of this file, header extent included)
    "I"  # CRC-32 of all bytes above
)
assert VOLUME_HEADER.size == 52

def volume_name(index: int) -> str:
    return f"vol-{index:04d}.dsk"


def encode_header(index: int, ds_uuid: _uuid.UUID, extent_size: int, volume_size: int) -> bytes:
    body = VOLUME_HEADER.pack(VOLUME_MAGIC, VOLUME_VERSION, index, ds_uuid.bytes, extent_size, volume_size, 0)
    return body[:-4] + struct.pack("<I", crc32(body[:-4]))


def create_volume(dirpath: str, index: int, ds_uuid: _uuid.UUID, extent_size: int, volume_size: int) -> int:
    """Create vol-<index>.dsk with its header extent, durably; return an O_RDWR fd.

    The volume is built under a temporary name and linked into place whole:
    volumes are found by listing the directory, so a crash mid-create must
    leave no volume or a complete one, never a file without its header.
    ``link`` (unlike ``rename``) refuses an existing name, as O_EXCL did."""
    path = os.path.join(dirpath, volume_name(index))
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.pwrite(fd, encode_header(index, ds_uuid, extent_size, volume_size), 0)
        os.ftruncate(fd, extent_size)
        os.fsync(fd)
        os.link(tmp, path)
        os.unlink(tmp)
        fsync_dir(dirpath)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_volume(dirpath: str, index: int, ds_uuid: _uuid.UUID, extent_size: int) -> int:
    """Open and validate an existing volume; return an O_RDWR fd."""
    path = os.path.join(dirpath, volume_name(index))
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        raw = os.pread(fd, VOLUME_HEADER.size, 0)
        if len(raw) != VOLUME_HEADER.size:
            raise CorruptDatastore(f"{path}: short volume header ({len(raw)} bytes)")
        magic, version, idx, uu, es, _vs, crc = VOLUME_HEADER.unpack(raw)
        if magic != VOLUME_MAGIC:
            raise CorruptDatastore(f"{path}: bad volume magic {magic!r}")
        if crc != crc32(raw[:-4]):
            raise CorruptDatastore(f"{path}: volume header CRC mismatch")
        if version != VOLUME_VERSION:
            raise CorruptDatastore(f"{path}: unsupported volume version {version}")
        if uu != ds_uuid.bytes:
            raise CorruptDatastore(f"{path}: belongs to datastore {_uuid.UUID(bytes=uu)}, not {ds_uuid}")
        if idx != index:
            raise CorruptDatastore(f"{path}: header says volume {idx}, file name says {index}")
        if es != extent_size:
            raise CorruptDatastore(f"{path}: extent size {es} != catalog extent size {extent_size}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_extent_size(extent_size: int, volume_size: int) -> None:
    if extent_size <= 0 or extent_size % 4096:
        raise DatastoreError(f"extent_size {extent_size} must be a positive multiple of 4096")
    if volume_size % extent_size or volume_size < 2 * extent_size:
        raise DatastoreError(
            f"volume_size {volume_size} must be a multiple of extent_size {extent_size} "
            "and hold the header extent plus at least one data extent"
        )
