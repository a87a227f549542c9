"""The dirty-region bitmap: which 64 KiB regions of a vdisk may differ.

Three users share it: the host's marking mode (regions written while the
card could not capture them, ``DATA/host/marking/UUID.bitmap``), the failover
site (regions written to a replica image while it serves production,
``DATA/appliance/failover/CG/VDISK.dirty``), and failback, which reads both
files and copies their union.

Format (the file is the bitmap, nothing else): one bit per `REGION` bytes of
the vdisk, bit ``r % 8`` of byte ``r // 8`` = region r; the file holds
``ceil(regions / 8)`` bytes. A longer file is read up to that length (bits
past the vdisk's end never count).

`RegionBitmap` is the bits in memory, no IO (failback builds its union in
one). `DirtyMap` is a bitmap file kept open: ``mark`` changes memory and
returns the bytes that changed, ``write`` puts them in the file (page cache:
survives a kill -9), ``sync`` makes them durable. A user marks a region and
writes it *before* the write it covers is acknowledged or applied, so after
any crash every region that may differ is marked.

Regions are 64 KiB: a 1 TiB vdisk needs 2 MiB of bitmap (2^40 / 2^16 / 8),
and a resync copies at most 60 KiB more than was written per region touched.

Example::

    m = DirtyMap(path, size)
    span = m.mark(offset, length)       # None: already marked
    if span is not None:
        m.write(span)
    m.sync()
    for off, n in m.runs(): ...         # merged, clipped to the vdisk
"""

from __future__ import annotations

import os
from pathlib import Path

REGION = 64 << 10


