"""The card pipeline assembled: resolve → hold → merge → dedup → batch →
(encode → compress → encrypt) → ship window.

`CardPipeline` is sans-IO and single-threaded: the card loop feeds it what
the transport polled (`feed`), calls `tick` with the card's monotonic clock,
and the asyncio `Shipper` drives its `window`. Nothing in here blocks.

Data order of one batch (the borg/restic order, STYLE.md)::

    fingerprint plain 4 KiB blocks (dedup) → encoded record (encode.py, as it
    joins its batch) → the batch's records joined → zstd (compress)
    → AES-256-GCM, AAD = batch_aad(header) (encrypt)

Per write, the steady path (merge off) does only what must be per write —
one loop over the poll, resolve's checks (inline for a run of one vdisk),
a hold slot, a fingerprint, one encoded record; per batch it joins, compresses, seals and releases (one call into
the transport for all of a durable batch's writes, ``release_many``).

Backpressure: `pump` moves writes out of hold only while the batcher is not
full, and moves sealed batches into the ship window only while it has room.
So an unacked window fills the batcher, which leaves committed writes in
hold, whose bound makes `full` true (the card reports itself full and the
splitter marks, P4). The poller never waits: a write arriving while hold is
full is reported lost (``on_lost``) and released.

Payload ownership: every write-with-payload the transport handed over is
released exactly once — dropped (resolve reject, failed, lost) at once,
shipped after its batch's durable ack. Writes without payload (ZERO, TRIM,
BARRIER) hold no transport memory and are never released (the ring refuses
an unknown io id).

Example::

    p = CardPipeline(catalog, release=ep.release, on_lost=mark_dirty, key=batch_key,
                     release_many=ep.release_many)  # release_many: optional
    p.feed(ep.poll(), monotonic_ns())
    p.tick(monotonic_ns())
    shipper = Shipper(p.window, connect=..., card_id=..., cgs=p.cgs)
"""

from __future__ import annotations

import struct
import time
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Callable, Iterable, Mapping

from nicsplit.core.records import BLOCK_SIZE, AugmentedWrite, Op, Outcome
from xxhash import xxh3_128_digest as _fp128  # = frames.fingerprint, without its wrapper call

from nicsplit.wire.frames import RECORD_HEAD, Batch, batch_aad

from .batch import Batcher, BatchStats, Pending
from .compress import Compressor, CompressStats
from .dedup import Dedup, DedupStats
from .encrypt import Encryptor, EncryptStats
from .hold import Hold, HoldStats
from .merge import Merger, MergeStats
from .resolve import CardCatalog, Resolver, ResolveStats
from .ship import ShipStats, ShipWindow


@dataclass(frozen=True)
class PipelineConfig:
    """Every pipeline option with its default (the ``[card]`` keys)."""

    hold_max_writes: int = 65536
    hold_max_bytes: int = 256 << 20
    outcome_timeout_ms: float = 5000
    merge_window_ms: float = 0
    merge_max_bytes: int = 1 << 20
    dedup: bool = True
    dedup_known_max: int = 65536
    dedup_horizon_s: float = 600  # a learned block is referenced at most this long (retention relies on it)
    compress: bool = True
    compress_level: int = 1
    batch_bytes: int = 256 << 10  # sealing one holds the card ~0.5 ms: inside the split timeout
    batch_records: int = 4096
    batch_delay_us: float = 500
    batch_max_ready: int = 4
    ship_window: int = 64
    ship_window_bytes: int = 64 << 20
    first_batch_id: int = 1

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> "PipelineConfig":
        names = {f.name for f in fields(cls)}
        return replace(cls(), **{k: v for k, v in m.items() if k in names})


