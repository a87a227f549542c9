"""Opening a disk image at rest, and the plain (raw sparse file) image.

`open_image` decides once: an existing image is sealed iff its sidecar
(`sealing.tags_path`) exists, so images written before encryption keep
working in clear; a new image is sealed iff the keyring has an active key.
Both kinds answer the same calls (`Image`, in `nicsplit.storage.base`).

Example::

    kr = atrest.Keyring.load(Layout(data).keyring)
    with open_image(replicas / "disk.img", 1 << 30, kr, writable=True, create=True) as img:
        img.pwrite(b"x" * 4096, 8192)
        assert img.pread(8192, 4096) == b"x" * 4096 and img.extents(0, 1 << 30) == [(8192, 4096)]
        img.fsync()
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from nicsplit.core.fsutil import WRITE_PIECE, data_extents, fsync_dir, pwrite_pieces, punch_hole
from nicsplit.storage.atrest import Keyring
from nicsplit.storage.base import Image
from nicsplit.storage.sealed import SealedImage
from nicsplit.storage.sealing import pwritev_all, tags_path

__all__ = ["Image", "PlainImage", "open_image"]


def open_image(path: str | Path, size: int, keyring: Keyring | None, *, writable: bool,
               create: bool = False) -> Image:
    """The image at ``path`` of ``size`` bytes.

    A missing image is created when ``create`` (sealed when ``keyring`` has an
    active key, else plain); an existing one is sealed iff its sidecar
    exists.  Writable: an image of another size is resized to ``size``.
    Read-only: ``size`` is what the reader sees (past the stored size: zeros).
    """
    path = Path(path)
    if size < 0:
        raise ValueError(f"{path}: negative size {size}")
    if create and not writable:
        raise ValueError(f"{path}: create needs writable=True")
    tpath = tags_path(path)
    if create and not os.path.lexists(path):
        if keyring is not None and keyring.active is not None:
            return SealedImage.create(path, size, keyring)
        return PlainImage.create(path, size)
    fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
    try:
        try:
            tfd = os.open(tpath, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        except FileNotFoundError:
            img: Image = PlainImage(path, fd, size, writable=writable)
        else:
            try:
                img = SealedImage(path, fd, tfd, size, keyring, writable=writable)
            except BaseException:
                os.close(tfd)
                raise
    except BaseException:
        os.close(fd)
        raise
    return img


class PlainImage(Image):
    """A raw sparse file: plaintext at its offsets."""

    sealed = False

    def __init__(self, path: Path, fd: int, size: int, *, writable: bool) -> None:
        self.path = path
        self.size = size
        self.writable = writable
        self._fd = fd
        self._lock = threading.Lock()
        if writable and os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)

    @classmethod
    def create(cls, path: Path, size: int) -> "PlainImage":
        """A new, empty plain image (``path`` must not exist)."""
        tags_path(path).unlink(missing_ok=True)  # left by a sealed create that crashed before its data file
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            fsync_dir(path.parent)
            return cls(path, fd, size, writable=True)
        except BaseException:
            os.close(fd)
            raise

    def pread(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        b = os.pread(self._fd, length, offset)
        while len(b) < length:  # a short read: EOF (read-only, stored size smaller), or a signal
            more = os.pread(self._fd, length - len(b), offset + len(b))
            if not more:
                return b + bytes(length - len(b))
            b += more
        return b

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        self._check_writable("write")
        self._check(offset, len(data))
        pwrite_pieces(self._fd, data, offset)

    def _write_run(self, offset: int, parts: list[bytes | memoryview]) -> None:
        self._check_writable("write")
        self._check(offset, sum(len(p) for p in parts))
        pwritev_all(self._fd, parts, offset, WRITE_PIECE)  # no joined copy of the run

    def zero(self, offset: int, length: int) -> None:
        self._check_writable("zero")
        self._check(offset, length)
        punch_hole(self._fd, offset, length)

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        self._check(offset, length)
        return data_extents(self._fd, offset, length)

    def resize(self, new_size: int) -> None:
        self._check_writable("resize")
        if new_size < 0:
            raise ValueError(f"{self.path}: negative size {new_size}")
        with self._lock:
            os.ftruncate(self._fd, new_size)
            self.size = new_size

    def fsync(self) -> None:
        os.fsync(self._fd)

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

