"""Durable files: the one interface through which the journal writes (TESTING.md D5).

Rules
-----
1. The journal never calls ``open``/``os.write``/``os.fsync`` itself: its
   `nicsplit.storage.segments.LocalSegmentStore` asks a `Filesystem` for
   `DurableFile` objects.  `OsFilesystem` is the real thing;
   `nicsplit.testing.appliance.CrashFilesystem` keeps everything in memory and
   can "pull the plug": unsynced writes are dropped or torn.  (The read-only
   journal readers — `journal.scan.JournalScanner`, `journal.reader.SegmentReader`
   — read segment files with ``os.pread`` directly: they write nothing.)
2. Files are append-only: ``append()`` writes at the end; nothing is written
   at an offset.  The only other mutation is ``truncate()`` (used by the
   journal to cut an uncommitted tail at open, followed by ``sync()``).
3. Nothing is durable until ``sync()`` returns (fdatasync).  A new file's name
   is durable only after ``sync_dir()`` of its directory.
4. A failed sync is fatal: the caller must stop using the file and never
   retry, because after a failed fsync Linux may have dropped the dirty pages
   and a retried fsync "succeeds" without the data (the 2018 PostgreSQL
   fsyncgate lesson).
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
from typing import Protocol


class DurableFile(Protocol):
    name: str

    def size(self) -> int: ...
    # ``data`` may be a view of a buffer the caller reuses once append returns
    # (the journal writer's batch buffer): an implementation copies, never keeps it.
    def append(self, data: bytes | memoryview) -> None: ...
    def pread(self, offset: int, length: int) -> bytes: ...
    def sync(self) -> None: ...
    def truncate(self, size: int) -> None: ...
    def close(self) -> None: ...


class Filesystem(Protocol):
    def makedirs(self, path: Path) -> None: ...
    def listdir(self, path: Path) -> list[str]: ...
    def exists(self, path: Path) -> bool: ...
    def open(self, path: Path, *, create: bool = False, readonly: bool = False) -> DurableFile: ...
    def remove(self, path: Path) -> None: ...
    def sync_dir(self, path: Path) -> None: ...
    def lock(self, path: Path) -> Closable:
        """An exclusive writer lock; BlockingIOError if another holds it."""
        ...


class Closable(Protocol):
    def close(self) -> None: ...


class OsFile:
    """A real file opened read-write; appends go through ``os.pwrite`` at the
    tracked end so a concurrent reader never changes our position."""

    def __init__(self, path: Path, *, create: bool, readonly: bool = False) -> None:
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC | (os.O_CREAT | os.O_EXCL if create else 0)
        self.name = str(path)
        self._fd = os.open(path, flags, 0o600)
        self._size = os.fstat(self._fd).st_size

    def size(self) -> int:
        return self._size

    def append(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fd, view, self._size)
            self._size += n
            view = view[n:]

    def pread(self, offset: int, length: int) -> bytes:
        out = bytearray()
        while len(out) < length:
            chunk = os.pread(self._fd, length - len(out), offset + len(out))
            if not chunk:
                break
            out += chunk
        return bytes(out)

    def sync(self) -> None:
        os.fdatasync(self._fd)

    def truncate(self, size: int) -> None:
        os.ftruncate(self._fd, size)
        self._size = size

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class OsFilesystem:
    def makedirs(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)

    def listdir(self, path: Path) -> list[str]:
        return sorted(os.listdir(path))

    def exists(self, path: Path) -> bool:
        return path.exists()

    def open(self, path: Path, *, create: bool = False, readonly: bool = False) -> OsFile:
        return OsFile(path, create=create, readonly=readonly)

    def remove(self, path: Path) -> None:
        os.unlink(path)

    def sync_dir(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def lock(self, path: Path) -> "_FileLock":
        return _FileLock(path)


class LockHeld(BlockingIOError):
    """Another process holds the lock; ``holder`` is its pid as the lock
    file records it (None when the file names none: an older writer)."""

    def __init__(self, path: Path, holder: int | None) -> None:
        super().__init__(errno.EWOULDBLOCK, f"{path} is locked by "
                         f"{'pid ' + str(holder) if holder else 'another process'}")
        self.holder = holder


class _FileLock:
    """flock(LOCK_EX | LOCK_NB) on a lock file; released by close() or by
    the process dying (so kill -9 never leaves a stale lock). The holder
    writes its pid into the file, so a refused opener can name it
    (`LockHeld`)."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raw = os.pread(self._fd, 32, 0).decode(errors="replace").strip()
            os.close(self._fd)
            raise LockHeld(path, int(raw) if raw.isdigit() else None) from None
        except BaseException:
            os.close(self._fd)
            raise
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # the pid is for messages only; the flock is the lock

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
