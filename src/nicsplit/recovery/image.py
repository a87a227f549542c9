"""Image access: every vdisk of a CG at one point in time, served over NBD.

An *image* is one CG at one PIT: one NBD export per vdisk of the CG (export
name = vdisk name), served by the host's own NBD codec and session loop
(`nicsplit.wire.nbd`, `nicsplit.host.session.NBDSession`), each export backed
by a filter chain (`nicsplit.host.chain.build_chain`) whose bottom is
`PitPlugin`, the vdisk's image at the PIT read from the journal by
`nicsplit.recovery.replica.PitReader`.

Theory of operation
===================
* **Read-only** (default): ``ExportInfo.readonly`` is set, so the codec
  answers every write-like command with EPERM before it reaches the chain;
  `PitPlugin` refuses writes too (EROFS), in case a layer above forgets.
* **Writable** (``writable=True``): one `OverlayFilter` above the plugin per
  vdisk keeps every write in a throw-away overlay — a sparse temporary file
  of the vdisk's size, unlinked as soon as it is opened (a killed server
  leaks no space), plus a map with one byte per 4 KiB block:

  ====  ========================================================
  0     not in the overlay: read from below (the PIT)
  1     overlay data: read from the overlay file
  2     zeroed or trimmed in the overlay (a hole punched in the file)
  ====  ========================================================

  One byte (not one bit) per block: a 1 GiB vdisk costs 256 KiB, runs of
  equal states are found by a compiled regex at C speed, and block status
  tells overlay data from overlay zeros without a SEEK_HOLE walk.  A write
  that covers a block only partly first copies the block from below into the
  overlay (read-modify-write, under the overlay's lock), so afterwards a
  block is read from exactly one place.  Flush and FUA are no-ops: nothing
  in the overlay outlives the image.
* **Fixed PIT**: the reader is opened at the PIT's seq; its block index
  answers "newest record <= seq" per block, so records the card journals
  after the export never show in the image, however long it is open.
  Nothing here writes a journal file or a production vdisk
  (docs/recovery.md §5 rule 1).
* **Ready time**: building the block index is one read-only scan of record
  heads (docs/recovery.md §3; ~0.3 s per 64 Ki records); opening the
  reader at any PIT is one bisect.  `ImageServer` takes a prebuilt index so a
  long-lived process can keep one and serve images at once.

Reads run inline (page-cache reads of the segments, decoded through the
reader's LRU) unless they are at least `EXECUTOR_READ` bytes, which go to the
default executor so one large read does not stall the other sessions.

Example::

    idx = BlockIndex(journal_dir)
    srv = ImageServer(journal_dir, vdisks_of_cg, pit.seq, index=idx, writable=True,
                      overlay_dir=Path("/tmp/img1"))
    host, port = await srv.start("127.0.0.1", 0)
    ...                                     # nbd://host:port/<vdisk name>
    await srv.stop()                        # overlays are gone
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from nicsplit.core.dirtymap import DirtyMap
from nicsplit.core.fsutil import punch_hole, pwrite_all
from nicsplit.core.layout import migrate_name_keyed, vdisk_file
from nicsplit.storage import atrest
from nicsplit.journal.writer import JournalError
from nicsplit.recovery.pits import PitError
from nicsplit.recovery.blockindex import BlockIndex, shared_index
from nicsplit.recovery.reader import PitReader, VdiskLike
from nicsplit.storage.image import open_image
from nicsplit.storage.rekey import REKEY_SUFFIX
from nicsplit.storage.sealing import TAGS_SUFFIX, SealedError
from nicsplit.host.chain import Chain, ChainError, Filter, VdiskView, build_chain
from nicsplit.host.plugin import GroupSync
from nicsplit.host.nbdpolicy import NO_TLS, ByteBudget, NbdLimits, NbdTls, PolicyError, RateLimitedLog, is_loopback, resolve_tls
from nicsplit.host.session import NBDSession, close_exports
from nicsplit.host.io import EXTENT_DATA, EXTENT_HOLE_ZERO, EXTENT_ZERO, FUA, REQ_ONE, IOFailure
from nicsplit.wire import nbd
from nicsplit.core.records import BLOCK_SIZE

log = logging.getLogger("nicsplit.recovery.image")

__all__ = ["PitPlugin", "OverlayFilter", "OverlayStatistics", "ImageServer", "EXECUTOR_READ",
           "ReplicaPlugin", "ReplicaServer"]

BS = BLOCK_SIZE

# Reads of at least 1 MiB go to a worker thread: at the reader's ~400 MiB/s a
# 1 MiB read holds the loop ~2.5 ms, the most one session should cost the
# others; smaller reads cost less than the thread hand-off (~50 µs).
EXECUTOR_READ = 1 << 20

_KIND = {"data": EXTENT_DATA, "zero": EXTENT_ZERO, "hole": EXTENT_HOLE_ZERO}

# Overlay block states (the module docstring's table).
_BELOW, _DATA, _ZERO = 0, 1, 2
_RUNS = re.compile(rb"\x00+|\x01+|\x02+")
_OWNED_RUNS = re.compile(rb"\x00+|[\x01\x02]+")



# -- the plugin: a vdisk at a PIT -----------------------------------------------------------


class PitPlugin:
    """Bottom of an image chain: one vdisk of a `PitReader` (read-only)."""

    def __init__(self, reader: PitReader, vdisk: VdiskLike) -> None:
        self.reader = reader
        self.vdisk_id = vdisk.id
        self.name = vdisk.name
        self.size = vdisk.size

    def _read(self, offset: int, length: int) -> bytes:
        try:
            return self.reader.pread(self.vdisk_id, offset, length)
        except (PitError, JournalError) as e:  # a damaged record (JournalCorrupt names segment and offset)
            raise IOFailure(errno.EIO, f"image of {self.name} at seq {self.reader.upto_seq}: {e}") from None

    async def pread(self, offset: int, length: int, flags: int) -> bytes:
        if length >= EXECUTOR_READ:
            return await asyncio.get_running_loop().run_in_executor(None, self._read, offset, length)
        return self._read(offset, length)

    def _refuse(self) -> IOFailure:
        return IOFailure(errno.EROFS, f"{self.name} at seq {self.reader.upto_seq} is a read-only point in time")

    async def pwrite(self, offset: int, data: bytes, flags: int) -> None:
        raise self._refuse()

    async def zero(self, offset: int, length: int, flags: int) -> None:
        raise self._refuse()

    async def trim(self, offset: int, length: int, flags: int) -> None:
        raise self._refuse()

    async def flush(self, flags: int) -> None:
        return None  # nothing to persist: the journal is already durable

    async def extents(self, offset: int, length: int, flags: int) -> list[tuple[int, int]]:
        """base:allocation: data → 0, zeroed/trimmed → ZERO, never written → HOLE|ZERO."""
        try:
            ext = self.reader.extents(self.vdisk_id, offset, length)
        except PitError as e:
            raise IOFailure(errno.EIO, str(e)) from None
        out = [(e.length, _KIND[e.kind]) for e in ext]
        return out[:1] if flags & REQ_ONE else out


# -- the overlay filter --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OverlayStatistics:
    data_blocks: int  # blocks whose bytes live in the overlay file
    zero_blocks: int  # blocks zeroed or trimmed in the overlay
    writes: int
    write_bytes: int
    zeroes: int  # zero + trim requests
    fills: int  # partial blocks copied up from the PIT before a write (read-modify-write)


class OverlayFilter(Filter):
    """A throw-away copy-on-write overlay over a read-only image (module
    docstring).  Option ``dir``: where its sparse file is created (and at
    once unlinked).  It keeps every write, so it declares every write verb
    (chain rule 1)."""

    name = "overlay"
    observes_data = True
    handles_fua = True
    options = ("dir",)

    def __init__(self, vdisk: VdiskView, options: dict[str, Any]) -> None:
        super().__init__(vdisk, options)
        if "dir" not in options:
            raise ChainError("filter 'overlay': option 'dir' is required")
        d = Path(options["dir"])
        path = vdisk_file(d, vdisk.id, ".overlay")
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.unlink(path)  # throw-away: the space is freed when the fd closes, even after a crash
        os.ftruncate(self._fd, vdisk.size)
        self.size = vdisk.size
        self._map = bytearray(-(-vdisk.size // BS))
        self._lock = asyncio.Lock()  # serialises overlay mutations (read-modify-write of partial blocks)
        self._writes = self._write_bytes = self._zeroes = self._fills = 0

    # -- helpers -------------------------------------------------------------------
    def _block_end(self, b: int) -> int:
        return min((b + 1) * BS, self.size)

    async def _own_partial(self, nxt: Any, offset: int, end: int) -> None:
        """Copy up the (at most two) edge blocks of [offset, end) that the
        range covers only partly and that are not in the overlay yet."""
        for b in {offset // BS, (end - 1) // BS}:
            lo, hi = b * BS, self._block_end(b)
            if self._map[b] == _BELOW and (offset > lo or end < hi):
                data = await nxt.pread(lo, hi - lo, 0)
                os.pwrite(self._fd, data, lo)
                self._map[b] = _DATA
                self._fills += 1

    # -- verbs ---------------------------------------------------------------------
    async def pread(self, nxt: Any, offset: int, length: int, flags: int) -> bytes:
        if length == 0:
            return b""
        b0, b1 = offset // BS, (offset + length - 1) // BS + 1
        m = self._map[b0:b1]
        zeros = m.count(0)
        if zeros == len(m):
            return await nxt.pread(offset, length, flags)
        if zeros == 0:
            return os.pread(self._fd, length, offset)
        out = bytearray()
        end = offset + length
        for r in _OWNED_RUNS.finditer(m):
            s = max(offset, (b0 + r.start()) * BS)
            e = min(end, (b0 + r.end()) * BS)
            if m[r.start()] == _BELOW:
                out += await nxt.pread(s, e - s, 0)
            else:
                out += os.pread(self._fd, e - s, s)
        return bytes(out)

    async def pwrite(self, nxt: Any, offset: int, data: bytes, flags: int) -> None:
        n = len(data)
        if n == 0:
            return
        end = offset + n
        async with self._lock:
            await self._own_partial(nxt, offset, end)
            pwrite_all(self._fd, data, offset)
            b0, b1 = offset // BS, (end - 1) // BS + 1
            self._map[b0:b1] = b"\x01" * (b1 - b0)
        self._writes += 1
        self._write_bytes += n

    async def zero(self, nxt: Any, offset: int, length: int, flags: int) -> None:
        if length == 0:
            return
        end = offset + length
        async with self._lock:
            await self._own_partial(nxt, offset, end)
            # Whole blocks inside the range become overlay zeros (a punched hole);
            # the partial edges (now owned) get zeros written into them.
            f0 = -(-offset // BS)
            f1 = end // BS if end < self.size else len(self._map)
            punch_hole(self._fd, offset, length)
            if f0 < f1:
                self._map[f0:f1] = b"\x02" * (f1 - f0)
        self._zeroes += 1

    async def trim(self, nxt: Any, offset: int, length: int, flags: int) -> None:
        await self.zero(nxt, offset, length, 0)  # trimmed blocks read as zeros: deterministic

    async def flush(self, nxt: Any, flags: int) -> None:
        return None  # the overlay is thrown away: nothing to make durable

    async def extents(self, nxt: Any, offset: int, length: int, flags: int) -> list[tuple[int, int]]:
        end = offset + length
        b0, b1 = offset // BS, (end - 1) // BS + 1
        m = self._map[b0:b1]
        if m.count(0) == len(m):
            return await nxt.extents(offset, length, flags)
        out: list[tuple[int, int]] = []

        def add(n: int, t: int) -> None:
            if out and out[-1][1] == t:
                out[-1] = (out[-1][0] + n, t)
            else:
                out.append((n, t))

        for r in _RUNS.finditer(m):
            s = max(offset, (b0 + r.start()) * BS)
            e = min(end, (b0 + r.end()) * BS)
            st = m[r.start()]
            if st == _BELOW:
                for n, t in await nxt.extents(s, e - s, 0):
                    add(n, t)
            else:
                add(e - s, EXTENT_DATA if st == _DATA else EXTENT_HOLE_ZERO)
            if flags & REQ_ONE:
                break
        return out[:1] if flags & REQ_ONE else out

    def statistics(self) -> OverlayStatistics:
        return OverlayStatistics(self._map.count(_DATA), self._map.count(_ZERO), self._writes, self._write_bytes,
                                 self._zeroes, self._fills)

    async def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# -- the servers ------------------------------------------------------------------------------


class _Exports:
    """One NBD export per vdisk, each over its own chain, on one address.
    Duck-types what `NBDSession` needs of a host: ``exports`` (an
    `nbd.ExportProvider`), ``chain(name).top``, ``max_inflight``,
    ``sessions``, ``limits`` (`NbdLimits`, the defaults), ``refusals`` and ``budget``.  Subclasses fill ``_chains`` and say what `_info` describes."""

    writable = False
    id = ""
    cg = ""
    seq = 0

    def __init__(self, vdisks: Iterable[VdiskLike], max_inflight: int) -> None:
        self.vdisks = {v.name: v for v in vdisks}
        self.max_inflight = max_inflight
        self.limits = NbdLimits()
        self.refusals = RateLimitedLog()
        self.budget = ByteBudget(self.limits.server_bytes)
        self.pki_dir: Path | None = None   # certificates for NBD over TLS (see start)
        self.tls: NbdTls = NO_TLS
        self.sessions: set[Any] = set()
        self.exports = self
        self._chains: dict[str, Chain] = {}
        self._servers: list[asyncio.AbstractServer] = []

    def _view(self, v: VdiskLike, readonly: bool) -> VdiskView:
        return VdiskView(name=v.name, id=v.id, uuid=getattr(v, "uuid", ""), size=v.size,
                         owner=getattr(v, "owner", None), readonly=readonly,
                         extra=dict(getattr(v, "extra", {}) or {}))

    # -- ExportProvider (the codec's view) --------------------------------------------
    def _describe(self, v: VdiskLike) -> str:
        raise NotImplementedError

    def _info(self, v: VdiskLike) -> nbd.ExportInfo:
        return nbd.ExportInfo(name=v.name, size=v.size, readonly=not self.writable, description=self._describe(v))

    def lookup(self, name: str) -> nbd.ExportInfo | None:
        v = self.vdisks.get(name)
        if v is None and name == "" and len(self.vdisks) == 1:
            v = next(iter(self.vdisks.values()))  # the default export of a one-vdisk CG
        return None if v is None else self._info(v)

    def list_exports(self) -> list[nbd.ExportInfo]:
        return [self._info(v) for v in self.vdisks.values()]

    def chain(self, name: str) -> Chain:
        if name == "" and len(self.vdisks) == 1:
            name = next(iter(self.vdisks))
        return self._chains[name]

    # -- lifecycle --------------------------------------------------------------------
    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on host:port. TLS as the host's ``auto``: required beyond
        loopback, offered on loopback, with the certificates of ``pki_dir``
        (set by the caller; without it only loopback is allowed)."""
        if self.pki_dir is not None:
            self.tls = resolve_tls("auto", host, self.pki_dir)
        elif not is_loopback(host):
            raise PolicyError(f"{self._what()} on {host}: TLS is required beyond loopback and no PKI is set")
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(lambda: NBDSession(self, self.tls), host, port, reuse_address=True)
        self._servers.append(srv)
        h, p = srv.sockets[0].getsockname()[:2]
        log.info("%s: %s at seq %d (%s) on %s:%d, TLS %s", self._what(), self.cg, self.seq,
                 "writable" if self.writable else "read-only", h, p, self.tls.mode)
        return h, p

    def _what(self) -> str:
        return f"image {self.id}"

    def urls(self, host: str, port: int) -> dict[str, str]:
        h = f"[{host}]" if ":" in host else host
        scheme = "nbds" if self.tls.mode == nbd.TLS_REQUIRE else "nbd"
        return {name: f"{scheme}://{h}:{port}/{name}" for name in self.vdisks}

    async def stop(self) -> None:
        await close_exports(self._servers, self.sessions, self._chains.values())
        self._chains.clear()
        self._close_sync()

    def _close_sync(self) -> None:
        """Close what the exports hold (also when construction failed halfway)."""


