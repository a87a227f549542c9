"""The host's activity log (DRBD's model): after a host crash, only the
regions with writes in flight are resynced, not whole vdisks.

Why
===
A write leaves the host in two directions: to the card (split) and to the
datastore. A crash of the host — with its card (the machine) or a card that
loses what it held — can leave production and the journal apart in regions
whose writes were in flight, with nothing on disk naming them. The activity
log names them: a region is *hot* in the log before a write to it is sent
anywhere, and at the next start after an unclean stop every hot region is
marked in its vdisk's dirty bitmap, so the existing resync copies production
over the journal and the replica equals production again
(docs/operations.md, "Host crash and the activity log").

Theory of operation
===================
- Extents of ``1 << shift`` bytes (4 MiB, as DRBD's AL extents: 64 of the
  dirty bitmap's 64 KiB regions) keyed by (vdisk id, extent index); vdisk
  ids are never reused, so a deleted vdisk's entries match nothing.
- `enter` pins the extents a write touches and says whether they are all hot
  already (the common case: a dict lookup and an LRU touch, no IO); if not,
  the caller awaits `activate`, which returns once a record naming them is
  written and fdatasync'd. Activations that arrive while a commit runs share
  the next one (group commit: one fdatasync for many).
- `leave` unpins when the write is done on the host (outcome posted or its
  region marked). Extents cool lazily: they stay hot until more than
  ``extents`` are needed, and then the least recently used *unpinned* ones
  are dropped in the same record that adds the new ones. So steady writes to
  a working set of fewer than ``extents`` extents cost no IO at all. When
  every hot extent is pinned the log grows past ``extents`` (counted as
  ``over``) rather than hold a write up.
- The file is an append log of records (format in docs/formats.md,
  "Activity log"): a CHECKPOINT (the full set) first, then UPDATE records
  (removed + added extents), each with its sequence number and a CRC. A torn
  or garbage tail ends the log at the last good record. When it grows past
  ``max_bytes`` it is rewritten as one CHECKPOINT (write, fsync, rename,
  fsync the directory).
- A clean stop (every write done) rewrites it as one CLEAN record: nothing
  to resync. A start finding anything else recovers the hot set (`recovered`)
  for the host to mark, then `begin` rewrites it as an empty CHECKPOINT.

Errors: `ActivityLogError` when the file cannot be written; the splitter
then marks the write's region instead (the region is resynced either way).

Example::

    al = ActivityLog(path, extents=1237)
    for vdisk_id, offset, length in al.recovered.ranges(): ...mark...
    al.begin()
    if not al.enter(vid, off, n):
        await al.activate(vid, off, n)
    ...  # the write
    al.leave(vid, off, n)
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from nicsplit.core.fsutil import atomic_write
from nicsplit.core.crc32 import crc32

log = logging.getLogger(__name__)

MAGIC = b"NSAL"
VERSION = 1
CHECKPOINT, UPDATE, CLEAN = 1, 2, 3
KINDS = (CHECKPOINT, UPDATE, CLEAN)
SHIFT = 22  # 4 MiB extents
DEFAULT_EXTENTS = 1237  # DRBD's default al-extents
MAX_ENTRIES = 1 << 20  # per record: a garbage count is refused before it is read
BATCH = 1 << 16  # extents added per UPDATE at most (a 4 GiB TRIM touches 1025; many at once share records)

RECORD_HEAD = struct.Struct(
    ">"
    "4s"  # magic: b"NSAL"
    "B"  # version: 1
    "B"  # kind: 1 CHECKPOINT (the full set), 2 UPDATE (removed, then added), 3 CLEAN (empty, clean stop)
    "B"  # extent shift: an extent is 1 << shift bytes (22: 4 MiB)
    "B"  # reserved: 0
    "Q"  # seq: 1 + the previous record's (any value for the first record)
    "I"  # n_add: entries added (CHECKPOINT: the set)
    "I"  # n_del: entries removed (UPDATE only)
    "I"  # crc: zlib.crc32 of the 24 bytes before it, then of the entries
)
assert RECORD_HEAD.size == 28

ENTRY = struct.Struct(
    ">"
    "Q"  # vdisk id (never reused)
    "Q"  # extent index: the extent covers [index << shift, (index + 1) << shift)
)
assert ENTRY.size == 16

_KEY_BITS = 40  # in memory a key is vdisk_id << 40 | extent (2^40 extents of 4 MiB: more than any vdisk)
_KEY_MASK = (1 << _KEY_BITS) - 1


class ActivityLogError(Exception):
    """The activity log cannot be read or written: one clear line."""


def key(vdisk_id: int, extent: int) -> int:
    return (vdisk_id << _KEY_BITS) | extent


def split_key(k: int) -> tuple[int, int]:
    return k >> _KEY_BITS, k & _KEY_MASK


# -- codec (sans-IO) --------------------------------------------------------------------


def encode_record(kind: int, seq: int, shift: int, add: Iterable[int] = (), delete: Iterable[int] = ()) -> bytes:
    """One record; ``add``/``delete`` are keys (`key`)."""
    add, delete = list(add), list(delete)
    if kind not in KINDS or (kind != UPDATE and delete) or (kind == CLEAN and add) or len(add) + len(delete) > MAX_ENTRIES:
        raise ValueError(f"bad activity log record: kind {kind}, {len(add)} added, {len(delete)} removed")
    body = b"".join(ENTRY.pack(*split_key(k)) for k in (*delete, *add))
    head = RECORD_HEAD.pack(MAGIC, VERSION, kind, shift, 0, seq, len(add), len(delete), 0)[:24]
    return head + struct.pack(">I", crc32(body, crc32(head))) + body


@dataclass
class Recovered:
    """What `decode_log` found: the hot set of the last good record."""

    keys: set[int] = field(default_factory=set)
    clean: bool = True  # the last good record is CLEAN (or there is no log)
    seq: int = 0  # the last good record's seq
    end: int = 0  # bytes of good records (where the next one goes)
    tail: int = 0  # bytes after them ignored (torn or garbage)
    records: int = 0
    shift: int = SHIFT
    unknown: bool = False  # a log exists but no record of it is readable: nothing is known

    def ranges(self) -> list[tuple[int, int, int]]:
        """(vdisk id, offset, length) of every hot extent, sorted."""
        size = 1 << self.shift
        return [(v, e * size, size) for v, e in sorted(split_key(k) for k in self.keys)]


def decode_log(buf: bytes | memoryview) -> Recovered:
    """Replay a log: records in order from the start until the first one
    that is short, damaged (magic, version, kind, CRC) or out of sequence."""
    buf = memoryview(buf)
    r = Recovered()
    pos, seq, first = 0, 0, True
    keys: set[int] = set()
    hs, es = RECORD_HEAD.size, ENTRY.size
    while len(buf) - pos >= hs:
        magic, ver, kind, shift, res, s, na, nd, crc = RECORD_HEAD.unpack_from(buf, pos)
        if magic != MAGIC or ver != VERSION or kind not in KINDS or res or na + nd > MAX_ENTRIES:
            break
        end = pos + hs + (na + nd) * es
        if end > len(buf) or crc32(buf[pos + hs:end], crc32(buf[pos:pos + 24])) != crc:
            break
        if first:
            if kind == UPDATE:
                break
            r.shift = shift
        elif s != seq + 1 or shift != r.shift:
            break
        if (kind != UPDATE and nd) or (kind == CLEAN and na):
            break
        ents = [key(*ENTRY.unpack_from(buf, pos + hs + i * es)) for i in range(na + nd)]
        if kind == UPDATE:
            keys.difference_update(ents[:nd])
            keys.update(ents[nd:])
        else:
            keys = set(ents)
        r.clean = kind == CLEAN
        seq, pos, first = s, end, False
        r.records += 1
    r.keys, r.seq, r.end, r.tail = keys, seq, pos, len(buf) - pos
    r.unknown = first and len(buf) > 0
    if r.unknown:
        r.clean = False
    return r


# -- the log ---------------------------------------------------------------------------


class ActivityLog:
    """One host's activity log over every vdisk (module docstring). Runs on
    the event loop; records are written in the default executor."""

    def __init__(self, path: Path, *, extents: int = DEFAULT_EXTENTS, shift: int = SHIFT,
                 max_bytes: int = 256 << 10, sync: Callable[[int], None] = os.fdatasync) -> None:
        if extents < 1:
            raise ActivityLogError(f"activity log: al_extents must be >= 1 (got {extents})")
        self.path = Path(path)
        self.extents = extents
        self.shift = shift
        self.max_bytes = max(max_bytes, 4 * (RECORD_HEAD.size + extents * ENTRY.size))
        self._sync = sync  # fdatasync, or a test's fake disk
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            raw = b""
        except OSError as e:
            raise ActivityLogError(f"activity log {self.path}: {e.strerror}") from None
        self.recovered = decode_log(raw)
        if self.recovered.shift != shift and not self.recovered.unknown:
            # Recovered ranges are in the log's own extent size; new ones use ours.
            log.info("activity log %s: extents of 2^%d bytes (now 2^%d)", self.path, self.recovered.shift, shift)
        self._seq = self.recovered.seq
        self._fd = -1
        self._size = 0
        self._hot: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU first
        self._pins: dict[int, int] = {}  # key -> writes in flight to it (0: none; dropped on eviction)
        self._queue: set[int] = set()  # keys waiting for the next commit
        self._next: asyncio.Future | None = None  # done when the queued keys are hot
        self._task: asyncio.Task | None = None
        self._begun = False
        self._broken = ""
        # statistics
        self.commits = 0  # records written by activations (each one fdatasync)
        self.activated = 0  # extents made hot
        self.evicted = 0
        self.over = 0  # times the hot set grew past `extents` because every extent was pinned
        self.waits = 0  # writes that waited for an activation
        self.compactions = 0
        self.commit_ns: collections.deque[int] = collections.deque(maxlen=1024)

    # -- start and stop ---------------------------------------------------------------

    def begin(self) -> None:
        """Start a fresh log (an empty CHECKPOINT): call it once the
        recovered extents are marked durably, before the first write."""
        self._rewrite(encode_record(CHECKPOINT, self._seq + 1, self.shift))
        self._seq += 1
        self._begun = True

    def _implicit_begin(self) -> None:
        """First write without `begin` (tests that build a host by hand):
        keep what was recovered hot and pinned, never dropped unmarked."""
        keep = set(self.recovered.keys) if not self.recovered.clean else set()
        self._rewrite(encode_record(CHECKPOINT, self._seq + 1, self.shift, sorted(keep)))
        self._seq += 1
        for k in keep:
            self._hot[k] = None
            self._pins[k] = self._pins.get(k, 0) + 1
        self._begun = True

    def _rewrite(self, record: bytes) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            atomic_write(self.path, record)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as e:
            raise ActivityLogError(f"activity log {self.path}: {e.strerror}") from None
        self._size = len(record)

    async def close(self, clean: bool) -> None:
        """Stop: with ``clean`` (every write done and synced) the log
        becomes one CLEAN record, so the next start resyncs nothing."""
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            if clean and self._begun and not self._broken:
                await asyncio.get_running_loop().run_in_executor(
                    None, self._rewrite, encode_record(CLEAN, self._seq + 1, self.shift))
                self._seq += 1
                log.info("activity log %s: clean stop", self.path)
        finally:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    # -- the write path -----------------------------------------------------------------

    def enter(self, vdisk_id: int, offset: int, length: int) -> bool:
        """Pin the extents of a write; True when all of them are hot (no IO)."""
        s = self.shift
        e0 = offset >> s
        e1 = (offset + length - 1) >> s if length > 0 else e0
        pins = self._pins
        if e0 == e1:  # the common case: one extent, two dict operations and an LRU touch
            k = (vdisk_id << _KEY_BITS) | e0
            pins[k] = pins.get(k, 0) + 1
            hot = self._hot
            if k in hot:
                hot.move_to_end(k)
                return True
            return False
        hot = self._hot
        ok = True
        for e in range(e0, e1 + 1):
            k = (vdisk_id << _KEY_BITS) | e
            pins[k] = pins.get(k, 0) + 1
            if k in hot:
                hot.move_to_end(k)
            else:
                ok = False
        return ok

    def leave(self, vdisk_id: int, offset: int, length: int) -> None:
        """Unpin what `enter` pinned (the write is done on the host). A count
        of 0 stays in the table until the extent is evicted (no churn)."""
        s = self.shift
        e0 = offset >> s
        e1 = (offset + length - 1) >> s if length > 0 else e0
        pins = self._pins
        if e0 == e1:
            pins[(vdisk_id << _KEY_BITS) | e0] -= 1
            return
        for e in range(e0, e1 + 1):
            pins[(vdisk_id << _KEY_BITS) | e] -= 1

    async def activate(self, vdisk_id: int, offset: int, length: int) -> None:
        """Until every extent of the (pinned) write is hot on disk."""
        self.waits += 1
        s = self.shift
        ks = [(vdisk_id << _KEY_BITS) | e for e in range(offset >> s, ((offset + max(length, 1) - 1) >> s) + 1)]
        while True:
            if self._broken:
                raise ActivityLogError(self._broken)
            missing = [k for k in ks if k not in self._hot]
            if not missing:
                return
            self._queue.update(missing)
            loop = asyncio.get_running_loop()
            if self._next is None:
                self._next = loop.create_future()
            fut = self._next
            if self._task is None or self._task.done():
                self._task = loop.create_task(self._commit_loop())
            await asyncio.shield(fut)

    async def _commit_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            adds = [k for k in self._queue if k not in self._hot]
            self._queue = set(adds[BATCH:])  # the rest goes in the next record (`activate` waits for it)
            adds = adds[:BATCH]
            fut, self._next = self._next, None
            try:
                if adds:
                    if not self._begun:
                        self._implicit_begin()
                    dels = self._victims(len(adds))
                    for k in dels:
                        del self._hot[k]
                        self._pins.pop(k, None)
                    self._seq += 1
                    rec = encode_record(UPDATE, self._seq, self.shift, adds, dels)
                    ckpt = None
                    if self._size + len(rec) > self.max_bytes:
                        self._seq += 1
                        ckpt = encode_record(CHECKPOINT, self._seq, self.shift, [*self._hot, *adds])
                    t0 = time.perf_counter_ns()
                    await loop.run_in_executor(None, self._write, rec, ckpt)
                    self.commit_ns.append(time.perf_counter_ns() - t0)
                    self.commits += 1
                    self.activated += len(adds)
                    self.evicted += len(dels)
                    for k in adds:
                        self._hot[k] = None
            except Exception as e:  # ENOSPC, EIO, a record too large: never leave a write waiting
                self._broken = f"activity log {self.path}: {getattr(e, 'strerror', None) or e}"
                log.error("%s: writes to cold extents are marked for resync instead", self._broken)
            finally:
                if fut is not None and not fut.done():
                    fut.set_result(None)

    def _victims(self, adding: int) -> list[int]:
        """LRU unpinned extents to drop so the set stays within `extents`."""
        need = len(self._hot) + adding - self.extents
        if need <= 0:
            return []
        pins = self._pins
        out = []
        for k in self._hot:
            if not pins.get(k):
                out.append(k)
                if len(out) == need:
                    break
        if len(out) < need:
            self.over += 1
        return out

    def _write(self, rec: bytes, ckpt: bytes | None) -> None:
        """In the executor: append and fdatasync the record, or rewrite the
        file as one checkpoint when it grew past ``max_bytes``."""
        if ckpt is not None:
            self._rewrite(ckpt)
            self.compactions += 1
            return
        view = memoryview(rec)
        pos = self._size
        while view:
            n = os.pwrite(self._fd, view, pos)
            view, pos = view[n:], pos + n
        self._sync(self._fd)
        self._size = pos

    # -- status -------------------------------------------------------------------------

    @property
    def hot(self) -> int:
        return len(self._hot)

    def is_hot(self, vdisk_id: int, offset: int) -> bool:
        return key(vdisk_id, offset >> self.shift) in self._hot

    def statistics(self) -> dict:
        ns = sorted(self.commit_ns)
        return {
            "path": str(self.path), "extents": self.extents, "extent_bytes": 1 << self.shift,
            "hot": len(self._hot), "pinned": sum(1 for n in self._pins.values() if n > 0), "commits": self.commits,
            "activated": self.activated, "evicted": self.evicted, "over": self.over, "waits": self.waits,
            "compactions": self.compactions, "bytes": self._size, "broken": self._broken,
            "commit_p50_us": ns[len(ns) // 2] / 1000 if ns else 0.0,
            "commit_max_us": ns[-1] / 1000 if ns else 0.0,
        }
