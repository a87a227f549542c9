"""`MemFilesystem`: an in-memory `nicsplit.storage.durable.Filesystem`, the
base of the test doubles that pull the plug on the journal
(`nicsplit.testing.appliance.CrashFilesystem`, which knows which bytes were
synced, and `nicsplit.testing.powercut.TraceFilesystem`, which records every
mutation). Subclasses hook the mutations (``_write``, ``_sync``,
``_sync_dir``, ``_event``); the base only keeps names and bytes.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class MemFile:
    data: bytearray = field(default_factory=bytearray)
    durable: bytes = b""  # content as of the last sync (for doubles that track it)


class MemHandle:
    def __init__(self, fs: "MemFilesystem", name: str, readonly: bool) -> None:
        self._fs, self.name, self._readonly = fs, name, readonly

    def _file(self) -> MemFile:
        f = self._fs.files.get(self.name)
        if f is None:
            raise FileNotFoundError(errno.ENOENT, "file removed", self.name)
        return f

    def size(self) -> int:
        return len(self._file().data)

    def append(self, data: bytes) -> None:
        if self._readonly:
            raise OSError(errno.EBADF, "read-only handle", self.name)
        self._fs._write(self.name, data)
        self._file().data += data

    def pread(self, offset: int, length: int) -> bytes:
        return bytes(self._file().data[offset:offset + length])

    def sync(self) -> None:
        self._fs._sync(self.name, self._file())

    def truncate(self, size: int) -> None:
        self._fs._event("truncate", self.name, size)
        del self._file().data[size:]

    def close(self) -> None:
        pass


class _NoLock:
    def close(self) -> None:
        pass


class MemFilesystem:
    """Names and bytes in memory; the hooks do nothing."""

    def __init__(self, files: dict[str, bytes] | None = None, dirs: set[str] | None = None) -> None:
        self.files = {k: MemFile(bytearray(v)) for k, v in (files or {}).items()}
        self.dirs = set(dirs or ())

    # -- hooks -------------------------------------------------------------------------

    def _event(self, op: str, *args: object) -> None:
        """A mutation: ``create``, ``remove``, ``truncate`` (with its args)."""

    def _write(self, name: str, data: bytes) -> None:
        """Before ``data`` is appended to ``name`` (may raise)."""

    def _sync(self, name: str, f: MemFile) -> None:
        """An fdatasync of ``name`` (may raise)."""

    def _sync_dir(self, path: str) -> None:
        """A directory's names made durable (may raise)."""

    # -- the Filesystem ------------------------------------------------------------------

    def makedirs(self, path: Path) -> None:
        p = Path(path)
        for d in [p, *p.parents]:
            self.dirs.add(str(d))

    def listdir(self, path: Path) -> list[str]:
        prefix = str(path) + "/"
        return sorted(k[len(prefix):] for k in self.files if k.startswith(prefix) and "/" not in k[len(prefix):])

    def exists(self, path: Path) -> bool:
        return str(path) in self.files or str(path) in self.dirs

    def open(self, path: Path, *, create: bool = False, readonly: bool = False) -> MemHandle:
        key = str(path)
        if create:
            if key in self.files:
                raise FileExistsError(errno.EEXIST, "exists", key)
            self.files[key] = MemFile()
            self._event("create", key)
        elif key not in self.files:
            raise FileNotFoundError(errno.ENOENT, "no such file", key)
        return MemHandle(self, key, readonly)

    def remove(self, path: Path) -> None:
        self._event("remove", str(path))
        del self.files[str(path)]

    def sync_dir(self, path: Path) -> None:
        self._sync_dir(str(path))

    def lock(self, path: Path) -> _NoLock:
        return _NoLock()

    def content(self) -> dict[str, bytes]:
        return {k: bytes(f.data) for k, f in self.files.items()}
