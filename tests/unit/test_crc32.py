"""nicsplit.core.crc32 is zlib's CRC-32 (the checksum every on-disk and wire
format names), computed by zlib-ng: equal values for any length, start value
and buffer type, so swapping it in changed no byte anywhere."""

from __future__ import annotations

import random
import zlib

from nicsplit.core.crc32 import crc32


def test_crc32_equals_zlib(seed: int) -> None:
    rng = random.Random(seed)
    sizes = [0, 1, 3, 15, 16, 17, 63, 64, 65, 255, 4096, 4154, 16384, 135_000] + [rng.randrange(1 << 18) for _ in range(40)]
    for n in sizes:
        buf = rng.randbytes(n)
        start = rng.randrange(1 << 32)
        for b in (buf, bytearray(buf), memoryview(buf)):
            assert crc32(b) == zlib.crc32(buf), n
            assert crc32(b, start) == zlib.crc32(buf, start), (n, start)
        cut = rng.randrange(n + 1)  # chaining: the CRC of a ‖ b from the CRC of a
        assert crc32(buf[cut:], crc32(buf[:cut])) == zlib.crc32(buf), (n, cut)
