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

from nicsplit.core.records import BLOCK_SIZE

__all__ = ["Image"]


def _adjacent(blocks: list[int], cap: int = 512) -> list[tuple[int, int]]:
    """(first block, count) of each run of adjacent ``blocks`` (ascending), at most ``cap`` long."""
    out: list[tuple[int, int]] = []
    for b in blocks:
        if out and out[-1][0] + out[-1][1] == b and out[-1][1] < cap:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((b, 1))
    return out


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

    # Whole blocks, in bulk: what a distribution step uses (one call per
    # image per step instead of one per record).  Blocks are BLOCK_SIZE
    # bytes; the image's last block is shorter when its size is not a
    # multiple of it.

    def block_len(self, blk: int) -> int:
        return max(0, min(BLOCK_SIZE, self.size - blk * BLOCK_SIZE))

    def read_blocks(self, blocks: list[int]) -> list[bytes | memoryview | None]:
        """The contents of ``blocks`` (ascending, distinct), each
        `block_len` bytes; None for a block known to read as zeros (an
        implementation may as well return its zeros).  One read per run of
        adjacent blocks."""
        out: list[bytes | memoryview | None] = []
        for b0, n in _adjacent(blocks):
            lo = b0 * BLOCK_SIZE
            buf = memoryview(self.pread(lo, min(self.size, (b0 + n) * BLOCK_SIZE) - lo))
            out.extend(buf[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE] for i in range(n))
        return out

    def write_blocks(self, items: list[tuple[int, bytes | memoryview | None]],
                     after: Callable[[], None] | None = None) -> None:
        """Set each (block, content) of ``items`` (ascending, distinct blocks;
        content `block_len` bytes, or None: zeros, deallocated), one write
        per run of adjacent blocks, calling ``after`` after each run."""
        for blk, c in items:
            n = self.block_len(blk)
            if not n or (c is not None and len(c) != n):
                raise ValueError(f"{self.path}: block {blk} given {len(c) if c is not None else 'zeros'} bytes, "
                                 f"not the block's {n}")
        i = 0
        while i < len(items):
            j = i + 1
            zero = items[i][1] is None
            while j < len(items) and items[j][0] == items[j - 1][0] + 1 and (items[j][1] is None) == zero and \
                    j - i < 512:
                j += 1
            lo = items[i][0] * BLOCK_SIZE
            if zero:
                self.zero(lo, min(self.size, items[j - 1][0] * BLOCK_SIZE + BLOCK_SIZE) - lo)
            else:
                self._write_run(lo, [c for _, c in items[i:j]])  # type: ignore[misc]
            if after is not None:
                after()
            i = j

    def _write_run(self, offset: int, parts: list[bytes | memoryview]) -> None:
        self.pwrite(parts[0] if len(parts) == 1 else b"".join(parts), offset)

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

