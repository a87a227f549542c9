"""Types every layer of the host IO path shares.

Rules:
- Offsets and lengths are *virtual*: bytes within one vdisk. Only the
  datastore knows physical addresses.
- Flags are our own bit set (not NBD's), so filters never depend on a wire
  protocol; the front end maps NBD command flags to these once.
- A failure anywhere in the chain raises `IOFailure` carrying a POSIX errno;
  the front end maps it to the wire code in one place.
"""

from __future__ import annotations

import errno as _errno
import enum


class Flag(enum.IntFlag):
    """Per-IO flags carried down the filter chain."""

    NONE = 0
    FUA = 1  # durable before the reply (write, zero, trim)
    NO_HOLE = 2  # zero: keep the range allocated
    FAST_ZERO = 4  # zero: fail with ENOTSUP rather than be slow
    REQ_ONE = 8  # extents: one extent is enough


# Plain-int copies for hot paths: IntFlag's `&` runs Python code (~0.7 µs),
# an int's `&` is a single C operation.
FUA = int(Flag.FUA)
NO_HOLE = int(Flag.NO_HOLE)
FAST_ZERO = int(Flag.FAST_ZERO)
REQ_ONE = int(Flag.REQ_ONE)

# Extent types reported by `extents()`; same bit meaning as base:allocation.
EXTENT_DATA = 0
EXTENT_HOLE = 1
EXTENT_ZERO = 2
EXTENT_HOLE_ZERO = EXTENT_HOLE | EXTENT_ZERO


class IOFailure(Exception):
    """An IO failed with a POSIX errno; the message says why."""

    def __init__(self, err: int, message: str = "") -> None:
        super().__init__(message or _errno.errorcode.get(err, str(err)))
        self.errno = err
