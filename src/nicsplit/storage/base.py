"""The `Image` interface: a disk image at rest, plain or sealed.

Every image answers the same calls at any alignment: `pread`, `pwrite`,
`zero`, `extents`, `resize`, `fsync`, `close`; `key_usage` and `rekey` do
something only for sealed images.  Open one with
`nicsplit.storage.image.open_image`, which decides plain or sealed; the
implementations are `nicsplit.storage.image.PlainImage` (a raw sparse file)
and `nicsplit.storage.sealed.SealedImage` (AES-256-GCM per 4 KiB block).

Wrong use raises where it happens: ``ValueError`` for a range outside the
image, ``io.UnsupportedOperation`` for a change to a read-only image.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Callable

__all__ = ["Image"]


class Image:
    """A disk image of ``size`` bytes (see the module docstring)."""

    path: Path
    size: int
    sealed: bool
    writable: bool

    def pread(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes from ``offset``; never written, zeroed
        and punched ranges read as zeros."""
        raise NotImplementedError

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        raise NotImplementedError

    def zero(self, offset: int, length: int) -> None:
        """Make the range read as zeros, deallocating the whole blocks in it."""
        raise NotImplementedError

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """(offset, length) of the ranges within the request that may hold
        data, merged, in order; everything else reads as zeros."""
        raise NotImplementedError

    def resize(self, new_size: int) -> None:
        """Grow (new space reads zeros) or shrink the image."""
        raise NotImplementedError

    def fsync(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def fileno(self) -> int:
        raise NotImplementedError

    def key_usage(self) -> dict[int, int]:
        """Key id -> number of blocks sealed under it ({} when plain)."""
        return {}

    def rekey(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Re-seal every block not under the active key; blocks rewritten (0 when plain)."""
        return 0

    def __enter__(self) -> "Image":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path} size={self.size}>"

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"{self.path}: range {offset}+{length} is outside the image (size {self.size})")

    def _check_writable(self, what: str) -> None:
        if not self.writable:
            raise io.UnsupportedOperation(f"{self.path}: cannot {what}: the image is open read-only")

