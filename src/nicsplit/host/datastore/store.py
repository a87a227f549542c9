"""The datastore: many thin-provisioned vdisks in shared volume files.

Theory of operation:
- A vdisk is cut into virtual extents of `extent_size` bytes. The first write
  to a virtual extent allocates a physical extent (free list first, else the
  next never-used extent of the last volume, else a new volume), appends a
  MAP record to the extent log, and only then writes the data. Reads of
  unmapped extents return zeros without touching a file.
- Release (trim/zero of a whole extent, vdisk delete): hole-punch the extent,
  then append UNMAP, then put it on the *pending* free list. `sync()` makes
  the punches durable (fsync of the volume) before moving pending extents to
  the free list, so an extent is never handed to a new owner while a power
  loss could still bring its old data back.
- At open the log is replayed, then everything the log does not call live is
  made zero on disk: volume files are cut to their high-water mark and free
  extents below it are punched again. That covers a crash at any step above,
  including a crash in the middle of a vdisk delete.

Durability contract:
- When pwrite/zero/trim returns, the data is in the page cache (os.pwrite)
  and every MAP/UNMAP it needed is in the log file (os.write): a kill -9 of
  this process loses nothing that returned.
- `sync()` makes everything returned before it started durable against power
  loss: volumes first (fdatasync, or fsync if extents were grown or punched),
  then the log (fsync). It may run in a worker thread while the IO thread
  keeps writing: the only shared state it touches is per-volume dirty flags
  (set after the write, cleared before the fsync, so no write is missed),
  the pending list (swapped under `_lock`), and the log's dirty flag.

Rules:
- Only the process holding the exclusive flock on `datastore.lock` writes
  volumes or the log (`open_io`); catalog-only access (`Datastore.open`)
  never does.
- Nothing is ever written outside a vdisk's [0, size): every entry point
  range-checks, even though callers already did.
- The hot path (an IO inside one mapped extent) is one dict lookup and one
  os.pwrite/os.pread; everything else is in the `_slow` methods.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import tempfile
import threading
import time
import uuid as _uuid
from dataclasses import dataclass
from typing import Any

from nicsplit.core.fsutil import WRITE_PIECE, punch_hole, zero_keep_allocated
from nicsplit.core.records import BLOCK_SIZE

from nicsplit.core import catalog as _catalog
from nicsplit.core.catalog import CatalogData, VdiskInfo
from nicsplit.core.layout import CATALOG_NAME

from .catalog import MUTABLE_FIELDS, CatalogFile, new_catalog
from .errors import CorruptDatastore, DatastoreBusy, DatastoreError, UnknownVdisk, VdiskExists
from .extentlog import OP_MAP, OP_UNMAP, ExtentLog, Record, encode_record
from .volume import check_extent_size, create_volume, open_volume, volume_name

log = logging.getLogger(__name__)

_VOLUME_RE = re.compile(r"vol-(\d{4,})\.dsk")

# Compact at open when the log holds more than RATIO x live records + SLACK.
# SLACK keeps small datastores from rewriting the log on every open: 4096
# records = 128 KiB of log, replayed in a few milliseconds.
COMPACT_RATIO = 2
COMPACT_SLACK = 4096

EXTENT_DATA = 0  # same values as nicsplit.host.io
EXTENT_HOLE_ZERO = 3

# A map entry: (volume index, volume fd, physical byte offset of the extent).
Entry = tuple[int, int, int]


@dataclass(frozen=True)
class DatastoreStats:
    vdisks: int
    volumes: int
    extent_size: int
    volume_size: int
    extents_allocated: int  # mapped to some vdisk
    extents_free: int  # released, ready for reuse
    extents_free_pending: int  # released, reusable after the next sync()
    extents_fresh: int  # never used, left in the last volume
    bytes_allocated: int  # extents_allocated * extent_size
    log_records: int
    log_bytes: int


class Datastore:
    """One datastore directory. See the module docstring for the rules."""

    def __init__(self, path: str, cat: CatalogData, stamp: Any) -> None:
        self.path = path
        self._cf = CatalogFile(path)
        self._cat = cat
        self._stamp = stamp
        self._by_id: dict[int, VdiskInfo] = {v.id: v for v in cat.vdisks.values()}
        self._es = cat.extent_size
        self._cap = cat.volume_size // cat.extent_size - 1  # data extents per volume
        self._lock = threading.Lock()  # maps, free lists, volume growth, log appends
        self._sync_lock = threading.Lock()  # one sync at a time (flag protocol needs it)
        self._io = False
        self._lock_fd = -1
        self._elog: ExtentLog | None = None
        self._fds: list[int] = []
        self._vdirty: list[bool] = []  # data written since last sync -> fdatasync
        self._vmeta: list[bool] = []  # grown/punched/zeroed since last sync -> fsync
        self._hwm: list[int] = []  # per volume: extents [0, hwm) exist in the file
        self._free: list[tuple[int, int]] = []  # (volume, pext), reusable now
        self._pending: list[tuple[int, int]] = []  # released, reusable after sync
        self._maps: dict[int, dict[int, Entry]] = {}  # vdisk id -> vext -> entry
        self._stores: dict[int, VdiskStore] = {}
        self._allocated = 0
        self._sync_failed: BaseException | None = None

    # ---- lifecycle -------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike, *, volume_size: int = 64 << 30, extent_size: int = 1 << 20) -> "Datastore":
        """Create an empty datastore in `path` (created if missing, must hold no datastore)."""
        path = os.fspath(path)
        check_extent_size(extent_size, volume_size)
        os.makedirs(path, exist_ok=True)
        cf = CatalogFile(path)
        leftovers = [n for n in os.listdir(path) if n in (CATALOG_NAME, "extents.log") or _VOLUME_RE.fullmatch(n)]
        if leftovers:
            raise DatastoreError(f"datastore already exists at {path} (found {', '.join(sorted(leftovers))})")
        cat = new_catalog(extent_size, volume_size)
        os.close(create_volume(path, 0, cat.uuid, extent_size, volume_size))
        ExtentLog.create(os.path.join(path, "extents.log"), cat.uuid, extent_size)
        with cf.locked():
            if cf.stamp() is not None:
                raise DatastoreError(f"datastore already exists at {path}")
            cf.write(cat)  # last: a catalog means the datastore is complete
        return cls.open(path)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Datastore":
        """Catalog-only access: no IO lock, no log replay."""
        path = os.fspath(path)
        cf = CatalogFile(path)
        cat, stamp = cf.read()
        check_extent_size(cat.extent_size, cat.volume_size)
        return cls(path, cat, stamp)

    def open_io(self, *, compact: bool | None = None) -> None:
        """Take datastore.lock, replay (and maybe compact) the log, open volumes.

        compact: None = when the log is much larger than the live map,
        True = always, False = never.
        """
        if self._io:
            raise DatastoreError(f"datastore {self.path} is already open for IO by this handle")
        self._take_io_lock()
        try:
            self.reload_catalog()
            self._open_files(compact)
        except BaseException:
            self._close_io()
            raise
        self._io = True

    def close(self) -> None:
        """Sync and release everything; the handle stays usable for catalog calls."""
        if self._io:
            try:
                self.sync()
            finally:
                self._close_io()

    def __enter__(self) -> "Datastore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _take_io_lock(self) -> None:
        lock_path = os.path.join(self.path, "datastore.lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DatastoreBusy(f"datastore {self.path} is in use by pid {holder} (holds datastore.lock)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _close_io(self) -> None:
        for store in self._stores.values():
            store._kill()
        self._stores.clear()
        self._maps.clear()
        for fd in self._fds:
            os.close(fd)
        self._fds, self._vdirty, self._vmeta, self._hwm = [], [], [], []
        self._free, self._pending, self._allocated = [], [], 0
        if self._elog is not None:
            self._elog.close()
            self._elog = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1
        self._io = False
        self._sync_failed = None

    def _open_files(self, compact: bool | None) -> None:
        cat, es = self._cat, self._es
        elog, records = ExtentLog.open(os.path.join(self.path, "extents.log"), cat.uuid, es)
        self._elog = elog
        indexes = sorted(int(m.group(1)) for n in os.listdir(self.path) if (m := _VOLUME_RE.fullmatch(n)))
        if indexes != list(range(len(indexes))):
            missing = sorted(set(range(max(indexes, default=-1) + 1)) - set(indexes))
            raise CorruptDatastore(f"{self.path}: volume files missing: {', '.join(map(volume_name, missing))}")
        for i in indexes:
            self._fds.append(open_volume(self.path, i, cat.uuid, es))
        if not self._fds:
            self._fds.append(create_volume(self.path, 0, cat.uuid, es, cat.volume_size))
        nvol = len(self._fds)
        self._vdirty, self._vmeta = [False] * nvol, [False] * nvol

        live, garbage = self._replay(records, elog.path, nvol)
        self._rebuild(live, nvol)
        if garbage:
            log.warning("%s: %d log records belong to deleted vdisks; their extents are free", elog.path, garbage)
        nlive = sum(len(m) for m in live.values())
        if compact or (compact is None and elog.records > COMPACT_RATIO * nlive + COMPACT_SLACK):
            before = elog.records
            elog.rewrite(
                [(OP_MAP, vid, vext, vol, p) for vid in sorted(live) for vext, (vol, p) in sorted(live[vid].items())],
                cat.uuid, es,
            )
            log.info("%s: compacted %d records to %d", elog.path, before, elog.records)

    def _replay(self, records: list[Record], name: str, nvol: int) -> tuple[dict[int, dict[int, tuple[int, int]]], int]:
        """Rebuild the live map from the log; refuse any impossible history."""
        es, cap = self._es, self._cap
        live: dict[int, dict[int, tuple[int, int]]] = {vid: {} for vid in self._by_id}
        nvext = {vid: -(-v.size // es) for vid, v in self._by_id.items()}
        owner: dict[tuple[int, int], tuple[int, int]] = {}
        garbage = 0
        for n, (op, vid, vext, vol, p) in enumerate(records):
            m = live.get(vid)
            if m is None:  # vdisk deleted (ids are never reused): released
                garbage += 1
                continue
            where = f"{name}: record {n} ({'MAP' if op == OP_MAP else 'UNMAP'} vdisk {vid} vext {vext} vol {vol} pext {p})"
            if vol >= nvol or p >= cap:
                raise CorruptDatastore(f"{where}: physical extent outside the {nvol} volume(s) of {cap} extents")
            if vext >= nvext[vid]:
                raise CorruptDatastore(f"{where}: beyond the vdisk's {nvext[vid]} extents")
            if op == OP_MAP:
                if vext in m:
                    raise CorruptDatastore(f"{where}: virtual extent already mapped to {m[vext]}")
                if (vol, p) in owner:
                    raise CorruptDatastore(f"{where}: physical extent already mapped to (vdisk, vext) {owner[(vol, p)]}")
                m[vext] = (vol, p)
                owner[(vol, p)] = (vid, vext)
            else:
                if m.get(vext) != (vol, p):
                    raise CorruptDatastore(f"{where}: does not match the current mapping {m.get(vext)}")
                del m[vext]
                del owner[(vol, p)]
        return live, garbage

    def _rebuild(self, live: dict[int, dict[int, tuple[int, int]]], nvol: int) -> None:
        """Build runtime maps and free lists; zero on disk whatever is not live."""
        es, cap = self._es, self._cap
        used: list[set[int]] = [set() for _ in range(nvol)]
        for vid, m in live.items():
            rm: dict[int, Entry] = {}
            for vext, (vol, p) in m.items():
                used[vol].add(p)
                rm[vext] = (vol, self._fds[vol], (p + 1) * es)
            self._maps[vid] = rm
            self._allocated += len(m)
        free: list[tuple[int, int]] = []
        for vol in range(nvol):
            fd, u = self._fds[vol], used[vol]
            hwm = max(u) + 1 if u else 0
            self._hwm.append(hwm)
            # Data past the high-water mark was never mapped durably: drop it.
            if os.fstat(fd).st_size != (hwm + 1) * es:
                os.ftruncate(fd, (hwm + 1) * es)
            # Free extents below it may hold old data (crash mid-release): punch runs.
            p = 0
            while p < hwm:
                if p in u:
                    p += 1
                    continue
                start = p
                while p < hwm and p not in u:
                    free.append((vol, p))
                    p += 1
                punch_hole(fd, (start + 1) * es, (p - start) * es)
            if vol != nvol - 1:  # never-used tail of a full-size older volume
                free.extend((vol, q) for q in range(hwm, cap))
            os.fsync(fd)  # the zeroing above is durable before any reuse
        free.sort(reverse=True)  # pop() hands out the lowest extent first
        self._free = free

    # ---- catalog ---------------------------------------------------------

    @property
    def catalog_stamp(self) -> Any:
        """The stamp of the catalog this datastore answers from; changes
        whenever that catalog does (a cache key for views of it)."""
        return self._stamp

    def reload_catalog(self) -> bool:
        """Re-read catalog.json if it changed on disk; True if it did."""
        if self._cf.stamp() == self._stamp:
            return False
        cat, stamp = self._cf.read()
        self._apply_catalog(cat, stamp)
        return True

    def _apply_catalog(self, cat: CatalogData, stamp: Any) -> None:
        if cat.uuid != self._cat.uuid or cat.extent_size != self._es:
            raise CorruptDatastore(f"{self._cf.path}: datastore uuid/extent size changed under us")
        self._cat, self._stamp = cat, stamp
        self._by_id = {v.id: v for v in cat.vdisks.values()}
        for vid, store in list(self._stores.items()):
            info = self._by_id.get(vid)
            if info is None:
                store._kill()
                del self._stores[vid]
            else:
                store._refresh(info)

    def _mutate(self, fn: Any) -> Any:
        with self._cf.locked():
            cat, _ = self._cf.read()  # the latest, whoever wrote it
            result = fn(cat)
            self._cf.write(cat)
            stamp = self._cf.stamp()
        self._apply_catalog(cat, stamp)
        return result

    def create_vdisk(
        self, name: str, size: int, *, owner: str | None = None, readonly: bool = False, extra: dict | None = None
    ) -> VdiskInfo:
        _catalog.check_name(name)
        _catalog.check_size(size)
        self._check_file_size(size)
        _catalog.check_owner(owner)
        extra = _check_extra(extra)
        _catalog.check_cg(extra.get("cg"))

        def fn(cat: CatalogData) -> VdiskInfo:
            if name in cat.vdisks:
                raise VdiskExists(f"vdisk {name!r} already exists in {self.path}")
            info = VdiskInfo(
                name=name, uuid=str(_uuid.uuid4()), id=cat.next_id, owner=owner, size=size,
                block_size=BLOCK_SIZE, readonly=bool(readonly), created=time.time(), extra=extra,
            )
            cat.next_id += 1
            cat.vdisks[name] = info
            return info

        return self._mutate(fn)

    def _check_file_size(self, size: int) -> None:
        """The filesystem of the datastore must hold one sparse file of
        ``size`` bytes: replica images and restored raw files are such files
        (ext4 stops at 16 TiB). Asked with a sparse probe file, removed at once."""
        fd, probe = tempfile.mkstemp(prefix=".size-probe-", dir=self.path)
        try:
            os.ftruncate(fd, size)
        except OSError as e:
            raise DatastoreError(f"invalid vdisk size {size} ({size / 2**40:.4g} TiB): the filesystem of {self.path} "
                                 f"cannot hold a file that large ({e.strerror}); replica images and restores are "
                                 "files of the vdisk's size") from None
        finally:
            os.close(fd)
            os.unlink(probe)

    def delete_vdisk(self, name: str) -> None:
        """Remove a vdisk and release its extents.

        Needs the IO lock; without open_io() it takes the lock for the call
        (DatastoreBusy if another process holds it).
        """
        if not self._io:
            self.open_io()
            try:
                self.delete_vdisk(name)
            finally:
                self.close()
            return

        def fn(cat: CatalogData) -> VdiskInfo:
            if name not in cat.vdisks:
                raise UnknownVdisk(f"no vdisk {name!r} in {self.path}")
            return cat.vdisks.pop(name)

        # Catalog first: after a crash here the log records are garbage (released at open).
        info = self._mutate(fn)
        with self._lock:
            m = self._maps.pop(info.id, {})
            self._release(info.id, m, sorted(m))
        self.sync()  # punches durable: the space is reusable right away

    def list_vdisks(self) -> list[VdiskInfo]:
        return sorted(self._cat.vdisks.values(), key=lambda v: v.id)

    def get_vdisk(self, name: str) -> VdiskInfo:
        info = self._cat.vdisks.get(name)
        if info is None:
            raise UnknownVdisk(f"no vdisk {name!r} in {self.path}")
        return info

    def update_vdisk(self, name: str, /, **fields: Any) -> VdiskInfo:
        """Change name, owner, readonly, extra (replaced whole) or size (grow only)."""
        bad = set(fields) - MUTABLE_FIELDS
        if bad:
            raise DatastoreError(f"cannot change {', '.join(sorted(bad))}; changeable: {', '.join(sorted(MUTABLE_FIELDS))}")
        if "name" in fields:
            _catalog.check_name(fields["name"])
        if "owner" in fields:
            _catalog.check_owner(fields["owner"])
        if "size" in fields:
            _catalog.check_size(fields["size"])
            self._check_file_size(fields["size"])
        if "readonly" in fields and not isinstance(fields["readonly"], bool):
            raise DatastoreError(f"readonly must be a bool, not {fields['readonly']!r}")
        if "extra" in fields:
            fields["extra"] = _check_extra(fields["extra"])

        def fn(cat: CatalogData) -> VdiskInfo:
            old = cat.vdisks.get(name)
            if old is None:
                raise UnknownVdisk(f"no vdisk {name!r} in {self.path}")
            new_name = fields.get("name", name)
            if new_name != name and new_name in cat.vdisks:
                raise VdiskExists(f"vdisk {new_name!r} already exists in {self.path}")
            if "extra" in fields and fields["extra"].get("cg") != old.cg:
                _catalog.check_cg(fields["extra"].get("cg"))  # joining a CG: the name rule of nicsplit.core.names
            if fields.get("size", old.size) < old.size:
                raise DatastoreError(f"vdisk {name!r}: shrinking from {old.size} to {fields['size']} is not supported")
            new = VdiskInfo(**{**old.to_json(), **fields})
            del cat.vdisks[name]
            cat.vdisks[new_name] = new
            return new

        return self._mutate(fn)

    # ---- IO --------------------------------------------------------------

    def vdisk(self, name: str) -> "VdiskStore":
        """The IO handle of a vdisk (one per vdisk, shared by all callers)."""
        self._need_io()
        info = self._cat.vdisks.get(name)
        if info is None and self.reload_catalog():
            info = self._cat.vdisks.get(name)
        if info is None:
            raise UnknownVdisk(f"no vdisk {name!r} in {self.path}")
        store = self._stores.get(info.id)
        if store is None:
            store = self._stores[info.id] = VdiskStore(self, info, self._maps.setdefault(info.id, {}))
        return store

    def _need_io(self) -> None:
        if not self._io:
            raise DatastoreError(f"datastore {self.path} is not open for IO (call open_io())")

    def sync(self) -> None:
        """Make every write/zero/trim that returned before this call durable."""
        if not self._io:
            return
        with self._sync_lock:
            if self._sync_failed is not None:
                raise DatastoreError(f"datastore {self.path}: an earlier sync failed ({self._sync_failed}); reopen it")
            with self._lock:
                pending, self._pending = self._pending, []
            try:
                for vol in range(len(self._fds)):
                    # Clear before syncing: a write that sets the flag later is
                    # either covered by this fsync or seen by the next sync.
                    if self._vmeta[vol]:
                        self._vmeta[vol] = self._vdirty[vol] = False
                        os.fsync(self._fds[vol])
                    elif self._vdirty[vol]:
                        self._vdirty[vol] = False
                        os.fdatasync(self._fds[vol])
                assert self._elog is not None
                self._elog.sync()
            except OSError as e:
                # A failed fsync may have dropped dirty pages: never retry it.
                self._sync_failed = e
                with self._lock:
                    self._pending.extend(pending)
                raise DatastoreError(f"datastore {self.path}: sync failed: {e}") from e
            with self._lock:
                self._free.extend(pending)

    def statistics(self) -> DatastoreStats:
        with self._lock:
            last = len(self._hwm) - 1
            return DatastoreStats(
                vdisks=len(self._cat.vdisks),
                volumes=len(self._fds),
                extent_size=self._es,
                volume_size=self._cat.volume_size,
                extents_allocated=self._allocated,
                extents_free=len(self._free),
                extents_free_pending=len(self._pending),
                extents_fresh=self._cap - self._hwm[last] if last >= 0 else 0,
                bytes_allocated=self._allocated * self._es,
                log_records=self._elog.records if self._elog else 0,
                log_bytes=self._elog.length if self._elog else 0,
            )

    # Called with self._lock held.
    def _allocate(self, vid: int, vext: int) -> Entry:
        es = self._es
        if self._free:
            vol, p = self._free.pop()
        else:
            vol = len(self._fds) - 1
            if self._hwm[vol] >= self._cap:
                vol = self._add_volume()
            p = self._hwm[vol]
        fd = self._fds[vol]
        if p >= self._hwm[vol]:  # fresh space: grow the file by whole extents
            os.ftruncate(fd, (p + 2) * es)
            self._hwm[vol] = p + 1
            self._vmeta[vol] = True
        try:
            assert self._elog is not None
            self._elog.append(encode_record(OP_MAP, vid, vext, vol, p))  # before any data
        except BaseException:
            self._free.append((vol, p))
            raise
        self._allocated += 1
        return (vol, fd, (p + 1) * es)

    def _add_volume(self) -> int:
        vol = len(self._fds)
        log.info("%s: creating volume %s", self.path, volume_name(vol))
        fd = create_volume(self.path, vol, self._cat.uuid, self._es, self._cat.volume_size)
        # Extend the flag lists in place: VdiskStores hold references to them.
        self._fds.append(fd)
        self._vdirty.append(False)
        self._vmeta.append(False)
        self._hwm.append(0)
        return vol

    # Called with self._lock held.
    def _release(self, vid: int, m: dict[int, Entry], vexts: list[int]) -> None:
        """Punch, then log UNMAP, then park on the pending list (see module doc)."""
        es = self._es
        recs = []
        for vext in vexts:
            vol, fd, base = m[vext]
            punch_hole(fd, base, es)
            self._vmeta[vol] = True
            recs.append(encode_record(OP_UNMAP, vid, vext, vol, base // es - 1))
        if recs:
            assert self._elog is not None
            self._elog.append(b"".join(recs))
        for vext in vexts:
            vol, _fd, base = m.pop(vext)
            self._pending.append((vol, base // es - 1))
        self._allocated -= len(vexts)


def _check_extra(extra: object) -> dict:
    if extra is None:
        return {}
    if not isinstance(extra, dict):
        raise DatastoreError(f"extra must be a dict, not {type(extra).__name__}")
    try:
        return json.loads(json.dumps(extra))
    except (TypeError, ValueError) as e:
        raise DatastoreError(f"extra must be JSON-serialisable: {e}") from None


class VdiskStore:
    """IO on one vdisk. Offsets are virtual bytes in [0, size)."""

    def __init__(self, ds: Datastore, info: VdiskInfo, m: dict[int, Entry]) -> None:
        self._ds = ds
        self._map = m
        self._es = ds._es
        self._vdirty = ds._vdirty  # same list object; see Datastore.sync
        self._vmeta = ds._vmeta
        self._dead = False
        self._refresh(info)

    def _refresh(self, info: VdiskInfo) -> None:
        self.info = info
        self.size = info.size
        # pwrite's single bound: -1 refuses every write (read-only or dead).
        self._wsize = -1 if info.readonly else info.size

    def _kill(self) -> None:
        self._dead = True
        self.size = self._wsize = -1

    def _refuse(self, offset: int, length: int, write: bool) -> None:
        if self._dead:
            raise UnknownVdisk(f"vdisk {self.info.name!r} was deleted or its datastore closed")
        if write and self.info.readonly:
            raise DatastoreError(f"vdisk {self.info.name!r} is read-only")
        raise ValueError(f"vdisk {self.info.name!r}: range [{offset}, {offset + length}) outside [0, {self.size})")

    # ---- hot path --------------------------------------------------------

    def pread(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            self._refuse(offset, length, False)
        es = self._es
        i = offset // es
        off = offset - i * es
        if off + length <= es:
            ent = self._map.get(i)
            if ent is None:
                return bytes(length)
            data = os.pread(ent[1], length, ent[2] + off)
            if len(data) == length:
                return data
        return self._pread_slow(offset, length)

    def pwrite(self, offset: int, data: bytes | memoryview) -> None:
        """data: bytes-like of bytes (a memoryview must have format 'B')."""
        n = len(data)
        if offset < 0 or offset + n > self._wsize:
            self._refuse(offset, n, True)
        es = self._es
        i = offset // es
        off = offset - i * es
        if off + n <= es and n <= WRITE_PIECE:  # large writes in pieces: fsutil.WRITE_PIECE
            ent = self._map.get(i)
            if ent is not None and os.pwrite(ent[1], data, ent[2] + off) == n:
                self._vdirty[ent[0]] = True  # after the write: see Datastore.sync
                return
        self._pwrite_slow(offset, data)

    # ---- slow paths ------------------------------------------------------

    def _pread_slow(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)  # zeros: unmapped extents and short reads stay zero
        mv = memoryview(buf)
        es, m = self._es, self._map
        pos = 0
        while pos < length:
            i, off = divmod(offset + pos, es)
            k = min(es - off, length - pos)
            ent = m.get(i)
            if ent is not None:
                done = 0
                while done < k:
                    got = os.preadv(ent[1], [mv[pos + done : pos + k]], ent[2] + off + done)
                    if got == 0:
                        break  # past EOF (only after an unsynced grow was lost): zeros
                    done += got
            pos += k
        return bytes(buf)

    def _entry_for_write(self, vext: int) -> Entry:
        ent = self._map.get(vext)
        if ent is None:
            ds = self._ds
            ds._need_io()
            with ds._lock:
                ent = self._map.get(vext)
                if ent is None:
                    ent = self._map[vext] = ds._allocate(self.info.id, vext)
        return ent

    def _pwrite_slow(self, offset: int, data: bytes | memoryview) -> None:
        mv = memoryview(data)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        n = mv.nbytes
        if offset < 0 or offset + n > self._wsize:
            self._refuse(offset, n, True)
        es = self._es
        pos = 0
        while pos < n:
            i, off = divmod(offset + pos, es)
            k = min(es - off, n - pos, WRITE_PIECE)
            vol, fd, base = self._entry_for_write(i)
            done = 0
            while done < k:
                done += os.pwrite(fd, mv[pos + done : pos + k], base + off + done)
            self._vdirty[vol] = True
            pos += k

    # ---- the shadow transport's real half (nicsplit.host.shadowio) ----------
    def pieces_for_write(self, offset: int, data: bytes | memoryview) -> list[tuple[int, int, memoryview]]:
        """Translate a write without doing it: (volume, physical offset,
        bytes) per extent it touches, allocating (and logging) extents as
        `pwrite` would. The caller writes them (`write_piece`, or the card)
        and then calls `written(volume)` for each."""
        mv = memoryview(data).cast("B")
        n = mv.nbytes
        if offset < 0 or offset + n > self._wsize:
            self._refuse(offset, n, True)
        es, out = self._es, []
        pos = 0
        while pos < n:
            i, off = divmod(offset + pos, es)
            k = min(es - off, n - pos)
            vol, _fd, base = self._entry_for_write(i)
            out.append((vol, base + off, mv[pos: pos + k]))
            pos += k
        return out

    def write_piece(self, vol: int, physical: int, piece: memoryview) -> None:
        """Write one piece of `pieces_for_write` here (the card is gone)."""
        fd = self._ds._fds[vol]
        done = 0
        while done < len(piece):
            done += os.pwrite(fd, piece[done:], physical + done)
        self._vdirty[vol] = True

    def written(self, vol: int) -> None:
        """A piece of volume ``vol`` was written (by the card): the next sync covers it."""
        self._vdirty[vol] = True

    def trim(self, offset: int, length: int) -> None:
        """Release whole extents; punch partial ranges. Trimmed bytes read zeros."""
        self._discard(offset, length, False)

    def zero(self, offset: int, length: int, *, no_hole: bool = False) -> None:
        """Make the range read zeros; no_hole=True keeps (or allocates) its space."""
        self._discard(offset, length, no_hole)

    def _discard(self, offset: int, length: int, keep: bool) -> None:
        if offset < 0 or length < 0 or offset + length > self._wsize:
            self._refuse(offset, length, True)
        es, m = self._es, self._map
        end = offset + length
        whole: list[int] = []
        pos = offset
        while pos < end:
            i, off = divmod(pos, es)
            k = min(es - off, end - pos)
            ent = m.get(i)
            if keep:
                vol, fd, base = ent if ent is not None else self._entry_for_write(i)
                zero_keep_allocated(fd, base + off, k)
                self._vmeta[vol] = True
            elif ent is not None:
                # An extent is "whole" if the range covers all of it that lies inside the vdisk.
                if off == 0 and (k == es or pos + k == self.size):
                    whole.append(i)
                else:
                    vol, fd, base = ent
                    punch_hole(fd, base + off, k)
                    self._vmeta[vol] = True
            pos += k
        if whole:
            ds = self._ds
            ds._need_io()
            with ds._lock:
                ds._release(self.info.id, m, whole)

    # ---- queries ---------------------------------------------------------

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """(length, flags) runs covering the range: 0 = data, 3 = hole|zero."""
        if offset < 0 or length < 0 or offset + length > self.size:
            self._refuse(offset, length, False)
        es, m = self._es, self._map
        out: list[tuple[int, int]] = []
        pos, end = offset, offset + length
        while pos < end:
            i = pos // es
            k = min((i + 1) * es, end) - pos
            t = EXTENT_DATA if i in m else EXTENT_HOLE_ZERO
            if out and out[-1][1] == t:
                out[-1] = (out[-1][0] + k, t)
            else:
                out.append((k, t))
            pos += k
        return out

    def physical(self, offset: int) -> tuple[int, int] | None:
        """(volume index, physical byte offset) backing `offset`, or None if unallocated."""
        if offset < 0 or offset >= self.size:
            self._refuse(offset, 1, False)
        i, off = divmod(offset, self._es)
        ent = self._map.get(i)
        return None if ent is None else (ent[0], ent[2] + off)
