"""The vdisk catalog (``DATA/datastore/catalog.json``): its codec and a
read-only view for every process that needs vdisk ids, names, sizes and CG
membership (the card, the appliance, recovery, commands).

Only the host's datastore writes the catalog
(`nicsplit.host.datastore.catalog.CatalogFile`, through `encode` here); the
rules of that writer are what make reading safe without a lock:

- the file is replaced atomically (tmp, fsync, rename, fsync dir): a reader
  sees the old or the new catalog, never a mix;
- vdisk ids are small ints from ``next_id``, never reused: a record naming an
  id that is not in the catalog is garbage from a deleted vdisk;
- unknown keys in a vdisk's ``extra`` are kept; ``extra["cg"]`` is the
  vdisk's consistency group (`VdiskInfo.cg`).

The format (``"format": 1``) is documented in docs/datastore.md.

Example::

    cat = CatalogReader(Layout(data).datastore)
    for v in cat.cg_members("cg1"):     # re-read only when the file changed
        print(v.id, v.name, v.size)
"""

from __future__ import annotations

import json
import os
import uuid as _uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nicsplit.core.layout import CATALOG_NAME
from nicsplit.core.names import BadName
from nicsplit.core.names import check_name as _check

CATALOG_FORMAT = 1

Stamp = tuple[int, int, int]  # (inode, mtime_ns, size): changes on every atomic replace


class DatastoreError(Exception):
    """Any datastore failure: bad input, bad files, wrong state."""


class CorruptDatastore(DatastoreError):
    """A datastore file fails validation (bad magic, CRC, impossible map)."""


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

    @property
    def cg(self) -> str | None:
        """The consistency group the vdisk belongs to, if any."""
        return self.extra.get("cg")

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


def check_name(name: object, *, stored: bool = False) -> str:
    """A vdisk name by the one rule (`nicsplit.core.names`); ``stored``: read
    from a catalog an earlier version may have written (characters only)."""
    try:
        return _check(name, "vdisk", stored=stored)
    except BadName as e:
        raise DatastoreError(str(e)) from None


def check_cg(cg: object) -> str | None:
    """A vdisk's CG (``extra["cg"]``) when it is set or changed: None or a
    valid CG name."""
    if cg is None:
        return None
    try:
        return _check(cg, "consistency group")
    except BadName as e:
        raise DatastoreError(str(e)) from None


# The largest vdisk a new one may be: 64 TiB. Its dirty bitmap (core.dirtymap,
# one bit per 64 KiB region) is 2^46 / 2^16 / 8 = 128 MiB of host memory, and
# every replica image and restored raw file is one sparse file of the vdisk's
# size: xfs and btrfs hold 64 TiB in one file, ext4 (4 KiB blocks) only
# 16 TiB, which is why the datastore also asks its filesystem (create_vdisk).
MAX_VDISK_SIZE = 64 << 40


def check_size(size: object, *, stored: bool = False) -> int:
    """A vdisk size; above `MAX_VDISK_SIZE` only when ``stored`` (read from a
    catalog an earlier version wrote, which had no maximum)."""
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % 512:
        raise DatastoreError(f"invalid vdisk size {size!r}: must be a positive multiple of 512 bytes")
    if size > MAX_VDISK_SIZE and not stored:
        raise DatastoreError(f"invalid vdisk size {size} ({size / 2**40:.4g} TiB): the largest vdisk is "
                             f"{MAX_VDISK_SIZE >> 40} TiB")
    return size


def check_owner(owner: object) -> str | None:
    if owner is not None and not isinstance(owner, str):
        raise DatastoreError(f"invalid owner {owner!r}: must be a string such as 'vm:web1' or None")
    return owner


def _vdisk_from_json(d: Any, path: str) -> VdiskInfo:
    try:
        info = VdiskInfo(
            name=check_name(d["name"], stored=True), uuid=str(_uuid.UUID(d["uuid"])), id=int(d["id"]),
            owner=check_owner(d["owner"]), size=check_size(d["size"], stored=True), block_size=int(d["block_size"]),
            readonly=bool(d["readonly"]), created=float(d["created"]), extra=dict(d.get("extra") or {}),
        )
    except (KeyError, TypeError, ValueError, DatastoreError) as e:
        raise CorruptDatastore(f"{path}: bad vdisk entry {d!r}: {e}") from None
    return info


def parse(text: str, path: str) -> CatalogData:
    """The catalog in ``text`` (read from ``path``, named in errors)."""
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


def encode(cat: CatalogData) -> bytes:
    """The file's bytes for ``cat`` (what `parse` reads back)."""
    return (json.dumps(cat.to_json(), indent=1, sort_keys=True) + "\n").encode()


class CatalogReader:
    """``catalog.json`` in the datastore directory ``dirpath``, read only.

    `read` always reads the file; `refresh` re-reads it only when its stamp
    changed, and `vdisks` / `cg_members` / `get` answer from that snapshot."""

    def __init__(self, dirpath: str | os.PathLike) -> None:
        self.dir = os.fspath(dirpath)
        self.path = os.path.join(self.dir, CATALOG_NAME)
        self._data: CatalogData | None = None
        self._stamp: Stamp | None = None

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def stamp(self) -> Stamp | None:
        """Identity of the file on disk; changes on every atomic replace."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def read(self) -> tuple[CatalogData, Stamp]:
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                text = f.read().decode("utf-8")
        except FileNotFoundError:
            raise DatastoreError(f"no datastore at {self.dir} (missing {CATALOG_NAME})") from None
        except UnicodeDecodeError as e:
            raise CorruptDatastore(f"{self.path}: not UTF-8: {e}") from None
        return parse(text, self.path), (st.st_ino, st.st_mtime_ns, st.st_size)

    def refresh(self) -> bool:
        """Re-read the file if it changed since the last read; True if it did.
        DatastoreError when there is no catalog (and none was read before)."""
        if self._data is not None and self.stamp() in (self._stamp, None):
            return False
        self._data, self._stamp = self.read()
        return True

    def snapshot(self) -> CatalogData:
        self.refresh()
        assert self._data is not None
        return self._data

    def vdisks(self) -> list[VdiskInfo]:
        """Every vdisk, by id."""
        return sorted(self.snapshot().vdisks.values(), key=lambda v: v.id)

    def cg_members(self, cg: str) -> list[VdiskInfo]:
        """The vdisks of consistency group ``cg``, by id."""
        return [v for v in self.vdisks() if v.cg == cg]

    def get(self, name: str) -> VdiskInfo | None:
        return self.snapshot().vdisks.get(name)


def open_catalog(datastore_dir: str | Path) -> CatalogReader:
    """A reader of the catalog in ``datastore_dir``; DatastoreError (one line)
    when there is none."""
    r = CatalogReader(datastore_dir)
    r.refresh()
    return r
