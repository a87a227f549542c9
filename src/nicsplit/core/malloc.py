"""Keep freed large buffers in the process instead of giving them back to
the kernel after every batch.

glibc's malloc serves a request above ``M_MMAP_THRESHOLD`` (128 KiB at
start) with a fresh ``mmap`` and gives heap memory back (``M_TRIM_THRESHOLD``)
as soon as the free top of the heap passes 128 KiB. A batch's buffers are
just that size (a 64-write batch is ~135 KB compressed, ~270 KB plain; a
1 MiB write's payload), made and freed per batch, so each new one is
faulted in again page by page: encoding a 135 KB batch frame cost 93 us
here, of which 83 were page faults of two such buffers, and a 1 MiB frame
1,000 us. With both thresholds raised the same encodes cost 10 and 69 us
(bench/malloc_tune.py). Every nicsplit process calls `tune` first thing.

The price: up to ``TRIM_BYTES`` of freed heap stays mapped per process, and
the dynamic threshold glibc would otherwise adapt is fixed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

__all__ = ["tune", "MMAP_BYTES", "TRIM_BYTES"]

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_BYTES = 32 << 20  # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit): a MAX_BODY frame stays on the heap
TRIM_BYTES = 64 << 20

_done: bool | None = None


def tune() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; False where
    the C library has no ``mallopt`` (not glibc) or refuses."""
    global _done
    if _done is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            _done = False
        else:
            _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_BYTES))
        if not _done:
            log.info("malloc: thresholds left at the C library's defaults (no glibc mallopt)")
    return _done
