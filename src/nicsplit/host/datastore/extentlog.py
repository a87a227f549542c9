"""The extent log (`extents.log`): the persistent virtual → physical map.

Rules:
- Append-only: a header, then fixed-size records, each with its own CRC.
  Records are never modified in place; the file is only ever rewritten as a
  whole (compaction: write a new file, fsync, rename, fsync the directory).
- MAP(vdisk, vext, vol, pext) is appended with os.write *before* any data is
  written to the extent, so after a kill -9 every written extent is mapped.
  UNMAP is appended *after* the extent was hole-punched, so an extent that the
  log calls free never holds data that a replay would hand to a new owner.
- Replay (see `scan`): a short or bad-CRC record followed only by bad records
  is a torn tail (a crash during append) and is cut off with a warning; a bad
  record followed by a good one is corruption and a hard error.
- `scan` is pure (bytes in, records out); `ExtentLog` is the thin IO shell.
"""

from __future__ import annotations

import logging
import os
import struct
import uuid as _uuid
from dataclasses import dataclass

from .errors import CorruptDatastore, DatastoreError
from nicsplit.core.fsutil import atomic_write, fsync_dir
from nicsplit.core.crc32 import crc32

log = logging.getLogger(__name__)

LOG_MAGIC = b"NSDSLOG1"
LOG_VERSION = 1

# Log header, at byte 0 of extents.log.
LOG_HEADER = struct.Struct(
    "<"
    "8s"  # magic: b"NSDSLOG1"
    "I"  # version: 1
    "I"  # record size in bytes (32): a reader refuses any other size
    "16s"  # datastore uuid (raw bytes), ties the log to its catalog
    "Q"  # extent size in bytes
    "I"  # CRC-32 of all bytes above
)
assert LOG_HEADER.size == 44

# One map change. 32 bytes: a 1 TiB vdisk fully written at 1 MiB extents
# costs 1 Mi records = 32 MiB of log before compaction.
RECORD = struct.Struct(
    "<"
    "B"  # op: 1 = MAP, 2 = UNMAP
    "3x"  # reserved, zero
    "I"  # vdisk id (catalog id, never reused)
    "Q"  # virtual extent index within the vdisk
    "I"  # volume index (vol-NNNN.dsk)
    "Q"  # physical extent index within the volume (data extents count from 0)
    "I"  # CRC-32 of the 28 bytes above
)
assert RECORD.size == 32

OP_MAP = 1
OP_UNMAP = 2
_OPS = (OP_MAP, OP_UNMAP)
_BODY = RECORD.size - 4
_CRC = struct.Struct("<I")

Record = tuple[int, int, int, int, int]  # (op, vdisk id, vext, volume, pext)


def encode_record(op: int, vid: int, vext: int, vol: int, pext: int) -> bytes:
    body = RECORD.pack(op, vid, vext, vol, pext, 0)[:_BODY]
    return body + _CRC.pack(crc32(body))


def encode_header(ds_uuid: _uuid.UUID, extent_size: int) -> bytes:
    body = LOG_HEADER.pack(LOG_MAGIC, LOG_VERSION, RECORD.size, ds_uuid.bytes, extent_size, 0)[:-4]
    return body + _CRC.pack(crc32(body))


@dataclass(frozen=True)
class ScanResult:
    records: list[Record]
    valid_length: int  # bytes of header + good records
    torn_bytes: int  # bytes after valid_length (to be truncated)


def _record_ok(raw: bytes | memoryview) -> bool:
    return _CRC.unpack_from(raw, _BODY)[0] == crc32(raw[:_BODY]) and raw[0] in _OPS


