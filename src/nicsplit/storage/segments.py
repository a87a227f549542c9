"""Where a journal keeps its files: named, append-only objects in one place.

The journal (`nicsplit.journal.writer`) does its IO only through a
`SegmentStore`: create a segment and append to it, read a byte range, list,
delete, make names durable, hold the one-writer lock.  `LocalSegmentStore`
keeps them as files in a directory through a `durable.Filesystem` — the real
one (`OsFilesystem`) or the power-cut double of the tests
(`nicsplit.testing.appliance.CrashFilesystem`).  Another backend (an object
store) implements the same few calls; the journal logic does not change.
The read-only readers that must not share the writer (`journal.scan.
JournalScanner`, `journal.reader.SegmentReader`) still open the segment
files of a local directory themselves, for their read-ahead and ``fstat``
rules; a remote backend would give them a read-range call of this store.

Rules
-----
1. Objects are append-only (durable.py rule 2): ``create`` makes a new one,
   and its handle's ``append`` writes at the end.  The one other mutation is
   the handle's ``truncate``, used only by the journal's recovery at open to
   cut an uncommitted tail (an object store would rewrite the last object).
2. Nothing is durable before the handle's ``sync()``; a created or deleted
   name is durable only after ``sync_names()`` (durable.py rule 3).
3. Names are plain file names (``00000001.seg``, ``carried.blk``): no
   directories inside a store.

Example::

    store = LocalSegmentStore(journal_dir)   # OsFilesystem by default
    store.ensure()                           # the directory, its name durable
    f = store.create("00000001.seg"); f.append(head); f.sync(); store.sync_names()
    store.read("00000001.seg", 0, 24)
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from nicsplit.storage.durable import Closable, DurableFile, Filesystem, OsFilesystem

__all__ = ["SegmentStore", "LocalSegmentStore"]


class SegmentStore(Protocol):
    """The narrow interface between the journal and where its bytes live."""

    where: str  # names the store in messages (a directory, a bucket prefix)

    def present(self) -> bool:
        """Whether the store exists at all (a journal was ever created here)."""
        ...

    def ensure(self) -> None:
        """Create the store if it does not exist, durably."""
        ...

    def list(self) -> list[str]:
        """Every object name, sorted."""
        ...

    def exists(self, name: str) -> bool: ...

    def create(self, name: str) -> DurableFile:
        """A new, empty object to append to (its name durable after `sync_names`)."""
        ...

    def open(self, name: str, *, readonly: bool = False) -> DurableFile:
        """An existing object: read it, and (unless ``readonly``) append to it."""
        ...

    def read(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """``length`` bytes of ``name`` from ``offset`` (None: up to its end)."""
        ...

    def delete(self, name: str) -> None: ...

    def sync_names(self) -> None:
        """Make every name created or deleted so far durable."""
        ...

    def lock(self) -> Closable:
        """The exclusive one-writer lock; BlockingIOError if another holds it."""
        ...


class LocalSegmentStore:
    """A `SegmentStore` of files in one directory, through a `Filesystem`."""

    LOCK_NAME = "lock"  # the writer lock's file (flock), beside the segments

    def __init__(self, path: str | Path, fs: Filesystem | None = None) -> None:
        self.path = Path(path)
        self.fs: Filesystem = fs or OsFilesystem()
        self.where = str(self.path)

    def present(self) -> bool:
        return self.fs.exists(self.path)

    def ensure(self) -> None:
        if not self.fs.exists(self.path):
            self.fs.makedirs(self.path)
            self.fs.sync_dir(self.path.parent)

    def list(self) -> list[str]:
        return sorted(self.fs.listdir(self.path))

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.path / name)

    def create(self, name: str) -> DurableFile:
        return self.fs.open(self.path / name, create=True)

    def open(self, name: str, *, readonly: bool = False) -> DurableFile:
        return self.fs.open(self.path / name, readonly=readonly)

    def read(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        f = self.fs.open(self.path / name, readonly=True)
        try:
            return f.pread(offset, f.size() - offset if length is None else length)
        finally:
            f.close()

    def delete(self, name: str) -> None:
        self.fs.remove(self.path / name)

    def sync_names(self) -> None:
        self.fs.sync_dir(self.path)

    def lock(self) -> Closable:
        return self.fs.lock(self.path / self.LOCK_NAME)
