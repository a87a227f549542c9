"""A transport's two halves in one process, for unit tests of a splitter and
its card endpoint (ring, nvme-pi): `split_pairs` opens endpoint + splitter
pairs under a folder and closes them all at exit, then checks each endpoint
left nothing behind; `WriteMaker` makes records with fresh io_ids;
`volume_files` makes the datastore volume files a shadow card writes.

Example::

    with split_pairs(tmp_path, RingEndpoint, RingSplitter, check_gone) as pair:
        ep, sp = pair({"data_size": 1 << 20}, {"stale_after_ns": 10**9})
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from nicsplit.core.records import AugmentedWrite, Op, WFlag
from nicsplit.wire import shadow as S

__all__ = ["split_pairs", "WriteMaker", "volume_files"]


def volume_files(directory: Path, count: int, size: int) -> Path:
    """``count`` sparse volume files of ``size`` bytes, named as the
    datastore names them (what a shadow card opens by index); returns the
    directory."""
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        with open(directory / S.volume_file(i), "wb") as f:
            f.truncate(size)
    return directory


@contextlib.contextmanager
def split_pairs(root: Path, endpoint_cls: type, splitter_cls: type,
                check_closed: Callable[[object], None]) -> Iterator[Callable[[dict, dict], tuple]]:
    """Yield `pair(endpoint_opts, splitter_opts) -> (endpoint, splitter)`,
    each endpoint in ``root/run<N>``. At exit: close everything, newest
    first, then `check_closed(endpoint)` for each endpoint."""
    made: list = []

    def pair(endpoint_opts: dict, splitter_opts: dict) -> tuple:
        ep = endpoint_cls(root / f"run{len(made)}", **endpoint_opts)
        made.append(ep)
        sp = splitter_cls.connect(str(ep.socket_path), **splitter_opts)
        made.append(sp)
        return ep, sp

    yield pair
    for x in reversed(made):
        x.close()
    for x in made:
        if isinstance(x, endpoint_cls):
            check_closed(x)


class WriteMaker:
    """Records with io_ids 1, 2, 3, ... (one counter per maker)."""

    def __init__(self) -> None:
        self._ids = iter(range(1, 1 << 62))

    def next_id(self) -> int:
        return next(self._ids)

    def write(self, data: bytes, *, vdisk=1, voffset=0, cg=1, seq=0, flags=WFlag.NONE) -> AugmentedWrite:
        return AugmentedWrite(next(self._ids), cg, seq, vdisk, Op.WRITE, flags, voffset, len(data),
                              time.time_ns(), data)

    def other(self, op: Op, length=0, **kw) -> AugmentedWrite:
        """A record without payload (zero, trim, barrier, ...)."""
        return AugmentedWrite(next(self._ids), kw.get("cg", 1), kw.get("seq", 0), kw.get("vdisk", 1), op,
                              kw.get("flags", WFlag.NONE), kw.get("voffset", 0), length, time.time_ns(), None)