class ImageServer(_Exports):
    """The NBD exports of one image (a CG at a PIT, from the journal)."""

    def __init__(self, journal_dir: str | Path, vdisks: Iterable[VdiskLike], seq: int, *,
                 writable: bool = False, overlay_dir: str | Path | None = None, index: BlockIndex | None = None,
                 image_id: str = "", cg: str = "", validate: bool = False, max_inflight: int = 128) -> None:
        super().__init__(vdisks, max_inflight)
        self.journal_dir = Path(journal_dir)
        if not self.vdisks:
            raise PitError(f"image {image_id or '?'}: no vdisks to export")
        self.seq = seq
        self.writable = writable
        self.id = image_id
        self.cg = cg
        self.index = index if index is not None else shared_index(self.journal_dir)
        self.reader = PitReader(self.journal_dir, self.vdisks.values(), seq, index=self.index)
        self.overlay_dir: Path | None = None
        self._own_overlay_dir = False
        if writable:
            if overlay_dir is None:
                raise PitError("a writable image needs an overlay directory")
            self.overlay_dir = Path(overlay_dir)
            self._own_overlay_dir = not self.overlay_dir.exists()
            self.overlay_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            for v in self.vdisks.values():
                view = self._view(v, not writable)
                specs = [{"name": "overlay", "dir": str(self.overlay_dir)}] if writable else []
                self._chains[v.name] = build_chain(view, specs, PitPlugin(self.reader, v), validate=validate,
                                                   resolve=_resolve_filter)
        except BaseException:
            self._close_sync()
            raise

    def _describe(self, v: VdiskLike) -> str:
        mode = "writable overlay" if self.writable else "read-only"
        return f"nicsplit image {self.id} of {self.cg}: {v.name} at seq {self.seq} ({mode})"

    def _close_sync(self) -> None:
        for ch in self._chains.values():  # only when start failed halfway: close fds without a loop
            for f in ch.filters:
                if isinstance(f, OverlayFilter) and f._fd >= 0:
                    os.close(f._fd)
                    f._fd = -1
        self.reader.close()
        if self._own_overlay_dir and self.overlay_dir is not None:
            shutil.rmtree(self.overlay_dir, ignore_errors=True)

    def statistics(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sessions": len(self.sessions), "vdisks": {}}
        for name, ch in self._chains.items():
            f = ch.filter("overlay")
            if f is not None:
                out["vdisks"][name] = f.statistics()
        return out


# -- replicas served writable (failover) --------------------------------------------------------

# The regions written at the failover site: `nicsplit.core.dirtymap.DirtyMap`,
# 64 KiB regions like the host's marking bitmap (failback reads both).


def _data_to_extents(data: list[tuple[int, int]], offset: int, length: int) -> list[tuple[int, int]]:
    """NBD base:allocation extents of [offset, offset+length) from its sorted data ranges."""
    out: list[tuple[int, int]] = []
    pos = offset
    for d, n in data:
        if d > pos:
            out.append((d - pos, EXTENT_HOLE_ZERO))
        out.append((n, EXTENT_DATA))
        pos = d + n
    if pos < offset + length:
        out.append((offset + length - pos, EXTENT_HOLE_ZERO))
    return out


class ReplicaPlugin:
    """Bottom of a failover chain: a replica image (`sealed.Image`: sealed
    at rest, or raw), served writable.  Every write, zero and trim first
    marks its regions in the `DirtyMap` (durably; concurrent markers share
    one fdatasync), then changes the image; flush and FUA fsync the image
    (shared likewise)."""

    def __init__(self, image: str | Path, vdisk: VdiskLike, dirty: DirtyMap, keyring: Any = None) -> None:
        self.name = vdisk.name
        self.size = vdisk.size
        self.path = Path(image)
        self.dirty = dirty
        self._img = open_image(self.path, vdisk.size, keyring, writable=True)
        self._dirty_sync = GroupSync(dirty.sync)
        self._image_sync = GroupSync(self._img.fsync)
        self.writes = self.write_bytes = self.zeroes = self.flushes = 0

    def _err(self, e: OSError, what: str) -> IOFailure:
        return IOFailure(e.errno or errno.EIO, f"replica {self.name} {what}: {e.strerror or e}")

    async def _mark(self, offset: int, length: int) -> None:
        span = self.dirty.mark(offset, length)
        try:
            if span is not None:
                self.dirty.write(span)
            # Also when our bits were set by a request still waiting for its
            # sync: this write must not reach the image before them.
            if self.dirty.unsynced:
                await self._dirty_sync.sync()
        except OSError as e:
            raise self._err(e, "dirty map") from None

    def _sealed_err(self, e: Exception, what: str) -> IOFailure:
        log.error("replica %s %s: %s", self.name, what, e)
        return IOFailure(errno.EIO, f"replica {self.name} {what}: {e}")

    async def pread(self, offset: int, length: int, flags: int) -> bytes:
        try:
            if length >= EXECUTOR_READ:
                return await asyncio.get_running_loop().run_in_executor(None, self._img.pread, offset, length)
            return self._img.pread(offset, length)
        except OSError as e:
            raise self._err(e, "read") from None
        except SealedError as e:  # a block that fails authentication: EIO, never other bytes
            raise self._sealed_err(e, "read") from None

    async def pwrite(self, offset: int, data: bytes, flags: int) -> None:
        await self._mark(offset, len(data))
        try:
            self._img.pwrite(data, offset)
        except OSError as e:
            raise self._err(e, "write") from None
        except SealedError as e:  # read-modify-write of a partial block that fails authentication
            raise self._sealed_err(e, "write") from None
        self.writes += 1
        self.write_bytes += len(data)
        if flags & FUA:
            await self.flush(0)

    async def zero(self, offset: int, length: int, flags: int) -> None:
        await self._mark(offset, length)
        try:
            self._img.zero(offset, length)
        except OSError as e:
            raise self._err(e, "zero") from None
        except SealedError as e:
            raise self._sealed_err(e, "zero") from None
        self.zeroes += 1
        if flags & FUA:
            await self.flush(0)

    async def trim(self, offset: int, length: int, flags: int) -> None:
        await self.zero(offset, length, flags)  # trimmed ranges read as zeros: deterministic for failback

    async def flush(self, flags: int) -> None:
        try:
            await self._image_sync.sync()
        except OSError as e:
            raise self._err(e, "flush") from None
        self.flushes += 1

    async def extents(self, offset: int, length: int, flags: int) -> list[tuple[int, int]]:
        try:
            ext = _data_to_extents(self._img.extents(offset, length), offset, length)
        except OSError as e:
            raise self._err(e, "block status") from None
        return ext[:1] if flags & REQ_ONE else ext

    def close(self) -> None:
        if self._img is not None:
            self._img.fsync()
            self._img.close()
            self._img = None  # type: ignore[assignment]
        self.dirty.close()


class ReplicaServer(_Exports):
    """The writable NBD exports of a failed-over CG: each vdisk's replica
    image (brought to the failover PIT beforehand) served directly, writes
    tracked in a `DirtyMap` per vdisk under ``dirty_dir``."""

    writable = True

    def __init__(self, replica: str | Path, vdisks: Iterable[VdiskLike], seq: int, *, dirty_dir: str | Path,
                 cg: str = "", validate: bool = False, max_inflight: int = 128) -> None:
        super().__init__(vdisks, max_inflight)
        if not self.vdisks:
            raise PitError(f"failover of {cg or '?'}: no vdisks to serve")
        self.seq, self.cg, self.id = seq, cg, f"failover-{cg}"
        self.replica = Path(replica)
        self.dirty_dir = Path(dirty_dir)
        self.plugins: dict[str, ReplicaPlugin] = {}
        try:
            # a failover begun before per-vdisk files were keyed by id: rename its files (layout.py);
            # its vdisks come from the catalog at failover time, so their names are unique
            migrate_name_keyed(self.replica, self.vdisks.values(), ".img", (TAGS_SUFFIX, REKEY_SUFFIX))
            migrate_name_keyed(self.dirty_dir, self.vdisks.values(), ".dirty")
            for v in self.vdisks.values():
                img = vdisk_file(self.replica, v.id, ".img")
                if not img.exists():
                    raise PitError(f"failover of {cg}: no replica image {img}")
                dirty = DirtyMap(vdisk_file(self.dirty_dir, v.id, ".dirty"), v.size)
                p = self.plugins[v.name] = ReplicaPlugin(img, v, dirty,
                                                         atrest.keyring_for_images(self.replica))
                self._chains[v.name] = build_chain(self._view(v, False), [], p, validate=validate,
                                                   resolve=_resolve_filter)
        except BaseException:
            self._close_sync()
            raise

    def _describe(self, v: VdiskLike) -> str:
        return f"nicsplit failover of {self.cg}: {v.name} (replica from seq {self.seq}, writable)"

    def _what(self) -> str:
        return "failover"

    def _close_sync(self) -> None:
        for p in self.plugins.values():
            p.close()
        self.plugins.clear()

    def statistics(self) -> dict[str, Any]:
        return {"sessions": len(self.sessions),
                "vdisks": {n: {"writes": p.writes, "write_bytes": p.write_bytes, "zeroes": p.zeroes,
                               "flushes": p.flushes, "dirty_regions": p.dirty.count()}
                           for n, p in self.plugins.items()}}


def _resolve_filter(name: str) -> type[Filter]:
    if name == OverlayFilter.name:
        return OverlayFilter
    raise ChainError(f"an image chain has no filter {name!r}")
