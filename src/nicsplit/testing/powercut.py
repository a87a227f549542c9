"""Exhaustive power cuts of the appliance journal (issue 11, "journal power
cut with torn unsynced writes" and "a bounded exhaustive short-sequence
crash test").

`TraceFilesystem` is an in-memory `nicsplit.storage.durable.Filesystem`
that records every mutation the journal makes, in order: ``create``,
``append``, ``sync`` (fdatasync of a file), ``sync_dir`` (makes the names
in a directory durable), plus ``mark`` entries the test adds (e.g. "batch
3 acknowledged").

`crash_states(ops, k)` is every disk the plug being pulled after the first
``k`` operations can leave, under this model of a disk and its page cache:

* a file holds what its last ``sync`` made durable; the appends since then
  (of every file, in their global order) reached the disk as a *prefix*:
  the first ``i`` whole, the next one torn at any 512-byte sector boundary
  (the sectors before it written, the rest not), optionally with garbage in
  the sector where it stopped (a sector half written);
* a file whose name no ``sync_dir`` made durable exists or not (both);
* directories are durable once made (the journal's parent directory is
  not what is tested here).

Each state is a fresh `TraceFilesystem` holding exactly those bytes, to
reopen the journal on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from nicsplit.testing.memfs import MemFile, MemFilesystem

SECTOR = 512


class TraceFilesystem(MemFilesystem):
    """In-memory filesystem recording the journal's mutations in ``ops``."""

    def __init__(self, files: dict[str, bytes] | None = None, dirs: set[str] | None = None) -> None:
        super().__init__(files, dirs)
        self.ops: list[tuple] = []

    def mark(self, label: object) -> None:
        self.ops.append(("mark", label))

    def _event(self, op: str, *args: object) -> None:
        self.ops.append((op, *args))

    def _write(self, name: str, data: bytes) -> None:
        self.ops.append(("append", name, bytes(data)))

    def _sync(self, name: str, f: MemFile) -> None:
        self.ops.append(("sync", name))

    def _sync_dir(self, path: str) -> None:
        self.ops.append(("sync_dir", path))


@dataclass
class _Model:
    durable: dict[str, bytes] = field(default_factory=dict)  # content as of the last sync
    current: dict[str, bytearray] = field(default_factory=dict)
    named: set[str] = field(default_factory=set)  # names made durable by sync_dir
    pending: list[tuple[str, int, bytes]] = field(default_factory=list)  # unsynced appends: file, offset, data


def _replay(ops: list[tuple], k: int) -> _Model:
    m = _Model()
    for op in ops[:k]:
        kind = op[0]
        if kind == "create":
            m.current[op[1]] = bytearray()
            m.durable[op[1]] = b""
        elif kind == "append":
            _, name, data = op
            m.pending.append((name, len(m.current[name]), data))
            m.current[name] += data
        elif kind == "sync":
            m.durable[op[1]] = bytes(m.current[op[1]])
            m.pending = [p for p in m.pending if p[0] != op[1]]
        elif kind == "sync_dir":
            prefix = op[1] + "/"
            m.named |= {n for n in m.current if n.startswith(prefix)}
        elif kind in ("truncate", "remove"):
            raise NotImplementedError(f"{kind} in a recorded trace: the model covers append-only runs")
    return m


def _tears(offset: int, data: bytes, rng: random.Random) -> Iterator[tuple[int, bytes | None]]:
    """(bytes of ``data`` kept, garbage for the sector where it stopped or None)."""
    cuts = [0] + [c for c in range(1, len(data)) if (offset + c) % SECTOR == 0]
    for c in cuts:
        if c:  # nothing kept and no garbage is the previous prefix itself
            yield c, None
        end = min(len(data), (offset + c) // SECTOR * SECTOR + SECTOR - offset)
        if end > c:
            yield c, rng.randbytes(end - c)


def crash_states(ops: list[tuple], k: int, rng: random.Random, dirs: set[str]) -> Iterator[tuple[str, TraceFilesystem]]:
    """Every disk a power cut after ``ops[:k]`` can leave (module doc):
    (a short description, the filesystem)."""
    m = _replay(ops, k)
    unnamed = sorted(n for n in m.current if n not in m.named)
    name_sets = [()] + [tuple(unnamed)] if unnamed else [()]

    def disk(extra: list[tuple[str, int, bytes]], lost: tuple[str, ...]) -> TraceFilesystem:
        files = {n: bytearray(d) for n, d in m.durable.items() if n not in lost}
        for name, off, data in extra:
            if name in files:
                f = files[name]
                if len(f) < off:
                    return None  # an earlier write to this file was not kept: no prefix
                f[off:off + len(data)] = data
        return TraceFilesystem({n: bytes(d) for n, d in files.items()}, dirs)

    for lost in name_sets:
        tag = f" without {','.join(Path(n).name for n in lost)}" if lost else ""
        for i in range(len(m.pending) + 1):
            fs = disk(m.pending[:i], lost)
            if fs is not None:
                yield f"{i}/{len(m.pending)} unsynced writes{tag}", fs
            if i == len(m.pending):
                break
            name, off, data = m.pending[i]
            for kept, garbage in _tears(off, data, rng):
                torn = data[:kept] + (garbage or b"")
                fs = disk(m.pending[:i] + [(name, off, torn)], lost)
                if fs is not None:
                    yield f"{i}/{len(m.pending)} unsynced writes, the next torn at {kept}" \
                          f"{' + a garbage sector' if garbage else ''}{tag}", fs
