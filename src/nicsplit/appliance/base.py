"""Base images: each vdisk of a CG as it was at the oldest retained point in time.

When retention trims the oldest journal segments (`nicsplit.appliance.retention`),
their records are first applied here, so the image at any retained PIT S is
still exact: per block, the newest journal record <= S, else the base.

Layout::

    DATA/appliance/base/<cg>/v<vdisk id>.img   raw sparse image, the vdisk's size
    DATA/appliance/base/<cg>/state.json        {"version": 1, "seq", "time_ns", "first_segment"}

``seq`` is the newest seq applied (the base *is* the image at that seq);
``first_segment`` the oldest journal segment still needed (every older one
was applied and may be deleted).

Rules
-----
1. `apply` writes the records in seq order, fsyncs every image it touched,
   and only then replaces state.json atomically. Re-applying records the
   base already holds, in order, gives the same bytes (writes are absolute),
   so a crash before the state is persisted is repaired by applying the
   same segments again; a crash after it leaves only segment files to
   delete (`first_segment` says which).
2. A missing image reads as zeros (a vdisk nothing was trimmed for yet).
3. Only the appliance's retention writes here, under the journal's writer
   lock; readers open images read-only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from nicsplit.card.records import Op
from nicsplit.fsutil import atomic_write, data_extents, fsync_dir, zero_range

VERSION = 1


class BaseError(Exception):
    """A base directory that cannot be used: one clear line."""


@dataclass(frozen=True, slots=True)
class BaseState:
    seq: int = 0
    time_ns: int = 0
    first_segment: int = 1


def base_dir(data: str | Path, cg: str) -> Path:
    return Path(data) / "appliance" / "base" / cg


def read_state(path: str | Path) -> BaseState:
    f = Path(path) / "state.json"
    try:
        raw = json.loads(f.read_text())
    except FileNotFoundError:
        return BaseState()
    except (OSError, ValueError) as e:
        raise BaseError(f"{f}: unreadable ({e})") from None
    if raw.get("version") != VERSION:
        raise BaseError(f"{f}: version {raw.get('version')!r} not supported")
    return BaseState(int(raw["seq"]), int(raw["time_ns"]), int(raw["first_segment"]))


class BaseImages:
    def __init__(self, path: str | Path, sizes: dict[int, int], *, writable: bool = False) -> None:
        """``sizes``: vdisk id -> size in bytes, for every vdisk of the CG."""
        self.path = Path(path)
        self.sizes = dict(sizes)
        self.writable = writable
        self.state = read_state(self.path)
        self._fds: dict[int, int] = {}

    def _fd(self, vid: int, create: bool) -> int | None:
        fd = self._fds.get(vid)
        if fd is not None:
            return fd
        p = self.path / f"v{vid}.img"
        try:
            fd = os.open(p, (os.O_RDWR | (os.O_CREAT if create else 0)) if self.writable else os.O_RDONLY,
                         0o600)
        except FileNotFoundError:
            return None
        if create and os.fstat(fd).st_size != self.sizes[vid]:
            os.ftruncate(fd, self.sizes[vid])
        self._fds[vid] = fd
        return fd

    @property
    def seq(self) -> int:
        return self.state.seq

    def pread(self, vid: int, offset: int, length: int) -> bytes:
        """Bytes of the base image (zeros where nothing was applied, rule 2)."""
        fd = self._fd(vid, False)
        if fd is None:
            return bytes(length)
        b = os.pread(fd, length, offset)
        return b if len(b) == length else b + bytes(length - len(b))

    def extents(self, vid: int, offset: int, length: int) -> list[tuple[int, int]]:
        """Ranges of the base image that may hold data (holes read as zeros)."""
        fd = self._fd(vid, False)
        return [] if fd is None else data_extents(fd, offset, length)

    def apply(self, records: Iterable[tuple[int, int, int, int, int, bytes | None]], *, seq: int, time_ns: int,
              first_segment: int) -> int:
        """Apply (seq, vdisk id, op, offset, length, payload) records, oldest
        first, then persist the new state (rule 1). Returns records applied."""
        if not self.writable:
            raise BaseError(f"{self.path}: opened read-only")
        self.path.mkdir(parents=True, exist_ok=True)
        touched: set[int] = set()
        n = 0
        for rseq, vid, op, off, length, payload in records:
            if vid not in self.sizes:
                continue  # a vdisk no longer in the CG: nothing to keep for it
            if off + length > self.sizes[vid]:
                raise BaseError(f"record seq {rseq}: {off}+{length} is past the end of vdisk id {vid}")
            fd = self._fd(vid, True)
            if op == Op.WRITE:
                if payload is None or len(payload) != length:
                    raise BaseError(f"record seq {rseq}: payload of {0 if payload is None else len(payload)} "
                                    f"bytes for a {length}-byte write")
                os.pwrite(fd, payload, off)
            elif op in (Op.ZERO, Op.TRIM):
                zero_range(fd, off, length)
            else:
                continue
            touched.add(fd)
            n += 1
        for fd in touched:
            os.fsync(fd)
        if touched:
            fsync_dir(self.path)  # new image files
        state = BaseState(max(seq, self.state.seq), max(time_ns, self.state.time_ns),
                          max(first_segment, self.state.first_segment))
        atomic_write(self.path / "state.json", json.dumps({"version": VERSION, "seq": state.seq,
                                                           "time_ns": state.time_ns,
                                                           "first_segment": state.first_segment}).encode(), 0o600)
        self.state = state
        return n

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "BaseImages":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
