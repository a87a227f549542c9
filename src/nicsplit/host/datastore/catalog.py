"""The catalog (`catalog.json`): which vdisks exist and their properties.

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
import json
import os
import re
import time
import uuid as _uuid
from dataclasses import dataclass, field
from typing import Any, Iterator

from .errors import CorruptDatastore, DatastoreError
from nicsplit.core.fsutil import fsync_dir

CATALOG_FORMAT = 1
NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Fields update_vdisk may change; the rest identify the vdisk or its layout.
MUTABLE_FIELDS = frozenset({"name", "owner", "readonly", "extra", "size"})


@dataclass(frozen=True)
class VdiskInfo:
    name: str
    uuid: str
    id: int
    owner: str | None
    size: int
    block_size: int
    readonly: bool
    created: float
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "uuid": self.uuid, "id": self.id, "owner": self.owner,
            "size": self.size, "block_size": self.block_size, "readonly": self.readonly,
            "created": self.created, "extra": dict(self.extra),
        }


@dataclass
class CatalogData:
    uuid: _uuid.UUID
    next_id: int
    extent_size: int
    volume_size: int
    created: float
    vdisks: dict[str, VdiskInfo]  # by name

    def to_json(self) -> dict[str, Any]:
        return {
            "format": CATALOG_FORMAT,
            "uuid": str(self.uuid),
            "next_id": self.next_id,
            "extent_size": self.extent_size,
            "volume_size": self.volume_size,
            "created": self.created,
            "vdisks": [v.to_json() for v in sorted(self.vdisks.values(), key=lambda v: v.id)],
        }


def check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise DatastoreError(f"invalid vdisk name {name!r}: use 1-64 characters from [A-Za-z0-9._-]")
    return name


def check_size(size: object) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % 512:
        raise DatastoreError(f"invalid vdisk size {size!r}: must be a positive multiple of 512 bytes")
    return size


def check_owner(owner: object) -> str | None:
    if owner is not None and not isinstance(owner, str):
        raise DatastoreError(f"invalid owner {owner!r}: must be a string such as 'vm:web1' or None")
    return owner


def _vdisk_from_json(d: Any, path: str) -> VdiskInfo:
    try:
        info = VdiskInfo(
            name=check_name(d["name"]), uuid=str(_uuid.UUID(d["uuid"])), id=int(d["id"]),
            owner=check_owner(d["owner"]), size=check_size(d["size"]), block_size=int(d["block_size"]),
            readonly=bool(d["readonly"]), created=float(d["created"]), extra=dict(d.get("extra") or {}),
        )
    except (KeyError, TypeError, ValueError, DatastoreError) as e:
        raise CorruptDatastore(f"{path}: bad vdisk entry {d!r}: {e}") from None
    return info


def parse(text: str, path: str) -> CatalogData:
    try:
        d = json.loads(text)
        if d.get("format") != CATALOG_FORMAT:
            raise CorruptDatastore(f"{path}: unsupported catalog format {d.get('format')!r}")
        vdisks = {}
        for e in d["vdisks"]:
            v = _vdisk_from_json(e, path)
            if v.name in vdisks:
                raise CorruptDatastore(f"{path}: vdisk name {v.name!r} appears twice")
            vdisks[v.name] = v
        cat = CatalogData(
            uuid=_uuid.UUID(d["uuid"]), next_id=int(d["next_id"]), extent_size=int(d["extent_size"]),
            volume_size=int(d["volume_size"]), created=float(d["created"]), vdisks=vdisks,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CorruptDatastore(f"{path}: malformed catalog: {e!r}") from None
    ids = [v.id for v in vdisks.values()]
    if len(set(ids)) != len(ids) or any(i >= cat.next_id or i < 0 for i in ids):
        raise CorruptDatastore(f"{path}: vdisk ids {sorted(ids)} are duplicated or not below next_id {cat.next_id}")
    return cat


class CatalogFile:
    """catalog.json + catalog.lock in one directory."""

    def __init__(self, dirpath: str) -> None:
        self.dir = dirpath
        self.path = os.path.join(dirpath, "catalog.json")
        self.lock_path = os.path.join(dirpath, "catalog.lock")

    def stamp(self) -> tuple[int, int, int] | None:
        """Identity of the file on disk; changes on every atomic replace."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def read(self) -> tuple[CatalogData, tuple[int, int, int] | None]:
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                text = f.read().decode("utf-8")
        except FileNotFoundError:
            raise DatastoreError(f"no datastore at {self.dir} (missing catalog.json)") from None
        except UnicodeDecodeError as e:
            raise CorruptDatastore(f"{self.path}: not UTF-8: {e}") from None
        return parse(text, self.path), (st.st_ino, st.st_mtime_ns, st.st_size)

    def write(self, cat: CatalogData) -> None:
        tmp = self.path + ".tmp"
        data = (json.dumps(cat.to_json(), indent=1, sort_keys=True) + "\n").encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            mv = memoryview(data)
            while mv:
                mv = mv[os.write(fd, mv) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.path)
        fsync_dir(self.dir)

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
