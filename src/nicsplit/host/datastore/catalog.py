"""The catalog's writer: `CatalogFile`, ``catalog.json`` + ``catalog.lock``.

The codec (`VdiskInfo`, `CatalogData`, `parse`, `encode`, the name and size
checks) and the read-only view are `nicsplit.core.catalog`, shared by every
reader; only the datastore writes, here.

Rules:
- Every change is read-modify-write under an exclusive flock on
  `catalog.lock`, held only for that change, so a CLI can create a vdisk
  while a server runs. The file is replaced atomically (write tmp, fsync,
  rename, fsync dir): a reader sees the old or the new catalog, never a mix.
- Vdisk ids are small ints from `next_id`, never reused: a log record naming
  an id that is not in the catalog is garbage from a deleted vdisk.
- Unknown keys in a vdisk entry's `extra` dict are kept as they are (room for
  later fields such as the consistency group).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
import uuid as _uuid
from typing import Iterator

from nicsplit.core.catalog import CatalogData, CatalogReader, encode
from nicsplit.core.fsutil import atomic_write
from nicsplit.core.layout import CATALOG_LOCK_NAME

# Fields update_vdisk may change; the rest identify the vdisk or its layout.
MUTABLE_FIELDS = frozenset({"name", "owner", "readonly", "extra", "size"})


class CatalogFile(CatalogReader):
    """catalog.json + catalog.lock in one directory: reads (`CatalogReader`)
    and the one writer."""

    def __init__(self, dirpath: str) -> None:
        super().__init__(dirpath)
        self.lock_path = os.path.join(self.dir, CATALOG_LOCK_NAME)

    def write(self, cat: CatalogData) -> None:
        atomic_write(self.path, encode(cat))

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # short-held by everyone: blocking is fine
            yield
        finally:
            os.close(fd)  # releases the flock


def new_catalog(extent_size: int, volume_size: int) -> CatalogData:
    return CatalogData(
        uuid=_uuid.uuid4(), next_id=1, extent_size=extent_size, volume_size=volume_size,
        created=time.time(), vdisks={},
    )
