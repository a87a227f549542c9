"""The card's overflow log: an ordered, append-only file on the card's own
storage that absorbs the ring when the pipeline or the link falls behind.

Theory of operation
===================
The card acks a write the moment it polls it; the write's payload then sits
in the ring's data area until the appliance holds it durably. When the
appliance stalls, that area (and hold's bound) fills up and the card used to
refuse writes (the host marks: protection gone). Instead, while the card is
*behind* (`Overflow.behind`: the pipeline has no room for what was polled, or
the ring's data area is more than ``overflow_ring_fill`` full) or while the
log holds unread entries, every polled entry — writes with their payload and
outcomes — is appended to the log **in ring order** (`Overflow.divert`).
Once an append is durable (group fsync, off the loop thread) the writes'
ring payloads are released (`Overflow.synced`): the host stops tracking a
write only when it is safe on the card's storage.

The pipeline is fed from the log's head whenever hold has room
(`Overflow.feed`); writes fed from the log carry bytes read from the file and
their release (durable ack, or dropped) never touches the ring
(`Overflow.release`). When the log has no unread entry, direct feeding
resumes; once every write fed from it is released too, the file is cut back
to its header (`OverflowLog.reset`). Only when the log is full (or failed)
does the card refuse writes as before (`Overflow.full`).

Outcomes: hold keeps a write until its outcome arrives, and an outcome must
never reach the pipeline before its write. An outcome is logged in order,
but when its write already waits in hold it is also handed over at once (it
would otherwise wait behind writes that cannot be fed while hold is full,
and the write would time out); when a write is fed from the log and its
outcome is already logged, the outcome follows it at once. The log's copy of
such an outcome is skipped when the reader reaches it.

Restart: the log is opened (a torn tail — short or bad-CRC record — is cut)
and every entry in it is unread: the card feeds it to the pipeline before any
entry polled after the start. What was acked and logged is never lost; what
the appliance already held is acknowledged again as a duplicate (the journal
skips seqs it holds).

Record format (little endian, `REC`, 72 bytes, then ``data_len`` payload
bytes)::

    u16 magic 0x564F ("OV")  u8 kind (1 write, 2 outcome)  u8 op | status
    u16 wflags  u8 has_data  u8 pad
    u32 length  u32 data_len
    u64 io_id  u64 cg_id  u64 cg_seq  u64 vdisk_id  u64 voffset  u64 timestamp_ns
    u32 crc32 (zlib) of the first 64 header bytes and the payload  u32 pad

The file starts with the 8-byte `FILE_MAGIC`.
"""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path
from typing import Any, Callable, Iterable

from nicsplit.core.records import AugmentedWrite, Op, Outcome, Status, WFlag
from nicsplit.core.crc32 import crc32

__all__ = ["OverflowLog", "Overflow", "encode", "decode", "FILE_MAGIC", "REC", "TornRecord"]

log = logging.getLogger(__name__)

FILE_MAGIC = b"NSOVFL\x00\x01"
HEAD = struct.Struct("<HBBHBBIIQQQQQQ")
CRC = struct.Struct("<I4x")
REC = struct.Struct("<HBBHBBIIQQQQQQI4x")
assert HEAD.size == 64 and REC.size == HEAD.size + CRC.size == 72
REC_MAGIC = 0x564F
K_WRITE, K_OUTCOME = 1, 2
R_FED = 1  # rflags: the entry was already in the pipeline when logged (a spill): skipped by this run's reader
_OPS = {int(o): o for o in Op}
_STATUSES = {int(s): s for s in Status}
_WFLAGS = int(WFlag.FUA | WFlag.GAP)
_READ_CHUNK = 1 << 20
DEFAULT_MAX = 4 << 30


class TornRecord(ValueError):
    """A record that does not verify: the end of the good part of the log."""


def encode(e: AugmentedWrite | Outcome, rflags: int = 0) -> tuple[bytes, Any]:
    """(72-byte record head, payload or b"") of one entry."""
    if type(e) is Outcome:
        head = HEAD.pack(REC_MAGIC, K_OUTCOME, int(e.status), 0, 0, rflags, 0, 0, e.io_id, 0, 0, 0, 0, 0)
        return head + CRC.pack(crc32(head)), b""
    data = e.data if e.data is not None else b""
    n = len(data)
    head = HEAD.pack(REC_MAGIC, K_WRITE, int(e.op), int(e.flags), e.data is not None, rflags, e.length, n,
                     e.io_id, e.cg_id, e.cg_seq, e.vdisk_id, e.voffset, e.timestamp_ns)
    return head + CRC.pack(crc32(data, crc32(head)) if n else crc32(head)), data


