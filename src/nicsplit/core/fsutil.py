"""Durable small-file helpers shared by every component.

`atomic_write` is the one way small state files (catalogs, CG list,
sequence reservations, bookmarks, replica state) are replaced: write a temp
file, fsync it, rename it over the old one, fsync the directory — a reader
sees the old or the new content, never a mix, and a crash keeps one of them.
"""

from __future__ import annotations

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


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = None


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """``os.pwrite`` until every byte is written (it may write fewer)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def zero_range(fd: int, offset: int, length: int) -> None:
    """Make [offset, offset+length) of a file read as zeros: punch a hole
    (frees the space, keeps the size), or write zeros where the file system
    cannot."""
    global _libc
    if length <= 0:
        return
    if _libc is None:
        import ctypes
        import ctypes.util

        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    import ctypes

    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, ctypes.c_int64(offset),
                       ctypes.c_int64(length)) == 0:
        return
    zeros = bytes(min(length, 1 << 20))
    end = offset + length
    while offset < end:
        n = min(len(zeros), end - offset)
        os.pwrite(fd, zeros[:n], offset)
        offset += n


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