def scan(data: bytes, ds_uuid: _uuid.UUID, extent_size: int, name: str = "extents.log") -> ScanResult:
    """Parse a whole log image. Raise CorruptDatastore on anything but a torn tail."""
    if len(data) < LOG_HEADER.size:
        raise CorruptDatastore(f"{name}: short header ({len(data)} bytes)")
    magic, version, recsize, uu, es, crc = LOG_HEADER.unpack_from(data, 0)
    if magic != LOG_MAGIC:
        raise CorruptDatastore(f"{name}: bad magic {magic!r}")
    if crc != crc32(data[: LOG_HEADER.size - 4]):
        raise CorruptDatastore(f"{name}: header CRC mismatch")
    if version != LOG_VERSION or recsize != RECORD.size:
        raise CorruptDatastore(f"{name}: unsupported version {version} / record size {recsize}")
    if uu != ds_uuid.bytes:
        raise CorruptDatastore(f"{name}: belongs to datastore {_uuid.UUID(bytes=uu)}, not {ds_uuid}")
    if es != extent_size:
        raise CorruptDatastore(f"{name}: extent size {es} != catalog extent size {extent_size}")

    mv = memoryview(data)
    base = LOG_HEADER.size
    whole = (len(data) - base) // RECORD.size
    records: list[Record] = []
    for i in range(whole):
        off = base + i * RECORD.size
        raw = mv[off : off + RECORD.size]
        if not _record_ok(raw):
            # Torn tail only if nothing valid follows; else the middle is damaged.
            for j in range(i + 1, whole):
                o2 = base + j * RECORD.size
                if _record_ok(mv[o2 : o2 + RECORD.size]):
                    raise CorruptDatastore(
                        f"{name}: corrupt record {i} at byte {off} is followed by valid record {j}; "
                        "refusing to guess the extent map"
                    )
            valid = off
            return ScanResult(records, valid, len(data) - valid)
        op, vid, vext, vol, pext, _ = RECORD.unpack(raw)
        records.append((op, vid, vext, vol, pext))
    valid = base + whole * RECORD.size
    return ScanResult(records, valid, len(data) - valid)


class ExtentLog:
    """IO shell around the log file. `append` is called with the datastore's
    allocation lock held; `sync` may run concurrently from another thread."""

    def __init__(self, path: str, fd: int, length: int, records: int) -> None:
        self.path = path
        self._fd = fd
        self.length = length  # bytes known good; a failed append is cut back to this
        self.records = records
        self.dirty = False  # set after an append, cleared by sync (see Datastore.sync)

    @staticmethod
    def create(path: str, ds_uuid: _uuid.UUID, extent_size: int) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, encode_header(ds_uuid, extent_size))
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(os.path.dirname(path))

    @classmethod
    def open(cls, path: str, ds_uuid: _uuid.UUID, extent_size: int) -> tuple["ExtentLog", list[Record]]:
        """Open, scan and cut a torn tail off. Returns the log and its records."""
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        try:
            with open(fd, "rb", closefd=False) as f:
                data = f.read()
            res = scan(data, ds_uuid, extent_size, path)
            if res.torn_bytes:
                log.warning(
                    "%s: truncating torn tail of %d bytes at offset %d (crash during append)",
                    path, res.torn_bytes, res.valid_length,
                )
                os.ftruncate(fd, res.valid_length)
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, res.valid_length, len(res.records)), res.records

    def append(self, buf: bytes) -> None:
        """Append whole records (page cache; durable after `sync`)."""
        try:
            n = os.write(self._fd, buf)
        except OSError:
            self._cut_back()
            raise
        if n != len(buf):
            self._cut_back()
            raise DatastoreError(f"{self.path}: short append ({n} of {len(buf)} bytes)")
        self.length += n
        self.records += n // RECORD.size
        self.dirty = True

    def _cut_back(self) -> None:
        # Keep the file a sequence of whole good records so later appends stay valid.
        os.ftruncate(self._fd, self.length)

    def sync(self) -> None:
        if self.dirty:
            self.dirty = False  # cleared before fsync: a later append re-sets it
            os.fsync(self._fd)

    def rewrite(self, records: list[Record], ds_uuid: _uuid.UUID, extent_size: int) -> None:
        """Compaction: replace the file by header + `records`, atomically."""
        buf = bytearray(encode_header(ds_uuid, extent_size))
        for r in records:
            buf += encode_record(*r)
        atomic_write(self.path, buf, 0o600)
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        self.length = len(buf)
        self.records = len(records)
        self.dirty = False

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
