"""CRC-16/T10-DIF: the guard of T10 DIF and of NVMe's 16b Guard protection
information (NVM Command Set spec, "16b Guard Protection Information").

Parameters (RevEng catalogue name CRC-16/T10-DIF): width 16, poly 0x8BB7,
init 0x0000, refin false, refout false, xorout 0x0000, check 0xD0DB (the
CRC of the nine ASCII bytes "123456789").

`crc16_t10dif` is `fastcrc.crc16.t10_dif` (Rust, pinned in pyproject.toml;
~0.5 us for a 4 KiB block here, mostly call overhead) when it is installed,
else `crc16_t10dif_py`, a table-driven pure-Python version (~300 us for
4 KiB: correct, far too slow for the write path). The tests check both
against the check value and against each other. Sans-IO: no state.
"""

from __future__ import annotations

__all__ = ["POLY", "CHECK", "crc16_t10dif", "crc16_t10dif_py", "FAST"]

POLY = 0x8BB7
CHECK = 0xD0DB  # crc16_t10dif(b"123456789")


def _table() -> tuple[int, ...]:
    t = []
    for b in range(256):
        c = b << 8
        for _ in range(8):
            c = ((c << 1) ^ POLY) if c & 0x8000 else (c << 1)
        t.append(c & 0xFFFF)
    return tuple(t)


_T = _table()


def crc16_t10dif_py(data, crc: int = 0) -> int:
    """CRC-16/T10-DIF of ``data`` (any bytes-like), continuing from ``crc``."""
    t = _T
    for b in memoryview(data).cast("B"):
        crc = ((crc << 8) & 0xFFFF) ^ t[(crc >> 8) ^ b]
    return crc


try:
    from fastcrc.crc16 import t10_dif as crc16_t10dif  # crc16_t10dif(data) -> int

    FAST = True
except ImportError:  # the pure-Python fallback keeps the transport correct, only slow
    FAST = False
    crc16_t10dif = crc16_t10dif_py
