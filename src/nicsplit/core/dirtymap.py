"""The dirty-region bitmap: which 64 KiB regions of a vdisk may differ.

Three users share it: the host's marking mode (regions written while the
card could not capture them, ``DATA/host/marking/UUID.bitmap``), the failover
site (regions written to a replica image while it serves production,
``DATA/appliance/failover/CG/vdisk+ID.dirty``), and failback, which reads
both files and copies their union.

Format (the file is the bitmap, nothing else): one bit per `REGION` bytes of
the vdisk, bit ``r % 8`` of byte ``r // 8`` = region r; the file holds
``ceil(regions / 8)`` bytes (a sparse file: never-marked stretches are
holes). A longer file is read up to that length (bits past the vdisk's end
never count).

`RegionBitmap` is the bits in memory, no IO (failback builds its union in
one). `DirtyMap` is a bitmap file kept open: ``mark`` changes memory and
returns the bytes that changed, ``write`` puts them in the file (page cache:
survives a kill -9), ``sync`` makes them durable. A user marks a region and
writes it *before* the write it covers is acknowledged or applied, so after
any crash every region that may differ is marked.

Regions are 64 KiB: a 1 TiB vdisk has 16 Mi regions, 2 MiB of bitmap
(2^40 / 2^16 / 8), and a resync copies at most 60 KiB more than was written
per region touched.

Sparse in memory (issue 11 item 10: a 4 TiB vdisk in marking froze the
host's event loop): the bits live in chunks of `CHUNK` bytes (32 Ki regions,
2 GiB of vdisk each), created on the first mark inside them and dropped when
their last bit is cleared, each with its own count. So an empty bitmap of
any size holds no chunk; opening a bitmap file reads only its data extents
(SEEK_DATA); ``count``/``dirty_bytes`` read a counter kept on every set and
clear; ``runs`` visits only chunks with bits set and skips zero and 0xff
bytes with a regular expression (C speed), never a Python loop per region.

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
import re
from pathlib import Path

from nicsplit.core.fsutil import data_extents

REGION = 64 << 10
# Bitmap bytes per chunk: 4096 bytes = 32768 regions = 2 GiB of vdisk at
# 64 KiB regions; a 4 TiB vdisk has at most 2048 chunks (8 MiB, all marked).
CHUNK = 4096

_NONZERO = re.compile(rb"[^\x00]+")  # runs of bytes with some bit set
_RUNS = re.compile(rb"\xff+|[^\x00\xff]")  # whole bytes set, or one partly set byte


def _pop(b: bytes | bytearray | memoryview) -> int:
    return int.from_bytes(b, "little").bit_count()


class RegionBitmap:
    """The bits of one vdisk's regions, in memory (sparse: module docstring)."""

    def __init__(self, size: int, region: int = REGION, bits: bytes = b"") -> None:
        self.size = size
        self.region = region
        self.regions = -(-size // region)
        self.nbytes = -(-self.regions // 8)
        self._chunks: dict[int, bytearray] = {}  # chunk index -> CHUNK bytes of the bitmap
        self._counts: dict[int, int] = {}  # chunk index -> bits set in it (> 0)
        self.marked = 0  # regions marked, kept on every set and clear (status never walks the bitmap)
        if bits:
            self._or(bits, 0)

    # -- chunk plumbing -------------------------------------------------------------

    def _chunk(self, ci: int) -> bytearray:
        ch = self._chunks.get(ci)
        if ch is None:
            ch = self._chunks[ci] = bytearray(CHUNK)
            self._counts[ci] = 0
        return ch

    def _add(self, ci: int, n: int) -> None:
        """Count ``n`` more (or fewer) bits set in chunk ``ci``; drop it when empty."""
        self.marked += n
        c = self._counts[ci] + n
        if c:
            self._counts[ci] = c
        else:
            del self._counts[ci], self._chunks[ci]

    def _or(self, data: bytes | bytearray | memoryview, at: int) -> int:
        """OR bitmap bytes ``data`` in at byte offset ``at`` (bits past the
        last region ignored); the bits ``data`` has set there."""
        data = memoryview(data)[: max(0, self.nbytes - at)]
        tail = self.nbytes * 8 - self.regions  # unused bits of the last byte
        total = 0
        for m in _NONZERO.finditer(data):
            s, e = m.span()
            pos = at + s
            while pos < at + e:
                ci, co = divmod(pos, CHUNK)
                n = min(CHUNK - co, at + e - pos)
                piece = bytearray(data[pos - at : pos - at + n])
                if tail and pos + n == self.nbytes:
                    piece[-1] &= 0xFF >> tail
                add = int.from_bytes(piece, "little")
                total += add.bit_count()
                if add:
                    ch = self._chunk(ci)
                    old = int.from_bytes(ch[co : co + n], "little")
                    new = old | add
                    if new != old:
                        ch[co : co + n] = new.to_bytes(n, "little")
                        self._add(ci, new.bit_count() - old.bit_count())
                pos += n
        return total

    def _bit(self, r: int) -> bool:
        ch = self._chunks.get((r >> 3) // CHUNK)
        return ch is not None and bool(ch[(r >> 3) % CHUNK] & (1 << (r & 7)))

    def _span(self, r0: int, r1: int) -> tuple[int, int]:
        return r0, min(r1, self.regions - 1)

    # -- the bitmap -----------------------------------------------------------------

    def mark(self, offset: int, length: int) -> tuple[int, int] | None:
        """Set the bits of [offset, offset+length); the byte range (start,
        end) of the bitmap that changed, or None (all were set already)."""
        if length <= 0:
            return None
        r0, r1 = self._span(offset // self.region, (offset + length - 1) // self.region)
        if r0 > r1:
            return None
        if r1 - r0 >= 64:
            return self._mark_bulk(r0, r1)
        return self._mark_bits(range(r0, r1 + 1))

    def _mark_bits(self, rs: range) -> tuple[int, int] | None:
        lo = hi = -1
        for r in rs:
            i = r >> 3
            ci, co = divmod(i, CHUNK)
            ch = self._chunk(ci)
            m = 1 << (r & 7)
            if not ch[co] & m:
                ch[co] |= m
                self._add(ci, 1)
                lo = i if lo < 0 else min(lo, i)
                hi = max(hi, i)
        return None if lo < 0 else (lo, hi + 1)

    def _mark_bulk(self, r0: int, r1: int) -> tuple[int, int] | None:
        """`mark` of regions r0..r1 a whole byte at a time (an initial sync
        marks a vdisk's every allocated extent)."""
        b0, b1 = (r0 + 7) >> 3, (r1 + 1) >> 3  # the whole bytes: regions 8*b0 .. 8*b1-1
        if b1 <= b0:
            return self._mark_bits(range(r0, r1 + 1))
        edges = [self._mark_bits(range(r0, b0 * 8)), self._mark_bits(range(b1 * 8, r1 + 1))]
        lo = hi = -1
        pos = b0
        while pos < b1:
            ci, co = divmod(pos, CHUNK)
            n = min(CHUNK - co, b1 - pos)
            ch = self._chunk(ci)
            before = _pop(ch[co : co + n])
            if before != 8 * n:
                ch[co : co + n] = b"\xff" * n
                lo = pos if lo < 0 else lo
                hi = pos + n - 1
            self._add(ci, 8 * n - before)
            pos += n
        spans = [s for s in (*edges, None if lo < 0 else (lo, hi + 1)) if s is not None]
        if not spans:
            return None
        return min(s[0] for s in spans), max(s[1] for s in spans)

    def clear(self, offset: int, length: int) -> tuple[int, int] | None:
        """Clear the bits of every region [offset, offset+length) touches (a
        resync copied them); the byte range that changed, or None."""
        if length <= 0:
            return None
        r0, r1 = self._span(offset // self.region, (offset + length - 1) // self.region)
        if r0 > r1:
            return None
        b0, b1 = (r0 + 7) >> 3, (r1 + 1) >> 3  # the whole bytes: regions 8*b0 .. 8*b1-1
        if b1 <= b0:
            return self._clear_bits(range(r0, r1 + 1))
        spans = [self._clear_bits(range(r0, b0 * 8)), self._clear_bits(range(b1 * 8, r1 + 1))]
        for ci in sorted(c for c in self._chunks if b0 < (c + 1) * CHUNK and c * CHUNK < b1):
            a, b = max(b0, ci * CHUNK), min(b1, (ci + 1) * CHUNK)
            ch = self._chunks[ci]
            piece = ch[a - ci * CHUNK : b - ci * CHUNK]
            had = _pop(piece)
            if had:
                nz = [m.span() for m in _NONZERO.finditer(piece)]
                spans.append((a + nz[0][0], a + nz[-1][1]))
                ch[a - ci * CHUNK : b - ci * CHUNK] = bytes(b - a)
                self._add(ci, -had)
        spans = [s for s in spans if s is not None]
        if not spans:
            return None
        return min(s[0] for s in spans), max(s[1] for s in spans)

    def _clear_bits(self, rs: range) -> tuple[int, int] | None:
        lo = hi = -1
        for r in rs:
            i = r >> 3
            ci, co = divmod(i, CHUNK)
            ch = self._chunks.get(ci)
            m = 1 << (r & 7)
            if ch is not None and ch[co] & m:
                ch[co] &= ~m
                lo = i if lo < 0 else min(lo, i)
                hi = max(hi, i)
                self._add(ci, -1)
        return None if lo < 0 else (lo, hi + 1)

    def is_marked(self, offset: int, length: int) -> bool:
        """True when every region the range touches is marked."""
        r0, r1 = offset // self.region, (offset + length - 1) // self.region
        return all(self._bit(r) for r in range(r0, r1 + 1))

    def merge(self, other: bytes) -> int:
        """OR another bitmap of the same vdisk (a file's bytes) into this one;
        the number of regions it marks."""
        return self._or(other, 0)

    def count(self) -> int:
        """Regions marked."""
        return self.marked

    def runs(self) -> list[tuple[int, int]]:
        """(offset, length) of the runs of marked regions, merged, clipped to the size."""
        out: list[tuple[int, int]] = []
        cur = [-1, -1]  # the open run, in regions [start, end)

        def add(a: int, b: int) -> None:
            if a == cur[1]:
                cur[1] = b
                return
            if cur[0] >= 0:
                out.append((cur[0], cur[1]))
            cur[0], cur[1] = a, b

        for ci in sorted(self._chunks):
            ch = self._chunks[ci]
            base = ci * CHUNK * 8
            for m in _RUNS.finditer(ch):
                s, e = m.span()
                byte = ch[s]
                if byte == 0xFF:
                    add(base + 8 * s, base + 8 * e)
                    continue
                for k in range(8):
                    if byte & (1 << k):
                        add(base + 8 * s + k, base + 8 * s + k + 1)
        if cur[0] >= 0:
            out.append((cur[0], cur[1]))
        return [(a * self.region, min(min(b, self.regions) * self.region, self.size) - a * self.region)
                for a, b in out]

    def dirty_bytes(self) -> int:
        """Bytes in marked regions, clipped to the size (no bitmap walk)."""
        n = self.marked * self.region
        if n and self._bit(self.regions - 1):
            n -= self.regions * self.region - self.size
        return n

    def chunks(self) -> int:
        """Chunks held in memory (`CHUNK` bytes each): 0 for an empty bitmap of any size."""
        return len(self._chunks)

    def bytes_at(self, lo: int, hi: int) -> bytes:
        """Bitmap bytes [lo, hi) as the file holds them."""
        out = bytearray(hi - lo)
        for ci in range(lo // CHUNK, -(-hi // CHUNK)):
            ch = self._chunks.get(ci)
            if ch is None:
                continue
            a, b = max(lo, ci * CHUNK), min(hi, (ci + 1) * CHUNK)
            out[a - lo : b - lo] = ch[a - ci * CHUNK : b - ci * CHUNK]
        return bytes(out)

    def to_bytes(self) -> bytes:
        return self.bytes_at(0, self.nbytes)

    @classmethod
    def read(cls, path: str | Path, size: int, region: int = REGION) -> "RegionBitmap":
        """A bitmap file's bits (read only, its data extents only; a missing
        file marks nothing)."""
        bm = cls(size, region)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return bm
        try:
            bm._load(fd)
        finally:
            os.close(fd)
        return bm

    def _load(self, fd: int) -> None:
        """OR in the bits of the bitmap file ``fd``: its data extents only
        (a never-marked stretch of the file is a hole), 1 MiB at a time."""
        for off, n in data_extents(fd, 0, self.nbytes):
            for at in range(off, off + n, 1 << 20):
                self._or(os.pread(fd, min(1 << 20, off + n - at), at), at)


class DirtyMapError(Exception):
    """A bitmap file cannot be opened or held; the message names the file."""


class DirtyMap(RegionBitmap):
    """A bitmap file, created (0600) or extended to its size when opened.
    `DirtyMapError` (naming the file) when it cannot be: the file's IO
    failing, or a size beyond what a bitmap can describe."""

    def __init__(self, path: str | Path, size: int, region: int = REGION) -> None:
        self.path = Path(path)
        try:
            super().__init__(size, region)
        except (MemoryError, OverflowError):
            raise DirtyMapError(f"{self.path}: the dirty bitmap of a {size}-byte vdisk "
                                f"({-(-size // region) // 8} bytes) cannot be held") from None
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise DirtyMapError(f"{self.path}: cannot open the dirty bitmap: {e.strerror}") from None
        try:
            self._load(self._fd)
            if os.fstat(self._fd).st_size < self.nbytes:
                os.ftruncate(self._fd, self.nbytes)  # a hole: no space, no page cache
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
        os.pwrite(self._fd, self.bytes_at(lo, hi), lo)
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