class RegionBitmap:
    """The bits of one vdisk's regions, in memory."""

    def __init__(self, size: int, region: int = REGION, bits: bytes = b"") -> None:
        self.size = size
        self.region = region
        self.regions = -(-size // region)
        self.nbytes = -(-self.regions // 8)
        # Zeros first, then the bits: bytearray(b"").ljust(huge) prints a
        # SystemError on its MemoryError (CPython 3.11); bytearray(huge) fails cleanly.
        self._bits = bytearray(self.nbytes)
        have = bits[: self.nbytes]
        self._bits[: len(have)] = have
        self._count()

    def _count(self) -> None:
        # Regions marked, kept incrementally (status never walks the bitmap).
        # Bits past the last region never count.
        extra = self.nbytes * 8 - self.regions
        if extra and self._bits:
            self._bits[-1] &= 0xFF >> extra
        self.marked = sum(bin(b).count("1") for b in self._bits)

    def mark(self, offset: int, length: int) -> tuple[int, int] | None:
        """Set the bits of [offset, offset+length); the byte range (start,
        end) of the bitmap that changed, or None (all were set already)."""
        if length <= 0:
            return None
        r0, r1 = offset // self.region, (offset + length - 1) // self.region
        if r1 - r0 >= 64:
            return self._mark_bulk(r0, r1)
        lo = hi = -1
        bits = self._bits
        for r in range(r0, r1 + 1):
            i, m = r >> 3, 1 << (r & 7)
            if not bits[i] & m:
                bits[i] |= m
                self.marked += 1
                if lo < 0:
                    lo = i
                hi = i
        return None if lo < 0 else (lo, hi + 1)

    def _mark_bulk(self, r0: int, r1: int) -> tuple[int, int] | None:
        """`mark` of regions r0..r1 a whole byte at a time (an initial sync
        marks a vdisk's every allocated extent)."""
        before = self.marked
        lo = hi = -1
        bits = self._bits
        b0, b1 = (r0 + 7) >> 3, (r1 + 1) >> 3  # the whole bytes: regions 8*b0 .. 8*b1-1
        for r in list(range(r0, min(b0 * 8, r1 + 1))) + list(range(max(b1 * 8, r0), r1 + 1)):
            i, m = r >> 3, 1 << (r & 7)
            if not bits[i] & m:
                bits[i] |= m
                self.marked += 1
                lo = i if lo < 0 else min(lo, i)
                hi = max(hi, i)
        if b1 > b0:
            set_before = int.from_bytes(bits[b0:b1], "little").bit_count()
            if set_before != 8 * (b1 - b0):
                bits[b0:b1] = b"\xff" * (b1 - b0)
                self.marked += 8 * (b1 - b0) - set_before
                lo = b0 if lo < 0 else min(lo, b0)
                hi = max(hi, b1 - 1)
        return None if self.marked == before else (lo, hi + 1)

    def clear(self, offset: int, length: int) -> tuple[int, int] | None:
        """Clear the bits of every region [offset, offset+length) touches (a
        resync copied them); the byte range that changed, or None."""
        if length <= 0:
            return None
        r0, r1 = offset // self.region, min((offset + length - 1) // self.region, self.regions - 1)
        lo = hi = -1
        bits = self._bits
        for r in range(r0, r1 + 1):
            i, m = r >> 3, 1 << (r & 7)
            if bits[i] & m:
                bits[i] &= ~m
                self.marked -= 1
                if lo < 0:
                    lo = i
                hi = i
        return None if lo < 0 else (lo, hi + 1)

    def is_marked(self, offset: int, length: int) -> bool:
        """True when every region the range touches is marked."""
        r0, r1 = offset // self.region, (offset + length - 1) // self.region
        bits = self._bits
        return all(bits[r >> 3] & (1 << (r & 7)) for r in range(r0, r1 + 1))

    def merge(self, other: bytes) -> int:
        """OR another bitmap of the same vdisk (a file's bytes) into this one;
        the number of regions it marks."""
        n = 0
        bits = self._bits
        for i, b in enumerate(other[: self.nbytes]):
            if b:
                for k in range(8):
                    if b & (1 << k) and i * 8 + k < self.regions:
                        if not bits[i] & (1 << k):
                            bits[i] |= 1 << k
                            self.marked += 1
                        n += 1
        return n

    def count(self) -> int:
        """Regions marked."""
        return self.marked

    def runs(self) -> list[tuple[int, int]]:
        """(offset, length) of the runs of marked regions, merged, clipped to the size."""
        out: list[tuple[int, int]] = []
        r, n = 0, self.regions
        bits = self._bits
        while r < n:
            if not bits[r >> 3]:
                r = (r | 7) + 1
                continue
            if not bits[r >> 3] & (1 << (r & 7)):
                r += 1
                continue
            start = r
            while r < n and bits[r >> 3] & (1 << (r & 7)):
                r += 1
            off = start * self.region
            out.append((off, min(r * self.region, self.size) - off))
        return out

    def dirty_bytes(self) -> int:
        """Bytes in marked regions, clipped to the size (no bitmap walk)."""
        n = self.marked * self.region
        last = self.regions - 1
        if n and self._bits[last >> 3] & (1 << (last & 7)):
            n -= self.regions * self.region - self.size
        return n

    def to_bytes(self) -> bytes:
        return bytes(self._bits)

    @classmethod
    def read(cls, path: str | Path, size: int, region: int = REGION) -> "RegionBitmap":
        """A bitmap file's bits (read only; a missing file marks nothing)."""
        try:
            return cls(size, region, Path(path).read_bytes())
        except FileNotFoundError:
            return cls(size, region)


class DirtyMapError(Exception):
    """A bitmap file cannot be opened or held; the message names the file."""


class DirtyMap(RegionBitmap):
    """A bitmap file, created (0600) or extended to its size when opened.
    `DirtyMapError` (naming the file) when it cannot be: a vdisk too large
    for its bitmap to fit in memory, or the file's IO failing."""

    def __init__(self, path: str | Path, size: int, region: int = REGION) -> None:
        self.path = Path(path)
        try:
            super().__init__(size, region)
        except (MemoryError, OverflowError):
            raise DirtyMapError(f"{self.path}: the dirty bitmap of a {size}-byte vdisk "
                                f"({-(-size // region) // 8} bytes) does not fit in memory") from None
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise DirtyMapError(f"{self.path}: cannot open the dirty bitmap: {e.strerror}") from None
        try:
            have = os.pread(self._fd, self.nbytes, 0)
            self._bits[: len(have)] = have
            self._count()
            if len(have) < self.nbytes:
                os.ftruncate(self._fd, self.nbytes)
        except OSError as e:
            os.close(self._fd)
            raise DirtyMapError(f"{self.path}: cannot read or extend the dirty bitmap: {e.strerror}") from None
        self.written = self.synced = 0  # generations: bitmap writes made / made durable

    @property
    def unsynced(self) -> bool:
        return self.synced < self.written

    def write(self, span: tuple[int, int]) -> None:
        """Put the changed bytes in the file (page cache; `sync` makes them durable)."""
        lo, hi = span
        os.pwrite(self._fd, bytes(self._bits[lo:hi]), lo)
        self.written += 1

    def mark_and_write(self, offset: int, length: int) -> bool:
        """`mark`, then `write` what changed; True when something did."""
        span = self.mark(offset, length)
        if span is None:
            return False
        self.write(span)
        return True

    def clear_and_write(self, offset: int, length: int) -> bool:
        """`clear`, then `write` what changed; True when something did."""
        span = self.clear(offset, length)
        if span is None:
            return False
        self.write(span)
        return True

    def sync(self) -> None:
        gen = self.written
        os.fdatasync(self._fd)
        self.synced = max(self.synced, gen)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