def decode(buf: Any, pos: int, *, verify: bool = True) -> tuple[AugmentedWrite | Outcome, int, int] | None:
    """The entry at ``buf[pos:]``, the position after it and its rflags;
    None if ``buf`` ends inside it; `TornRecord` if it does not verify. A
    write's ``data`` is a memoryview into ``buf`` (zero copy)."""
    end = pos + REC.size
    if end > len(buf):
        return None
    (magic, kind, op, wflags, has_data, rflags, length, dlen, io_id, cg_id, cg_seq, vdisk_id, voffset, ts,
     crc) = REC.unpack_from(buf, pos)
    if magic != REC_MAGIC or kind not in (K_WRITE, K_OUTCOME):
        raise TornRecord(f"bad record head at {pos}")
    if kind == K_OUTCOME and (wflags or has_data or length or dlen):
        # encode() writes none of these for an outcome; a payload length here
        # would make the record's end depend on how much of the file is read.
        raise TornRecord(f"bad outcome record at {pos}")
    if end + dlen > len(buf):
        return None
    mv = memoryview(buf)
    if verify:
        c = crc32(mv[pos: pos + HEAD.size])
        if dlen:
            c = crc32(mv[end: end + dlen], c)
        if c != crc:
            raise TornRecord(f"bad CRC at {pos}")
    if kind == K_OUTCOME:
        st = _STATUSES.get(op)
        if st is None:
            raise TornRecord(f"bad status {op} at {pos}")
        return Outcome(io_id, st), end, rflags
    o = _OPS.get(op)
    if o is None:
        raise TornRecord(f"bad op {op} at {pos}")
    if wflags & ~_WFLAGS or has_data > 1 or dlen != (length if has_data else 0):
        # encode() writes has_data 0/1 and a payload exactly as long as the
        # write: anything else is not a record this code wrote.
        raise TornRecord(f"bad write record at {pos} (flags {wflags:#x}, has_data {has_data}, "
                         f"length {length}, payload {dlen})")
    data = mv[end: end + dlen] if has_data else None
    return AugmentedWrite(io_id, cg_id, cg_seq, vdisk_id, o, WFlag(wflags), voffset, length, ts, data), end + dlen, rflags


