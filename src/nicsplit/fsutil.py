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
