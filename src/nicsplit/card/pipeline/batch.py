"""Stage 7, batch: collect records per consistency group into batches.

A CG has at most one *open* batch. A record joins its CG's open batch; the
batch closes when it reaches ``batch_bytes`` (encoded size estimate) or
``batch_records`` records, or when ``batch_delay_us`` has passed since its
first record (`tick`) — whichever comes first — and at once after a BARRIER
record (`close_cg`: the PIT a bookmark, verify or failover waits for should
not wait out the delay, 50 ms by default). ``batch_delay_us = 0`` closes
a batch after every record. A closed batch gets the next batch id (monotonic
per card incarnation, starting at ``first_batch_id``) and waits in the ready
queue for compress → encrypt → ship.

Seq coverage: a batch covers ``first_seq..last_seq`` of its CG; records in it
are in ascending seq order (hold and merge guarantee it; `add` checks). The
seqs between records (failed writes, writes folded by merge, rejected ones)
are simply absent. ``first_seq`` is the seq of the first record, not the
previous batch's end + 1.

A batch holds its records already encoded (the wire layout, one bytes
object per record): `add` encodes a `Record` with the checked
``frames.encode_record``; `add_encoded` takes the bytes the card's steady
path built with ``encode.encode_record_fields`` and no `Record` at all.
Sealing then joins the bytes once per batch (``encode.join_records``).

Bounds: ``full`` is true when ``max_ready`` batches are waiting for the
shipper; the pipeline then stops taking writes out of hold (backpressure
goes up the chain to hold, whose bound makes the card report itself full).
A batch's encoded plaintext stays below ``batch_bytes`` + one record, and
``batch_bytes`` is capped at 8 MiB so even an incompressible batch fits
``frames.MAX_BODY`` (16 MiB).

Options: ``batch_bytes`` (default 1 MiB), ``batch_records`` (default 4096),
``batch_delay_us`` (default 500), ``batch_max_ready`` (default 4).

Example::

    b = Batcher(batch_bytes=1 << 20, batch_delay_us=500)
    b.add(cg, record, io_ids, now_ns)
    b.add_encoded(cg, seq, time_ns, encoded, io_ids, kept_bytes, ref_blocks, now_ns)
    b.tick(now_ns)
    while (p := b.pop()) is not None: ...    # Pending: id, cg, encoded, io_ids
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from nicsplit.wire.frames import Batch, Record, decode_records, encode_record

from .encode import join_records
from .items import PipelineError

MAX_BATCH_BYTES = 8 << 20
_RECORD_OVERHEAD = 58  # frames._RECORD header
_REF_SIZE = 20  # frames._REF


def record_size(r: Record) -> int:
    """Encoded size of a record (frames layout)."""
    return _RECORD_OVERHEAD + _REF_SIZE * len(r.refs) + len(r.data)


@dataclass(slots=True)
class Pending:
    """A closed batch, not yet sealed: its records encoded, in seq order."""

    batch_id: int
    cg: str
    encoded: list[bytes]  # one encoded record each (frames layout)
    io_ids: list[int]
    nbytes: int  # encoded plaintext size
    t_open_ns: int  # card clock when the first record joined
    closed_ns: int
    first_seq: int
    last_seq: int
    t_min: int  # smallest / largest record time_ns
    t_max: int
    first_time_ns: int  # time_ns of the first record
    data_bytes: int  # record data bytes (after dedup)
    ref_blocks: int  # blocks sent by reference

    @property
    def records(self) -> list[Record]:
        """The records decoded again (tests and diagnostics; sealing uses `plain`)."""
        return decode_records(self.plain())

    def plain(self) -> bytes:
        """The batch plaintext (``frames.encode_records`` layout)."""
        return join_records(self.encoded)

    def header(self) -> Batch:
        """The Batch header (empty body): what ``frames.batch_aad`` binds."""
        return Batch(self.batch_id, self.cg, self.first_seq, self.last_seq, max(0, self.t_min), max(0, self.t_max), b"")


class _Open:
    __slots__ = ("encoded", "io_ids", "nbytes", "t_open_ns", "first_seq", "last_seq", "t_min", "t_max",
                 "first_time_ns", "data_bytes", "ref_blocks", "n")

    def __init__(self, t_open_ns: int, seq: int, time_ns: int) -> None:
        self.encoded: list[bytes] = []
        self.io_ids: list[int] = []
        self.nbytes = 4  # the record count
        self.t_open_ns = t_open_ns
        self.first_seq = self.last_seq = seq
        self.t_min = self.t_max = self.first_time_ns = time_ns
        self.data_bytes = self.ref_blocks = 0
        self.n = 0  # records (len(encoded), kept as a number for the per-record check)


@dataclass(frozen=True)
class BatchStats:
    batches: int  # closed
    records: int
    open_batches: int
    open_bytes: int
    ready: int
    max_ready: int
    next_batch_id: int
    closed_by_size: int
    closed_by_count: int
    closed_by_delay: int
    full: bool
    closed_by_barrier: int = 0


class Batcher:
    def __init__(
        self,
        *,
        batch_bytes: int = 1 << 20,
        batch_records: int = 4096,
        batch_delay_us: float = 500,
        max_ready: int = 4,
        first_batch_id: int = 1,
    ) -> None:
        if not 0 < batch_bytes <= MAX_BATCH_BYTES:
            raise ValueError(f"batch_bytes {batch_bytes} outside 1..{MAX_BATCH_BYTES}")
        if batch_records < 1 or batch_delay_us < 0 or max_ready < 1 or first_batch_id < 0:
            raise ValueError("batch_records and batch_max_ready must be >= 1, batch_delay_us >= 0")
        self.batch_bytes = batch_bytes
        self.batch_records = batch_records
        self.delay_ns = int(batch_delay_us * 1000)
        self.max_ready = max_ready
        self._next_id = first_batch_id
        self._open: dict[str, _Open] = {}
        self._ready: deque[Pending] = deque()
        self._batches = self._records = self._by_size = self._by_count = self._by_delay = self._by_barrier = 0

    @property
    def full(self) -> bool:
        return len(self._ready) >= self.max_ready

    @property
    def ready_count(self) -> int:
        """Closed batches waiting to be popped."""
        return len(self._ready)

    def add(self, cg: str, record: Record, io_ids: tuple[int, ...], now_ns: int) -> None:
        self.add_encoded(cg, record.seq, record.time_ns, encode_record(record), io_ids, len(record.data),
                         len(record.refs), now_ns)

    def add_encoded(self, cg: str, seq: int, time_ns: int, encoded: bytes, io_ids: int | tuple[int, ...] | list[int],
                    data_bytes: int, ref_blocks: int, now_ns: int) -> int:
        """Add one encoded record (``io_ids``: the io ids it frees, or the
        one io id of a single write). Returns the number of closed batches
        waiting if this call closed one, else 0."""
        size = len(encoded)
        closed = False
        ob = self._open[cg] if cg in self._open else None
        if ob is not None:  # an open batch holds at least one record
            if seq <= ob.last_seq:
                raise PipelineError(f"cg {cg}: record seq {seq} after {ob.last_seq}")
            if ob.nbytes + size > self.batch_bytes:
                self._by_size += 1
                self._close(cg, now_ns)
                closed = True
                ob = None
        if ob is None:
            ob = self._open[cg] = _Open(now_ns, seq, time_ns)
        else:
            ob.last_seq = seq
            if time_ns < ob.t_min:
                ob.t_min = time_ns
            elif time_ns > ob.t_max:
                ob.t_max = time_ns
        ob.encoded.append(encoded)
        if io_ids.__class__ is int:  # the steady path's one write: no tuple made per write
            ob.io_ids.append(io_ids)
        else:
            ob.io_ids.extend(io_ids)
        ob.nbytes += size
        ob.data_bytes += data_bytes
        ob.ref_blocks += ref_blocks
        ob.n += 1
        self._records += 1
        if ob.nbytes >= self.batch_bytes:
            self._by_size += 1
        elif ob.n >= self.batch_records:
            self._by_count += 1
        elif not self.delay_ns:
            self._by_delay += 1
        elif not closed:
            return 0
        else:
            return len(self._ready)
        self._close(cg, now_ns)
        return len(self._ready)

    def open_run(self, cg: str) -> "_Open | None":
        """The CG's open batch, for a caller that appends a run of encoded
        records straight to its ``encoded`` and ``io_ids`` lists (no call
        per record) and then calls `run_added`; None when there is none or
        batches close after every record (``batch_delay_us = 0``): use
        `add_encoded`. The caller keeps the run inside what `add_encoded`
        would take without closing: ``nbytes + size < batch_bytes`` and
        ``n + 1 < batch_records`` after each record (see `run_room`), seqs
        ascending after ``last_seq``."""
        return self._open.get(cg) if self.delay_ns else None

    def run_room(self, ob: "_Open") -> tuple[int, int]:
        """(bytes, records) a run may add to ``ob`` and leave it open: every
        record's size must stay below what is left of the bytes, and the
        run's count at most the records."""
        return self.batch_bytes - ob.nbytes, self.batch_records - ob.n - 1

    def run_added(self, ob: "_Open", k: int, last_seq: int, t_min: int, t_max: int, nbytes: int,
                  data_bytes: int, ref_blocks: int) -> None:
        """Count a run of ``k`` records appended to ``ob`` (`open_run`)."""
        ob.last_seq = last_seq
        ob.t_min = t_min
        ob.t_max = t_max
        ob.nbytes += nbytes
        ob.data_bytes += data_bytes
        ob.ref_blocks += ref_blocks
        ob.n += k
        self._records += k

    def tick(self, now_ns: int) -> None:
        if self._open:
            for cg in [cg for cg, ob in self._open.items() if now_ns - ob.t_open_ns >= self.delay_ns]:
                self._by_delay += 1
                self._close(cg, now_ns)

    def close_cg(self, cg: str, now_ns: int) -> None:
        """Close ``cg``'s open batch now (a barrier: a bookmark, verify or
        failover waits for the PIT it makes, not for the batch's delay)."""
        if cg in self._open:
            self._by_barrier += 1
            self._close(cg, now_ns)

    def flush(self, now_ns: int) -> None:
        for cg in list(self._open):
            self._close(cg, now_ns)

    def next_deadline_ns(self) -> int | None:
        """When the oldest open batch is due (for the caller's timer)."""
        if not self._open:
            return None
        return min(ob.t_open_ns for ob in self._open.values()) + self.delay_ns

    def oldest_by_cg(self) -> dict[str, int]:
        """Per CG, the write timestamp of the first record not yet handed to ship."""
        out: dict[str, int] = {}
        for p in self._ready:
            out.setdefault(p.cg, p.first_time_ns)
        for cg, ob in self._open.items():
            out.setdefault(cg, ob.first_time_ns)
        return out

    def pop(self) -> Pending | None:
        return self._ready.popleft() if self._ready else None

    @property
    def next_id(self) -> int:
        """The id the next batch to close gets: it moves when one closes."""
        return self._next_id

    def statistics(self) -> BatchStats:
        return BatchStats(
            batches=self._batches, records=self._records, open_batches=len(self._open),
            open_bytes=sum(ob.nbytes for ob in self._open.values()), ready=len(self._ready),
            max_ready=self.max_ready, next_batch_id=self._next_id, closed_by_size=self._by_size,
            closed_by_count=self._by_count, closed_by_delay=self._by_delay, full=self.full,
            closed_by_barrier=self._by_barrier,
        )

    def _close(self, cg: str, now_ns: int) -> None:
        ob = self._open.pop(cg)
        self._ready.append(Pending(self._next_id, cg, ob.encoded, ob.io_ids, ob.nbytes, ob.t_open_ns, now_ns,
                                   ob.first_seq, ob.last_seq, ob.t_min, ob.t_max, ob.first_time_ns,
                                   ob.data_bytes, ob.ref_blocks))
        self._next_id += 1
        self._batches += 1
