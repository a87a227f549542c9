"""Keep freed large buffers in the process instead of giving them back to
the kernel after every batch.

glibc's malloc serves a request above ``M_MMAP_THRESHOLD`` (128 KiB at
start) with a fresh ``mmap``, and gives the top of the heap back to the
kernel (``M_TRIM_THRESHOLD``) once more than twice that is free there. It
raises both when a mapped chunk is freed, so a long-running process drifts
to thresholds set by the largest buffer it happened to free. A batch's
buffers are just that size (a 64-write batch ~135 KB on the wire, ~270 KB
plain; a 1 MiB write's payload), made and freed per batch, two or three
alive at once, so they keep being faulted in page by page: encoding a 1 MiB
batch frame cost 1,177 us (481 page faults) against 84 tuned, and a 135 KB
one 93 against 10 in a process that had not yet freed a larger buffer
(bench/malloc_tune.py; docs/operations.md, "Memory"). Every nicsplit
process calls `tune` first thing, so the thresholds are the same whatever
it has done before.

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
