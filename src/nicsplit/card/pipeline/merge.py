"""Stage 3, merge: optionally fold writes of one vdisk together inside a
point-in-time (PIT) granularity window.

With ``merge_window_ms = 0`` (the default) merge is a pass-through: every
write becomes its own record and its own point in time, and the journal holds
every write.

With a window, the window is per consistency group and opens with the first
write that reaches merge after the previous window closed. Inside a window:

- WRITEs of one vdisk that overlap or touch are folded into one record
  covering the union of their ranges; later bytes overwrite earlier ones; the
  record takes the seq, timestamp and io id of its last write and carries the
  io ids of all of them (each owns a hidden-volume slot);
- ZERO / TRIM stay records of their own; one that overlaps a pending WRITE of
  its vdisk closes the window first (so a folded WRITE never jumps over a
  ZERO/TRIM that came between its parts);
- a BARRIER or a FUA write closes the window after it is added;
- the window closes when ``merge_window_ms`` has passed since it opened
  (`tick`), or when it would exceed ``merge_max_bytes`` of payload.

A closed window is emitted in ascending seq order. Why this keeps P2: write
segments of a vdisk never overlap each other, and never overlap a ZERO/TRIM
with a higher seq, so applying the window's records in that order gives the
state after its last write. Points in time *inside* a window are not
consistent any more, so every record of a window but the last has
``RFLAG_IN_WINDOW`` set in its flags: the appliance offers PITs only at
records without it (a window may span two batches; the flag, not the batch
boundary, says where a consistent PIT ends).

Options: ``merge_window_ms`` (default 0 = off), ``merge_max_bytes`` (default
1 MiB, the payload of one window).

Example::

    m = Merger(window_ms=2)
    m.push(resolved, now_ns)       # from hold, in CG order
    m.tick(now_ns)                 # closes windows that are due
    while (item := m.pop()) is not None: ...

Bounded: a window holds at most ``merge_max_bytes`` of payload, and the
output queue is drained by the pipeline after every push/tick.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from nicsplit.core.records import RFLAG_IN_WINDOW, Op, WFlag

from .items import Item, Resolved


class _Window:
    __slots__ = ("t0_ns", "nbytes", "segs", "others")

    def __init__(self, t0_ns: int) -> None:
        self.t0_ns = t0_ns
        self.nbytes = 0
        self.segs: dict[int, list[Item]] = {}  # vdisk_id → pairwise non-touching WRITE items
        self.others: list[Item] = []  # ZERO / TRIM / BARRIER items


@dataclass(frozen=True)
class MergeStats:
    window_ms: float
    writes_in: int
    records_out: int
    folded: int  # records absorbed into a later write's record
    bytes_in: int
    bytes_out: int
    windows: int  # windows closed
    open_windows: int
    open_bytes: int


class Merger:
    def __init__(self, *, window_ms: float = 0, max_bytes: int = 1 << 20) -> None:
        if window_ms < 0 or max_bytes < 1:
            raise ValueError("merge_window_ms must be >= 0 and merge_max_bytes > 0")
        self.window_ns = int(window_ms * 1_000_000)
        self.max_bytes = max_bytes
        self._open: dict[str, _Window] = {}
        self._out: deque[Item] = deque()
        self._in = self._out_n = self._folded = self._bytes_in = self._bytes_out = self._windows = 0

    @property
    def enabled(self) -> bool:
        return self.window_ns > 0

    def push(self, r: Resolved, now_ns: int) -> None:
        self._in += 1
        self._bytes_in += r.nbytes
        item = Item.of(r)
        if not self.window_ns:
            self._emit([item])
            return
        win = self._open.get(item.cg)
        if win is not None and (now_ns - win.t0_ns >= self.window_ns or win.nbytes + r.nbytes > self.max_bytes):
            self._close(item.cg)
            win = None
        if win is None:
            win = self._open[item.cg] = _Window(now_ns)
        if item.op == Op.WRITE:
            self._fold(win, item)
        else:
            segs = win.segs.get(item.vdisk_id, ())
            end = item.offset + item.length
            if item.op != Op.BARRIER and any(s.offset < end and item.offset < s.offset + s.length for s in segs):
                self._close(item.cg)
                win = self._open[item.cg] = _Window(now_ns)
            win.others.append(item)
        win.nbytes += r.nbytes
        if item.op == Op.BARRIER or item.flags & WFlag.FUA:
            self._close(item.cg)

    def count_passthrough(self, nbytes: int, data_len: int, writes: int = 1) -> None:
        """Merging is off and the pipeline moved ``writes`` writes past this
        stage without an `Item`: count them as `push` + `pop` would have."""
        self._in += writes
        self._out_n += writes
        self._bytes_in += nbytes
        self._bytes_out += data_len

    def tick(self, now_ns: int) -> None:
        """Close every window older than the window length."""
        if self._open:
            for cg in [cg for cg, w in self._open.items() if now_ns - w.t0_ns >= self.window_ns]:
                self._close(cg)

    def flush(self) -> None:
        """Close every open window (shutdown)."""
        for cg in list(self._open):
            self._close(cg)

    def pop(self) -> Item | None:
        return self._out.popleft() if self._out else None

    def statistics(self) -> MergeStats:
        return MergeStats(
            window_ms=self.window_ns / 1e6, writes_in=self._in, records_out=self._out_n, folded=self._folded,
            bytes_in=self._bytes_in, bytes_out=self._bytes_out, windows=self._windows,
            open_windows=len(self._open), open_bytes=sum(w.nbytes for w in self._open.values()),
        )

    # -- internals -----------------------------------------------------------

    def _fold(self, win: _Window, item: Item) -> None:
        segs = win.segs.setdefault(item.vdisk_id, [])
        start, end = item.offset, item.offset + item.length
        touching = [s for s in segs if s.offset <= end and start <= s.offset + s.length]
        if not touching:
            segs.append(item)
            return
        lo = min(start, *(s.offset for s in touching))
        hi = max(end, *(s.offset + s.length for s in touching))
        buf = bytearray(hi - lo)
        io_ids: list[int] = []
        flags = 0
        for s in sorted(touching, key=lambda s: s.seq):  # older first; newer bytes win
            buf[s.offset - lo : s.offset - lo + s.length] = s.data
            io_ids += s.io_ids
            flags |= s.flags
            segs.remove(s)
        buf[start - lo : end - lo] = item.data
        self._folded += len(touching)
        item.offset, item.length, item.data = lo, hi - lo, buf
        item.io_ids = (*io_ids, *item.io_ids)
        item.flags |= flags & ~WFlag.FUA  # FUA of a folded write was a barrier: it closed its window
        segs.append(item)

    def _close(self, cg: str) -> None:
        win = self._open.pop(cg)
        items = [s for segs in win.segs.values() for s in segs] + win.others
        items.sort(key=lambda i: i.seq)
        for i in items[:-1]:
            i.flags |= RFLAG_IN_WINDOW
        self._windows += 1
        self._emit(items)

    def _emit(self, items: list[Item]) -> None:
        for i in items:
            self._out_n += 1
            self._bytes_out += len(i.data)
        self._out.extend(items)
