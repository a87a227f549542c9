"""Durable small-file helpers shared by every component.

`atomic_write` is the one way small state files (catalogs, CG list,
sequence reservations, bookmarks, replica state) are replaced: write a temp
file, fsync it, rename it over the old one, fsync the directory — a reader
sees the old or the new content, never a mix, and a crash keeps one of them.

Two ways to zero a range, named for what they do to the space:
`punch_hole` frees it, `zero_keep_allocated` keeps it reserved.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from pathlib import Path


def fsync_dir(dirpath: str | os.PathLike) -> None:
    """Make a directory's entries (creates, renames) durable."""
    fd = os.open(dirpath, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    fsync_dir(path.parent)


# linux/falloc.h. os.posix_fallocate cannot punch, so fallocate(2) is called
# through ctypes.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int

# 1 MiB of zeros for the write-zeros fallback (bounded memory per call).
_ZEROS = bytes(1 << 20)


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """``os.pwrite`` until every byte is written (it may write fewer)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


# Large page-cache folios: the folio a write brings in is as large as the
# write (ext4 from Linux 6.16), and a later 4 KiB write into it dirties and
# writes back all of it (docs/benchmarks.md, "Large folios"). Files written
# later at random in small blocks (the datastore's volumes, images) take
# their large writes in pieces of at most this many bytes.
WRITE_PIECE = 64 << 10


def pwrite_pieces(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """`pwrite_all` in pieces of at most `WRITE_PIECE` bytes."""
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    for i in range(0, len(view), WRITE_PIECE):
        pwrite_all(fd, view[i : i + WRITE_PIECE], offset + i)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """Call fallocate(2); raise OSError with the real errno on failure."""
    while _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, f"fallocate(mode={mode:#x}, {offset}, {length}): {os.strerror(err)}")


def write_zeros(fd: int, offset: int, length: int) -> None:
    """pwrite zeros over [offset, offset+length)."""
    end = offset + length
    while offset < end:
        offset += os.pwrite(fd, memoryview(_ZEROS)[: min(len(_ZEROS), end - offset)], offset)


def _fallocate_or_zeros(fd: int, mode: int, offset: int, length: int) -> None:
    if length <= 0:
        return
    try:
        fallocate(fd, mode | FALLOC_FL_KEEP_SIZE, offset, length)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        write_zeros(fd, offset, length)  # correct, just not thin


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Make [offset, offset+length) read as zeros and give its space back
    (size kept); write zeros where the file system cannot punch."""
    _fallocate_or_zeros(fd, FALLOC_FL_PUNCH_HOLE, offset, length)


def zero_keep_allocated(fd: int, offset: int, length: int) -> None:
    """Make [offset, offset+length) read as zeros and keep it allocated, so
    a later write there cannot fail for space (FALLOC_FL_ZERO_RANGE)."""
    _fallocate_or_zeros(fd, FALLOC_FL_ZERO_RANGE, offset, length)


def data_extents(fd: int, offset: int, length: int) -> list[tuple[int, int]]:
    """The (offset, length) ranges of a sparse file holding data within
    [offset, offset+length), via SEEK_DATA / SEEK_HOLE."""
    out = []
    end = offset + length
    pos = offset
    while pos < end:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            break
        if start >= end:
            break
        stop = min(os.lseek(fd, start, os.SEEK_HOLE), end)
        out.append((start, stop - start))
        pos = stop
    return out