class OverflowLog:
    """The file: append (buffered, `flush` writes it), `sync` (fdatasync;
    safe on another thread), read in order (`peek`/`advance`), `reset`.
    Opening cuts a torn tail and makes every entry unread; ``scanned``
    holds the outcomes found at open (for the outcome index)."""

    def __init__(self, path: Path | str, max_bytes: int = DEFAULT_MAX) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        # Refuse before the last append fails; at most a quarter of a small log
        # (a 1 MiB reserve made a log of overflow_max <= 1M full while empty).
        self.reserve = min(max(max_bytes // 16, 1 << 20), 64 << 20, max_bytes // 4)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._buf = bytearray()
        self.unread = 0  # entries appended (or found at open) not yet read
        self.entries = 0  # entries in the file
        self.cut_bytes = 0  # torn tail cut at open
        self.appended = self.read_entries = self.syncs = self.resets = 0
        self.scanned_outcomes: dict[int, Outcome] = {}
        self.scanned_writes: list[tuple[int, int, int]] = []  # (cg_id, vdisk_id, timestamp_ns) of the first per CG
        self.scanned_bytes: dict[int, list[int]] = {}  # cg_id -> [a vdisk_id of it, WRITE payload bytes]
        self._open()
        self._rbuf: bytes = b""
        self._rbuf_off = self._rpos = len(FILE_MAGIC)
        self._peeked: tuple[AugmentedWrite | Outcome, int] | None = None

    # -- open ------------------------------------------------------------------

    def _open(self) -> None:
        size = os.fstat(self._fd).st_size
        if size < len(FILE_MAGIC) or os.pread(self._fd, len(FILE_MAGIC), 0) != FILE_MAGIC:
            if size:
                log.warning("overflow log %s: no valid header (%d bytes): started afresh", self.path, size)
                self.cut_bytes = size
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, FILE_MAGIC, 0)
            os.fsync(self._fd)
            self._end = self._written = self._replay_end = len(FILE_MAGIC)
            return
        pos = len(FILE_MAGIC)
        buf = b""
        buf_off = pos
        seen_cgs: set[int] = set()
        while pos < size:
            try:
                r = decode(buf, pos - buf_off)
            except TornRecord as e:
                log.warning("overflow log %s: %s", self.path, e)
                break
            if r is None:
                rel = pos - buf_off
                need = REC.size
                if len(buf) - rel >= REC.size:
                    need += REC.unpack_from(buf, rel)[7]
                if pos + need > size:
                    break  # the file ends inside this record
                buf = os.pread(self._fd, min(max(_READ_CHUNK, need), size - pos), pos)
                buf_off = pos
                continue
            e, nxt, _ = r
            pos = buf_off + nxt
            self.entries += 1
            if type(e) is Outcome:
                self.scanned_outcomes[e.io_id] = e
            else:
                if e.cg_id not in seen_cgs:
                    seen_cgs.add(e.cg_id)
                    self.scanned_writes.append((e.cg_id, e.vdisk_id, e.timestamp_ns))
                if e.op == Op.WRITE and e.data is not None:
                    self.scanned_bytes.setdefault(e.cg_id, [e.vdisk_id, 0])[1] += len(e.data)
        good = pos
        if good < size:
            self.cut_bytes = size - good
            log.warning("overflow log %s: cut %d bytes of torn tail after %d entries", self.path,
                        size - good, self.entries)
            os.ftruncate(self._fd, good)
            os.fsync(self._fd)
        self._end = self._written = self._replay_end = good
        self.unread = self.entries
        if self.entries:
            log.info("overflow log %s: %d entries (%d bytes) to replay", self.path, self.entries, good)

    # -- append ----------------------------------------------------------------

    def fits(self, nbytes: int) -> bool:
        return self._end + REC.size + nbytes <= self.max_bytes

    @property
    def full(self) -> bool:
        """Near its bound: the card refuses writes (one more poll's worth must still fit)."""
        return self._end + self.reserve >= self.max_bytes

    def append(self, e: AugmentedWrite | Outcome, fed: bool = False) -> bool:
        """Buffer one entry; False (nothing buffered) when a write would
        pass ``max_bytes``. Outcomes always fit (72 bytes; `reserve`).
        ``fed``: the pipeline already has it (a spill); this run's reader
        skips it, a restart replays it like any entry."""
        head, data = encode(e, R_FED if fed else 0)
        n = REC.size + len(data)
        if data and self._end + n > self.max_bytes:
            return False
        buf = self._buf
        buf += head
        if data:
            buf += data
        self._end += n
        self.unread += 1
        self.entries += 1
        self.appended += 1
        return True

    def flush(self) -> None:
        """Write the buffer to the file (page cache); `sync` makes it durable."""
        buf = self._buf
        if not buf:
            return
        mv = memoryview(buf)
        off = 0
        while off < len(buf):
            off += os.pwrite(self._fd, mv[off:], self._written + off)
        mv.release()
        self._written += len(buf)
        buf.clear()

    def sync(self) -> None:
        """fdatasync what `flush` wrote (releases the GIL: run it off the loop)."""
        os.fdatasync(self._fd)
        self.syncs += 1

    # -- read ------------------------------------------------------------------

    def peek(self) -> AugmentedWrite | Outcome | None:
        """The next unread (flushed) entry, or None."""
        if self._peeked is not None:
            return self._peeked[0]
        if self._rpos >= self._written:
            return None
        rel = self._rpos - self._rbuf_off
        r = decode(self._rbuf, rel, verify=False) if 0 <= rel < len(self._rbuf) else None
        while r is None:
            need = REC.size
            if 0 <= rel and len(self._rbuf) - rel >= REC.size:
                need += REC.unpack_from(self._rbuf, rel)[7]
            left = self._written - self._rpos
            if need > left:
                raise RuntimeError(f"overflow log {self.path}: record at {self._rpos} passes the end")
            self._rbuf = os.pread(self._fd, min(max(_READ_CHUNK, need), left), self._rpos)
            self._rbuf_off = self._rpos
            rel = 0
            r = decode(self._rbuf, 0, verify=False)
        e, nxt, rflags = r
        self._peeked = (e, self._rbuf_off + nxt, bool(rflags & R_FED) and self._rpos >= self._replay_end)
        return e

    @property
    def peeked_fed(self) -> bool:
        """The peeked entry was spilled by this run (the pipeline has it)."""
        assert self._peeked is not None
        return self._peeked[2]

    def advance(self) -> None:
        assert self._peeked is not None, "advance() without peek()"
        self._rpos = self._peeked[1]
        self._peeked = None
        self.unread -= 1
        self.read_entries += 1

    # -- state -----------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._end

    def reset(self) -> None:
        """Everything read and released: cut the file back to its header."""
        assert not self.unread and not self._buf
        os.ftruncate(self._fd, len(FILE_MAGIC))
        self._end = self._written = self._rpos = self._rbuf_off = self._replay_end = len(FILE_MAGIC)
        self._rbuf = b""
        self._peeked = None
        self.entries = 0
        self.resets += 1

    def close(self) -> None:
        os.close(self._fd)


class Overflow:
    """The card's policy around an `OverflowLog` (sans-IO; the card loop
    runs `sync` off its thread and calls `synced`). ``release_ring`` frees a
    ring payload; ``cg_name(vdisk_id)`` names a write's CG for the RPO."""

    def __init__(self, olog: OverflowLog, *, release_ring: Callable[[int], None], ring_fill: float = 0.5,
                 cg_name: Callable[[int], str | None] = lambda vdisk_id: None) -> None:
        self.log = olog
        self._release_ring = release_ring
        self.ring_fill = ring_fill
        self._cg_name = cg_name
        self._index: dict[int, Outcome] = dict(olog.scanned_outcomes)  # logged outcomes not yet read
        self._skip: set[int] = set()  # outcomes handed over early: skip their logged copy
        self.from_log: set[int] = set()  # payload writes fed from (or spilled to) the log, not yet released
        self.ring_backed: dict[int, AugmentedWrite] = {}  # fed directly, payload still in the ring
        self._unsynced: list[int] = []  # ring io ids appended, not yet durable
        self._syncing: list[int] | None = None
        self.failed = ""
        self._oldest: dict[int, tuple[int, int]] = {cg: (v, t) for cg, v, t in olog.scanned_writes}
        # cg_id -> [a vdisk_id of it, WRITE payload bytes unread in the log]: the CG's RPO in bytes
        self._unread_bytes: dict[int, list[int]] = {k: list(v) for k, v in olog.scanned_bytes.items()}
        self._in_bytes: dict[int, list[int]] = {}  # cg_id -> [a vdisk_id, WRITE payload diverted this run]
        self.diverted = self.fed = self.refused = self.early_outcomes = self.spilled = 0

    # -- decisions ---------------------------------------------------------------

    @property
    def active(self) -> bool:
        """The log holds unread entries: everything new goes behind them."""
        return self.log.unread > 0

    @property
    def in_use(self) -> bool:
        """The log holds writes not yet durable at the appliance (the card is *lagging*)."""
        return bool(self.log.unread or self.from_log)

    @property
    def full(self) -> bool:
        return bool(self.failed) or self.log.full

    def behind(self, pipeline: Any, entries: list, ring_fill: float) -> bool:
        """Divert these entries (rather than feed them) to the log?"""
        if self.log.unread or ring_fill > self.ring_fill or pipeline.full:
            return True
        nbytes = 0
        n = 0
        for e in entries:  # (`e.__class__`, not `type(e)`: an attribute costs no call, per entry)
            if e.__class__ is not Outcome:
                n += 1
                nbytes += e.length
        return not pipeline.fits(n, nbytes)

    # -- ring → pipeline, ring → log ----------------------------------------------------

    def fed_direct(self, entries: Iterable[AugmentedWrite | Outcome]) -> None:
        """The card feeds these straight to the pipeline: remember the writes
        whose payload stays in the ring (a later spill must move them), and
        log (as fed) the outcome of a write the log holds, so a restart that
        replays the write finds its outcome too."""
        rb, fl = self.ring_backed, self.from_log
        logged = False
        for e in entries:
            if e.__class__ is Outcome:
                if fl and e.io_id in fl and not self.failed:
                    self.log.append(e, fed=True)
                    logged = True
            elif e.data is not None:
                rb[e.io_id] = e
        if logged:
            try:
                self.log.flush()
            except OSError as err:
                self.fail(f"write failed: {err}")

    def spill(self, pipeline: Any, now_ns: int) -> None:
        """Move the writes fed straight to the pipeline whose payload is
        still in the ring into the log (marked fed, with a COMMITTED outcome
        when hold no longer waits for theirs), and point the pipeline at a
        copy of their bytes: once the log is durable their ring space is
        released, so the ring's oldest payloads stop pinning the whole data
        area (it is freed in order). Called before the first entry is
        diverted, so the log stays in ring order."""
        rb = self.ring_backed
        if not rb:
            return
        pipeline.close_merge_windows(now_ns)  # no item downstream of hold may point into the ring
        olog = self.log
        done = []
        for io_id, w in rb.items():
            if not olog.append(w, fed=True):
                break
            if not pipeline.awaits(io_id):
                olog.append(Outcome(io_id, Status.COMMITTED), fed=True)
            if type(w.data) is memoryview:
                w.data = bytes(w.data)  # hold's copy of the write is this object
            self.from_log.add(io_id)
            self._unsynced.append(io_id)
            done.append(io_id)
        for io_id in done:
            del rb[io_id]
        self.spilled += len(done)

    def divert(self, entries: Iterable[AugmentedWrite | Outcome], pipeline: Any, now_ns: int) -> None:
        """Append polled entries in order; a write the log cannot take goes to
        the pipeline (which loses it if it is full, as without the log)."""
        olog = self.log
        if self.ring_backed and not self.failed:
            self.spill(pipeline, now_ns)
        for e in entries:
            if type(e) is Outcome:
                olog.append(e)
                if pipeline.awaits(e.io_id):
                    pipeline.feed((e,), now_ns)
                    self._skip.add(e.io_id)
                    self.early_outcomes += 1
                else:
                    self._index[e.io_id] = e
                continue
            if self.failed or not olog.append(e):
                self.refused += 1
                pipeline.feed((e,), now_ns)
                continue
            self.diverted += 1
            if e.cg_id not in self._oldest:
                self._oldest[e.cg_id] = (e.vdisk_id, e.timestamp_ns)
            if e.op == Op.WRITE and e.data is not None:
                self._unsynced.append(e.io_id)
                n = len(e.data)
                ub = self._unread_bytes.get(e.cg_id)
                if ub is None:
                    ub = self._unread_bytes[e.cg_id] = [e.vdisk_id, 0]
                ub[1] += n
                ib = self._in_bytes.get(e.cg_id)
                if ib is None:
                    ib = self._in_bytes[e.cg_id] = [e.vdisk_id, 0]
                ib[1] += n
        try:
            olog.flush()
        except OSError as err:
            self.fail(f"write failed: {err}")

    def start_sync(self) -> bool:
        """True if a group fsync should start now (then `synced` when done)."""
        if self._syncing is not None or not self._unsynced or self.failed:
            return False
        self._syncing, self._unsynced = self._unsynced, []
        return True

    def synced(self, error: BaseException | None = None) -> None:
        """The group fsync ended: release its writes' ring payloads."""
        batch, self._syncing = self._syncing, None
        if error is not None:
            self.fail(f"fsync failed: {error}")
            return
        for io_id in batch or ():
            self._release_ring(io_id)
        self._maybe_reset()

    def sync_now(self) -> None:
        """Synchronous group fsync (shutdown, tests)."""
        if self.start_sync():
            try:
                self.log.sync()
            except OSError as e:
                self.synced(e)
                return
            self.synced()

    def fail(self, why: str) -> None:
        if not self.failed:
            log.error("overflow log %s: %s; writes not yet durable in it stay in the ring", self.log.path, why)
        self.failed = why

    # -- log → pipeline --------------------------------------------------------------

    def feed(self, pipeline: Any, now_ns: int, limit: int = 4096) -> int:
        """Feed the pipeline from the log's head while hold has room."""
        olog, skip, index = self.log, self._skip, self._index
        n = 0
        while n < limit and (e := olog.peek()) is not None:
            if olog.peeked_fed:  # spilled by this run: the pipeline has it already
                olog.advance()
                continue
            if type(e) is Outcome:
                olog.advance()
                if e.io_id in skip:
                    skip.discard(e.io_id)
                    continue
                index.pop(e.io_id, None)
                pipeline.feed((e,), now_ns)
                n += 1
                continue
            if not pipeline.fits(1, e.length):
                break
            olog.advance()
            if e.op == Op.WRITE and e.data is not None:
                self.from_log.add(e.io_id)
                ub = self._unread_bytes.get(e.cg_id)
                if ub is not None:
                    ub[1] -= len(e.data)
            self._oldest[e.cg_id] = (e.vdisk_id, e.timestamp_ns)
            pipeline.feed((e,), now_ns, from_log=True)  # its bytes in were counted when it was diverted
            self.fed += 1
            n += 1
            o = index.pop(e.io_id, None)
            if o is not None:
                pipeline.feed((o,), now_ns)
                skip.add(e.io_id)
        if not olog.unread:
            self._oldest.clear()
            self._unread_bytes.clear()
            self._maybe_reset()
        return n

    def unread_bytes_by_cg(self) -> dict[str, int]:
        """CG name → WRITE payload bytes still unread in the log (acked, not yet in the pipeline)."""
        return self._by_name(self._unread_bytes)

    def in_bytes_by_cg(self) -> dict[str, int]:
        """CG name → WRITE payload bytes diverted from the ring into the log since the card started."""
        return self._by_name(self._in_bytes)

    def _by_name(self, counts: dict[int, list[int]]) -> dict[str, int]:
        out: dict[str, int] = {}
        for vdisk_id, n in counts.values():
            name = self._cg_name(vdisk_id)
            if name is not None and n > 0:
                out[name] = out.get(name, 0) + n
        return out

    def release(self, io_id: int) -> bool:
        """The pipeline released ``io_id``: True if it was fed from the log
        (its ring payload was released when it was logged)."""
        fl = self.from_log
        if fl and io_id in fl:
            fl.discard(io_id)
            if not fl:
                self._maybe_reset()
            return True
        rb = self.ring_backed
        if rb:
            rb.pop(io_id, None)
        return False

    def release_many(self, io_ids: list[int]) -> list[int]:
        """`release` for a durable batch's writes: those whose payload is
        still in the ring (the rest gave it back when they were logged), in
        order. With nothing fed from the log (the steady case) that is all
        of them, and no call is made per write."""
        if self.from_log:
            release = self.release
            return [i for i in io_ids if not release(i)]
        rb = self.ring_backed
        if rb:
            pop = rb.pop
            for io_id in io_ids:
                pop(io_id, None)
        return io_ids

    def _maybe_reset(self) -> None:
        if (not self.log.unread and not self.from_log and not self._unsynced and self._syncing is None
                and self.log.entries):
            self.log.reset()
            self._index.clear()
            self._skip.clear()

    # -- stats -----------------------------------------------------------------

    def oldest_by_cg(self) -> dict[str, int]:
        """CG name → timestamp of (about) its oldest write still unread in the log."""
        out: dict[str, int] = {}
        if not self.log.unread:
            return out
        for vdisk_id, t in self._oldest.values():
            name = self._cg_name(vdisk_id)
            if name is not None and (name not in out or t < out[name]):
                out[name] = t
        return out

    def statistics(self) -> dict[str, Any]:
        olog = self.log
        return {
            "bytes": olog.size, "entries": olog.entries, "unread": olog.unread, "max": olog.max_bytes,
            "fill": round(olog.size / olog.max_bytes, 6), "lagging": self.in_use, "full": self.full,
            "failed": self.failed, "diverted": self.diverted, "fed": self.fed, "refused": self.refused,
            "early_outcomes": self.early_outcomes, "spilled": self.spilled, "fed_unreleased": len(self.from_log),
            "unsynced": len(self._unsynced) + len(self._syncing or ()), "syncs": olog.syncs,
            "resets": olog.resets, "cut_at_open": olog.cut_bytes,
        }