@dataclass(frozen=True)
class PipelineStats:
    resolve: ResolveStats
    hold: HoldStats
    merge: MergeStats
    dedup: DedupStats
    compress: CompressStats
    encrypt: EncryptStats
    batch: BatchStats
    ship: ShipStats
    writes_in: int  # augmented writes received
    outcomes_in: int
    payload_bytes_in: int  # bytes written by clients (WRITE payloads received)
    wire_bytes_out: int  # Batch frame bytes transmitted (retransmits included)
    released: int  # payloads released to the transport
    lost: int  # writes reported via on_lost (resolve reject, timeout, late, full)
    full: bool


_head = RECORD_HEAD.pack
_RH = RECORD_HEAD.size  # an encoded record's head: its size is at most this plus its payload


class CardPipeline:
    def __init__(
        self,
        catalog: CardCatalog,
        *,
        release: Callable[[int], None],
        on_lost: Callable[[AugmentedWrite], None],
        key: bytes | None,
        config: PipelineConfig = PipelineConfig(),
        release_many: Callable[[list[int]], None] | None = None,
    ) -> None:
        self.config = c = config
        self._release_cb = release
        self._release_many_cb = release_many  # optional: a durable batch's releases in one call
        self._on_lost_cb = on_lost
        # io id -> (CG or None, payload bytes) of the writes whose payload the transport holds for us
        self._payload_ios: dict[int, tuple[str | None, int]] = {}
        self._acct: dict[str, CGBytes] = {}  # per-CG byte counts for status (cg_report)
        self.resolver = Resolver(catalog)
        self.hold = Hold(on_lost=self._lost, release=self._release, max_writes=c.hold_max_writes,
                         max_bytes=c.hold_max_bytes, outcome_timeout_ms=c.outcome_timeout_ms)
        self.merger = Merger(window_ms=c.merge_window_ms, max_bytes=c.merge_max_bytes)
        self.dedup = Dedup(known_max=c.dedup_known_max, enabled=c.dedup, horizon_s=c.dedup_horizon_s)
        self.compressor = Compressor(level=c.compress_level, enabled=c.compress)
        self.encryptor = Encryptor(key)
        self.batcher = Batcher(batch_bytes=c.batch_bytes, batch_records=c.batch_records,
                               batch_delay_us=c.batch_delay_us, max_ready=c.batch_max_ready,
                               first_batch_id=c.first_batch_id)
        self.window = ShipWindow(release=self._release, learn=self.dedup.learn, release_many=self._release_many,
                                 max_batches=c.ship_window, max_bytes=c.ship_window_bytes)
        self._cgs: dict[str, None] = {}
        self._writes = self._outcomes = self._bytes_in = self._released = self._lost_n = 0

    # -- input -------------------------------------------------------------------

    def feed(self, entries: Iterable[AugmentedWrite | Outcome], now_ns: int, from_log: bool = False) -> None:
        """Take what the transport polled (in its order) and push it along.
        ``from_log``: read back from the card's overflow log, which counted
        the bytes in (`CGBytes.in_bytes`) when it took them from the ring."""
        # One loop over the whole poll with everything bound locally: this is
        # the card's per-write steady path (calls per write are its cost).
        hold, resolver = self.hold, self.resolver
        outcomes, add_entries, resolve = hold.outcomes, hold.add_entries, resolver.resolve
        lookup = resolver.catalog.lookup
        refused = self.window.refused_cgs
        payload_ios, cgs = self._payload_ios, self._cgs
        write_op = Op.WRITE
        a_cg = a = None  # the last write's CG and its byte counts (polls come in runs of one CG)
        # Resolve's verdict for a run of one vdisk: a WRITE of the same vdisk
        # and CG id as the last write resolve passed in this poll is checked
        # here against the catalog entry resolve used (nothing refreshes the
        # catalog in between: only resolve does, and its next full call
        # replaces this). The same checks as `Resolver.resolve`, without its
        # two calls per write.
        r_vd = r_cgid = r_cg = r_vdisk = None
        r_size = -1
        n_fast = n_writes = n_outcomes = bytes_in = 0
        run_n = 0  # payload bytes of the run's writes so far: counted once, when the run ends
        runs = self.resolve_runs
        # Writes for hold, given to it in one call (`Hold.add_entries`) as
        # entries (write, cg, vdisk, nbytes), a `Resolved`'s fields without
        # its object, before anything that must see them there: an outcome,
        # a dropped write's seq, the end of the poll. A run of outcomes goes
        # to hold in one call too (`Hold.outcomes`), before the next write.
        adds: list[tuple] = []
        outs: list[Outcome] = []
        try:
            for e in entries:
                if e.__class__ is Outcome:  # (not type(e): an attribute costs no call)
                    n_outcomes += 1
                    if adds:
                        add_entries(adds, now_ns)
                        adds.clear()
                    outs.append(e)
                    continue
                if outs:
                    outcomes(outs, now_ns)
                    outs.clear()
                if e.vdisk_id == r_vd and e.cg_id == r_cgid and e.op == write_op:
                    data, off, length = e.data, e.voffset, e.length
                    if data is not None and len(data) == length and off >= 0 and off + length <= r_size:
                        # A write of the run: its CG is in `cgs` and not
                        # refused (the run's first write saw to both); its
                        # bytes go to the CG's counts when the run ends.
                        n_fast += 1
                        if length:
                            payload_ios[e.io_id] = (r_cg, length)
                            run_n += length
                        else:  # an empty WRITE: the transport holds it too
                            payload_ios[e.io_id] = (None, 0)
                        adds.append((e, r_cg, r_vdisk, length))
                        continue
                n_writes += 1
                if run_n:  # the run ended: its payload is acknowledged and not yet durable (the CG's RPO)
                    bytes_in += run_n
                    ra = self._cg_bytes(r_cg)
                    ra.pending += run_n
                    if not from_log:
                        ra.in_bytes += run_n
                    run_n = 0
                # resolve itself (it may refresh the catalog: the run starts again)
                r = None
                rv = resolve(e)
                r_vd = None
                if rv is not None:
                    r = (e, rv.cg, rv.vdisk, rv.nbytes)
                    if runs and not (refused and rv.cg in refused):
                        found = lookup(e.vdisk_id)
                        if found is not None and found[0] == rv.cg:
                            r_vd, r_cgid, r_cg, r_vdisk, r_size = e.vdisk_id, e.cg_id, rv.cg, rv.vdisk, found[2]
                if r is None or (refused and r[1] in refused):
                    # resolve dropped it, or the appliance refuses this CG: lost
                    # (its host marks) rather than filling the window
                    if adds:
                        add_entries(adds, now_ns)
                        adds.clear()
                    data = e.data
                    if data is not None and e.op == write_op:  # (even empty: the transport holds it)
                        n = len(data)
                        bytes_in += n
                        payload_ios[e.io_id] = (None, n)
                    self._lost(e)  # acked to the host, never shipped: its region must be resynced (P1)
                    self._release(e.io_id)
                    hold.reject(e.cg_id, e.cg_seq, now_ns)
                    continue
                cg = r[1]
                n = r[3]  # a WRITE's payload length (resolve checked it), else 0
                if n:  # acknowledged and not yet durable: the CG's RPO in bytes
                    bytes_in += n
                    payload_ios[e.io_id] = (cg, n)
                    if cg is not a_cg:
                        a_cg, a = cg, self._cg_bytes(cg)
                    a.pending += n
                    if not from_log:
                        a.in_bytes += n
                elif e.op == write_op and e.data is not None:  # an empty WRITE: the transport holds it too
                    payload_ios[e.io_id] = (None, 0)
                if cg not in cgs:
                    cgs[cg] = None
                adds.append(r)
            if adds:
                add_entries(adds, now_ns)
            elif outs:
                outcomes(outs, now_ns)
        finally:
            if run_n:  # the last run's bytes (see above)
                bytes_in += run_n
                ra = self._cg_bytes(r_cg)  # type: ignore[arg-type]
                ra.pending += run_n
                if not from_log:
                    ra.in_bytes += run_n
            self._writes += n_writes + n_fast
            self._outcomes += n_outcomes
            self._bytes_in += bytes_in
        if n_fast:
            resolver.passed(n_fast)
        self.pump(now_ns)

    def open_gaps(self, gaps: list[tuple[int, int, int, int, int]]) -> None:
        """(cg_id, cg_seq, vdisk_id, offset, length) of acked writes the
        transport found unshippable (a payload bad after its ack): later
        writes of the CG carry GAP until the region is covered again
        (`Hold.open_gap`). Before their seqs are skipped; emptied."""
        open_gap = self.hold.open_gap
        for g in gaps:
            open_gap(*g)
        gaps.clear()

    def skip(self, refused: list[tuple[int, int]], now_ns: int) -> None:
        """(cg_id, cg_seq) of writes the transport refused (its host marks
        them): hold stops waiting for those seqs; ``refused`` is emptied."""
        skip = self.hold.skip
        for cg_id, seq in refused:
            skip(cg_id, seq, now_ns)
        refused.clear()
        self.pump(now_ns)

    def tick(self, now_ns: int) -> None:
        """Time-driven work: overdue outcomes, merge windows, batch delays."""
        self.hold.expire(now_ns)
        self.merger.tick(now_ns)
        self._drain_merge(now_ns)
        self.batcher.tick(now_ns)
        self.pump(now_ns)

    def drain(self, now_ns: int) -> None:
        """Shutdown: close every merge window and open batch and push what the
        ship window takes. Writes still waiting for an outcome stay in hold."""
        self.pump(now_ns)
        self.merger.flush()
        self._drain_merge(now_ns)
        self.batcher.flush(now_ns)
        self.pump(now_ns)

    # Resolve a run of one vdisk's writes in `feed` without a call per write.
    # False calls `Resolver.resolve` for every write: the reference the tests
    # compare the runs with.
    resolve_runs = True

    # Merging off: writes go from hold straight to dedup and the batcher as
    # encoded records (`_pump_direct`). False sends them through the staged
    # path (Item, Record, checked encode) instead: the reference the tests
    # compare the direct path with.
    direct = True

    def pump(self, now_ns: int) -> None:
        hold, merger, batcher = self.hold, self.merger, self.batcher
        if not merger.enabled and self.direct:
            return self._pump_direct(now_ns)
        while True:
            self._ship(now_ns)
            if batcher.full or not hold.has_ready():
                return
            merger.push(hold.pop_ready(), now_ns)
            self._drain_merge(now_ns)

    def _pump_direct(self, now_ns: int) -> None:
        """`pump` with merging off (the default): each committed write goes
        from hold to dedup and into the batcher as an encoded record, with no
        `Item` or `Record` in between: the same batch bytes, a fraction of
        the per-write calls.

        Runs: while the head of hold's ready queue belongs to a CG with an
        open batch, its writes are encoded here and appended straight to
        that batch (`Batcher.open_run`), one `Batcher.run_added` per run,
        as long as each record surely leaves the batch open (its size is
        at most ``RECORD_HEAD.size`` + its payload). A new 4 KiB block is
        fingerprinted and encoded inline; anything else (a known block,
        several blocks, a field out of range) takes ``Dedup.encode``. The
        record that opens or closes a batch goes through
        ``Batcher.add_encoded``, so batches close where they always did."""
        hold, dedup, batcher = self.hold, self.dedup, self.batcher
        ready = hold.ready
        popleft, encode, add = ready.popleft, dedup.encode, batcher.add_encoded
        open_run, run_room, run_added = batcher.open_run, batcher.run_room, batcher.run_added
        known = dedup.known
        get = known.get if known is not None else None
        write_op, barrier_op = Op.WRITE, Op.BARRIER
        n = nbytes = 0
        try:
            while True:
                self._ship(now_ns)
                if batcher.full or not ready:
                    return
                w, cg, _, length = ready[0]  # hold's entry: (write, cg, vdisk, nbytes)
                ob = open_run(cg)
                if ob is not None and w.cg_seq > ob.last_seq:
                    room_b, room_n = run_room(ob)
                    enc_append, io_append = ob.encoded.append, ob.io_ids.append
                    k = inline = used = kept = refs = 0
                    last, t_min, t_max = ob.last_seq, ob.t_min, ob.t_max
                    while k < room_n and ready:
                        # length = len(data): resolve checked a WRITE's payload, the rest carry none
                        w, r_cg, _, length = ready[0]
                        if r_cg != cg or used + _RH + length >= room_b or w.op == barrier_op:
                            break  # a barrier goes the general way: it closes its batch
                        seq = w.cg_seq
                        if seq <= last:
                            break  # `add_encoded` says why
                        popleft()
                        if length == BLOCK_SIZE and get is not None:
                            data = w.data
                            fp = _fp128(data)
                            if get((cg, fp)) is None:  # a new block (the steady case): `Dedup.encode` inline
                                try:
                                    enc = _head(seq, w.io_id, w.vdisk_id, w.op, w.flags, w.voffset, length,
                                                w.timestamp_ns, 0, length) + data
                                    size, d_kept, d_refs = _RH + length, length, 0
                                    inline += 1
                                except struct.error:  # a field out of range: `encode` names it
                                    enc, d_kept, d_refs = encode(cg, seq, w.io_id, w.vdisk_id, w.op, w.flags,
                                                                 w.voffset, w.length, w.timestamp_ns, data)
                                    size = len(enc)
                            else:
                                enc, d_kept, d_refs = encode(cg, seq, w.io_id, w.vdisk_id, w.op, w.flags, w.voffset,
                                                             w.length, w.timestamp_ns, data)
                                size = len(enc)
                        else:
                            data = w.data if (w.op == write_op and w.data is not None) else b""
                            enc, d_kept, d_refs = encode(cg, seq, w.io_id, w.vdisk_id, w.op, w.flags, w.voffset,
                                                         w.length, w.timestamp_ns, data)
                            size = len(enc)
                        enc_append(enc)
                        io_append(w.io_id)
                        k += 1
                        n += 1
                        nbytes += length
                        used += size
                        kept += d_kept
                        refs += d_refs
                        last = seq
                        t = w.timestamp_ns
                        if t < t_min:
                            t_min = t
                        elif t > t_max:
                            t_max = t
                    if k:
                        run_added(ob, k, last, t_min, t_max, used, kept, refs)
                        if inline:
                            dedup.counted(inline, inline)  # new 4 KiB blocks encoded here (`encode` counts its own)
                        continue
                # one record the general way: it opens or closes a batch (or breaks a run's rule)
                w, _, _, length = popleft()
                data = w.data if (w.op == write_op and w.data is not None) else b""
                n += 1
                nbytes += length
                enc, d_kept, d_refs = encode(cg, w.cg_seq, w.io_id, w.vdisk_id, w.op, w.flags, w.voffset, w.length,
                                             w.timestamp_ns, data)
                add(cg, w.cg_seq, w.timestamp_ns, enc, w.io_id, d_kept, d_refs, now_ns)
                if w.op == barrier_op:
                    batcher.close_cg(cg, now_ns)
        finally:
            if n:  # what `Hold.pop_ready` and `Merger.push` would have counted one by one
                hold.took(n, nbytes)
                self.merger.count_passthrough(nbytes, nbytes, n)

    # -- state -------------------------------------------------------------------

    @property
    def full(self) -> bool:
        return self.hold.full

    def fits(self, writes: int, nbytes: int) -> bool:
        """Room in hold for ``writes`` more writes of ``nbytes`` payload (the
        card's overflow log feeds the pipeline only while this holds)."""
        return self.hold.fits(writes, nbytes)

    def awaits(self, io_id: int) -> bool:
        """A write fed earlier still waits in hold for its outcome."""
        return self.hold.awaiting(io_id)

    def close_merge_windows(self, now_ns: int) -> None:
        """Close every open merge window (its items may point into transport
        memory): afterwards only hold refers to the writes' payloads."""
        if self.merger.enabled:
            self.merger.flush()
            self._drain_merge(now_ns)

    def cgs(self) -> tuple[str, ...]:
        """CG names seen so far (for Hello)."""
        return tuple(self._cgs)

    def add_cgs(self, names: Iterable[str]) -> None:
        for n in names:
            self._cgs.setdefault(n)

    def idle(self) -> bool:
        """Nothing waits for time to pass (no open window or batch)."""
        b = self.batcher.statistics()
        return not b.open_batches and not b.ready and not self.merger.statistics().open_windows

    def drained(self) -> bool:
        """Everything committed so far is durable at the appliance."""
        return self.idle() and not self.hold.has_ready() and self.window.empty

    def statistics(self) -> PipelineStats:
        ship = self.window.statistics()
        return PipelineStats(
            resolve=self.resolver.statistics(), hold=self.hold.statistics(), merge=self.merger.statistics(),
            dedup=self.dedup.statistics(), compress=self.compressor.statistics(),
            encrypt=self.encryptor.statistics(), batch=self.batcher.statistics(), ship=ship,
            writes_in=self._writes, outcomes_in=self._outcomes, payload_bytes_in=self._bytes_in,
            wire_bytes_out=ship.bytes_out, released=self._released, lost=self._lost_n, full=self.full,
        )

    def cg_report(self, wall_ns: int | None = None) -> dict[str, dict[str, Any]]:
        """Per CG: last durable seq, unacked batches, RPO (age of the oldest
        write that left hold but is not durable yet, 0 when none; writes
        still waiting in hold for their outcome are not counted), and the
        byte counts of `CGBytes` (``rpo_bytes``: payload fed and not yet
        released; ``out_bytes_total``: batch bytes the appliance confirmed
        durable; the ratios, None before anything was sealed)."""
        wall_ns = time.time_ns() if wall_ns is None else wall_ns
        out: dict[str, dict[str, Any]] = {cg: {"last_durable_seq": 0, "unacked_batches": 0, "rpo_seconds": 0.0}
                                          for cg in self._cgs}
        oldest = self.batcher.oldest_by_cg()
        for cg, s in self.window.cg_statistics().items():
            out.setdefault(cg, {"rpo_seconds": 0.0}).update(last_durable_seq=s.last_durable_seq,
                                                            unacked_batches=s.unacked_batches)  # (a CG named by resume only)
            if s.oldest_unacked_ns:
                oldest[cg] = s.oldest_unacked_ns  # shipped batches are older than batched ones
        for cg, t in oldest.items():
            out.setdefault(cg, {"last_durable_seq": 0, "unacked_batches": 0})["rpo_seconds"] = max(0.0, (wall_ns - t) / 1e9)
        durable = self.window.durable_bytes
        for cg, c in out.items():
            a = self._acct.get(cg) or CGBytes()
            c.update(rpo_bytes=a.pending, in_bytes_total=a.in_bytes, out_bytes_total=durable.get(cg, 0),
                     compression_ratio=_ratio(a.plain, a.packed), dedup_ratio=_ratio(a.dedup_in, a.dedup_out))
        return out

    def in_bytes(self) -> dict[str, int]:
        """CG → WRITE payload fed from the ring (not from the overflow log) since the start."""
        return {cg: a.in_bytes for cg, a in self._acct.items()}

    def snapshot(self) -> dict[str, Any]:
        """statistics() as plain JSON-able dicts."""
        return asdict(self.statistics())

    # -- internals ---------------------------------------------------------------

    def _drain_merge(self, now_ns: int) -> None:
        merger, dedup, batcher = self.merger, self.dedup, self.batcher
        while (item := merger.pop()) is not None:
            rec, io_ids = dedup.apply(item)
            batcher.add(item.cg, rec, io_ids, now_ns)
            if rec.op == Op.BARRIER:
                batcher.close_cg(item.cg, now_ns)

    def _ship(self, now_ns: int) -> None:
        window, batcher = self.window, self.batcher
        if not batcher.ready_count:
            return  # nothing closed (most calls)
        while window.room and (p := batcher.pop()) is not None:
            window.submit(self.seal(p), p.io_ids, now_ns)

    def seal(self, p: Pending) -> Batch:
        """The batch's encoded records joined → compress → encrypt with the header as AAD."""
        head = p.header()
        plain = p.plain()
        tag, payload = self.compressor.compress(plain)
        a = self._cg_bytes(p.cg)
        a.plain += len(plain)
        a.packed += len(payload)
        # a referenced block is a full 4 KiB block dedup took out of the data
        a.dedup_in += p.data_bytes + p.ref_blocks * BLOCK_SIZE
        a.dedup_out += p.data_bytes
        body = self.encryptor.seal(tag, payload, batch_aad(head))
        # = replace(head, body=body): `dataclasses.replace` costs ~5 µs a batch in Python
        return Batch(head.batch_id, head.cg, head.first_seq, head.last_seq, head.t_first_ns, head.t_last_ns, body)

    def _cg_bytes(self, cg: str) -> "CGBytes":
        a = self._acct.get(cg)
        if a is None:
            a = self._acct[cg] = CGBytes()
        return a

    def _release(self, io_id: int) -> None:
        got = self._payload_ios.pop(io_id, None)
        if got is not None:
            cg, n = got
            if cg is not None:
                self._acct[cg].pending -= n
            self._released += 1
            self._release_cb(io_id)

    def _release_many(self, io_ids: list[int]) -> None:
        """`_release` for every write of a durable batch, in order, with one
        call into the transport when it offers ``release_many``."""
        pop, acct = self._payload_ios.pop, self._acct
        # Every write of the batch still held (the steady case): ``io_ids``
        # itself goes on, no list is built; from the first one not held on,
        # ``out`` collects those that were.
        out: list[int] | None = None
        k = 0
        a_cg = a = None
        for io_id in io_ids:
            got = pop(io_id, None)
            if got is None:
                if out is None:
                    out = io_ids[:k]
                continue
            cg, n = got
            if cg is not None:
                if cg is not a_cg:  # (a batch is one CG's)
                    a_cg, a = cg, acct[cg]
                a.pending -= n
            if out is None:
                k += 1
            else:
                out.append(io_id)
        if out is None:
            out = io_ids
        self._released += len(out)
        if self._release_many_cb is not None:
            self._release_many_cb(out)
        else:
            cb = self._release_cb
            for io_id in out:
                cb(io_id)


    def _lost(self, w: AugmentedWrite) -> None:
        self._lost_n += 1
        self._on_lost_cb(w)


class CGBytes:
    """Byte counts of one CG since the card started (`CardPipeline.cg_report`)."""

    __slots__ = ("pending", "in_bytes", "dedup_in", "dedup_out", "plain", "packed")

    def __init__(self) -> None:
        self.pending = 0  # WRITE payload fed and not yet released (durable, or dropped and marked by its host)
        self.in_bytes = 0  # WRITE payload fed from the ring (the overflow log counts what it diverts)
        self.dedup_in = self.dedup_out = 0  # WRITE payload before / after dedup took known blocks out
        self.plain = self.packed = 0  # encoded batch bytes before / after compression


def _ratio(before: int, after: int) -> float | None:
    """before / after; None before anything was counted."""
    if not before:
        return None
    return round(before / max(after, 1), 4)
