"""The card process: ``nicsplit card run`` → `run_card`.

Theory of operation
===================
One thread, one asyncio loop (uvloop when available), pinned to its own CPU
set (``cpus``; default the last core the process may use). The loop runs:

- the **poller**, a coroutine that busy-polls the transport endpoint
  (``endpoint.poll()``), feeds `CardPipeline` and yields to the loop after
  every round (``await asyncio.sleep(0)``, i.e. call_soon-style cooperative
  polling) so the shipper and the control socket run in between. After
  ``idle_spin_us`` without entries it publishes SLEEPING, fences, re-checks
  (no lost wake-up, see wire/ring.py) and waits on the doorbell fd with
  ``loop.add_reader`` — at most ``sleep_max_ms`` (250 ms, well below the
  host's 2 s staleness bound) or until the next batch/merge deadline;
  it heartbeats the endpoint every round and every wake-up;
- the **shipper** (`nicsplit.card.pipeline.ship.Shipper`): TLS to the
  appliance, Hello/resume, batches out, acks in;
- the **control socket** ``RUN_DIR/card-ctl.sock``: JSON lines;
  ``{"cmd": "stats"}`` → ``{"ok": true, "stats": {"pid", "full",
  "hidden_volume_fill", "cgs": {name: {"last_durable_seq", "unacked_batches",
  "rpo_seconds", "rpo_bytes", "in_bytes_total", "out_bytes_total",
  "in_bytes_per_s", "out_bytes_per_s", "compression_ratio", "dedup_ratio"}},
  "stages":
  {...per-stage statistics...}, "wire": {"bytes_in", "bytes_out"},
  "endpoint": {...}, "appliance": {...}, "overflow": {"bytes", "entries",
  "unread", "fill", "lagging", ...} | null}}``; a CG with writes in the
  overflow log also has ``"lagging": true`` and its RPO counts them. The
  rates are over the last ~10 s (`nicsplit.core.rates`: the poller samples
  the totals every second), so a single request sees a real rate
  (docs/operations.md "Status").

When the pipeline falls behind (hold has no room for what was polled, or the
ring's data area is more than ``overflow_ring_fill`` full) the poller appends
what it polls, in ring order, to the overflow log ``RUN_DIR/card-overflow.log``
and feeds the pipeline from the log's head whenever hold has room; a group
fsync off the loop thread releases the logged writes' ring payloads
(`nicsplit.card.overflow`). Only when the log is full (``overflow_max``), or
when there is none (``overflow_max = 0``) and the pipeline is full, is the
endpoint told ``set_full(True)`` (it refuses writes: the host marks) and the
stats say ``"full": true``; the poller keeps polling (outcomes must get
through). At start, what the log holds is fed before anything polled since.

SIGTERM / SIGINT: stop the poller, take the outcomes still queued in the
transport, close merge windows and open batches, wait up to
``drain_timeout_s`` for the appliance to ack everything committed,
close the endpoint, exit 0. Writes still awaiting an outcome are not
shipped; the host marks whatever the card did not release.

stdout carries exactly one line, ``{"event": "ready", "pid": N, ...}``, once
the endpoint and the control socket exist (the supervisor waits for it).

Config keys (``[card]`` of nicsplit.toml, all optional) — see `CardConfig`
and docs/pipeline.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

from nicsplit.card import fastpath
from nicsplit.card.lostlog import LostLog
from nicsplit.card.sched import collect_when_idle, pin_cpus, quiet_gc, set_priority
from nicsplit.card.overflow import DEFAULT_MAX as OVERFLOW_DEFAULT_MAX, Overflow, OverflowLog
from nicsplit.card.pipeline import CardPipeline, PipelineConfig, Shipper, tls_connector
from nicsplit.card.pipeline.resolve import CardCatalog
from nicsplit.card.transports.base import open_endpoint
from nicsplit.core import ctl
from nicsplit.core.catalog import CatalogReader
from nicsplit.core.config import ConfigError, parse_size
from nicsplit.core.layout import InDataDir
from nicsplit.core.placement import ACKER_CORES, DEDICATED
from nicsplit.core.pki import client_context, load_batch_key
from nicsplit.core.rates import RateWindow
from nicsplit.core.records import AugmentedWrite
from nicsplit.wire.ring import full_fence

log = logging.getLogger(__name__)

_SIZE_KEYS = {"hold_max_bytes", "merge_max_bytes", "batch_bytes", "ship_window_bytes", "overflow_max"}
BUSY_SLEEP_S = 0.05  # the longest doorbell sleep while anything is in flight
# After an entry the worker naps worker_nap_us, then twice, four and eight
# times that (300 ms in all at 20 ms) while nothing comes, then sleeps on the
# doorbell: a paced load is taken in rounds of a nap's worth, and a trickle
# of writes costs a few wake-ups each, not a nap per ms.
NAPS_MAX = 4
# Batches with the fast path in a process of its own (the worker seals; no
# ack waits for it): a batch's fixed costs on the card and the appliance
# (frame, seal, TLS send, journal append, fdatasync) paid once per ~250
# writes instead of ~30. Paced at ~3,800 IOPS, card + appliance CPU per
# write fell by about a third against 256 KiB / 500 us, the RPO did not
# move (docs/benchmarks.md "Bigger batches"). The inline fast path keeps
# PipelineConfig's 256 KiB / 500 us: it seals on its acking thread.
PROCESS_BATCH = {"batch_bytes": 4 << 20, "batch_delay_us": 50_000}
INLINE_BATCH_BYTES_MAX = 256 << 10


@dataclass(frozen=True)
class CardConfig(InDataDir):
    data: Path  # the data directory (DATA/run, DATA/pki, DATA/datastore)
    appliance: str = "127.0.0.1:10810"  # HOST:PORT of the appliance
    server_hostname: str = ""  # TLS name to check; default: the appliance host
    card_id: str = ""  # default "card-<hostname>"
    transport: str = "ring"  # nicsplit.card.transports.base.TRANSPORTS
    transport_options: dict = field(default_factory=dict)  # e.g. {data_size = "64M", sq_entries = 4096}
    cpus: tuple[int, ...] | None = None  # None: the last allowed core; (): no pinning
    idle_spin_us: float = 200  # busy-poll this long after the last entry before sleeping
    # With the fast path in a process of its own (the acker acks; nothing
    # waits for the worker but the RPO), the worker does not spin: after its
    # last entry it naps this long on a timer (then longer, NAPS_MAX), and
    # takes everything that came meanwhile in one round. Spinning and a
    # doorbell ring per write cost more CPU per write than the pipeline at a
    # paced 3,000 IOPS here. 0: spin idle_spin_us, then the doorbell.
    # 20 ms (4 ms before 2026-12-04): at ~4,000 IOPS ~80 writes a round,
    # the worker's CPU per write ~5 us lower. The RPO waits a nap at most
    # (target 1 s); a barrier (a bookmark, verify's re-check, a failover)
    # does not: the acker rings a napping worker for it. See docs/pipeline.md.
    worker_nap_us: float = 20_000
    # Longest doorbell sleep: the heartbeat cadence while idle (the host calls
    # a card stale after 2 s). At 50 ms the idle acker + worker used 1.4% of a
    # core in wake-ups alone; at 250 ms 0.45% (issue 9: <= 1%).
    sleep_max_ms: float = 250
    poll_entries: int = 256  # entries per poll
    tls: bool = True  # False: plain TCP (tests only)
    encrypt: bool = True  # False: cipher "none" (an appliance with a key refuses it)
    heartbeat_s: float = 1.0
    dead_after_s: float = 5.0
    backoff_min_s: float = 0.05
    backoff_max_s: float = 5.0
    drain_timeout_s: float = 10.0
    priority: str = "realtime"  # realtime | high | normal: see set_priority
    overflow_max: int = OVERFLOW_DEFAULT_MAX  # bound of RUN_DIR/card-overflow.log (0: no overflow log)
    overflow_ring_fill: float = 0.5  # divert to the overflow log beyond this fill of the ring's data area
    # The fast path (nicsplit.card.fastpath): "process" acks in a process of
    # its own and runs the pipeline in a worker; "inline" does both on one loop.
    fast_path: str = "process"
    ack_spin_us: float = 50  # the acker polls this long after its last entry before sleeping
    # "shared" (default): the acker shares its core and sleeps on the doorbell
    # ack_spin_us after its last entry. "dedicated": its core is the card's
    # alone, as on a DPU: it polls without sleeping (poll mode) and the worker,
    # host and appliance are kept off it (docs/pipeline.md "A dedicated core").
    acker_core: str = "shared"
    worker_cpus: tuple[int, ...] | None = ()  # (): every allowed core; None: the last one
    worker_priority: str = "normal"  # realtime | high | normal (a real-time worker starves the host)
    worker_restarts_max: int = 5  # worker deaths within a minute before the card gives up
    # Entries between the acker and the worker (power of two). Like the data
    # area, the queue frees only from its oldest unfinished write, so it holds
    # at least what the default 256 MiB data area does (65,536 4 KiB writes
    # and their outcomes), twice over: 2^16 filled first under unpaced load.
    handoff_slots: int = 1 << 18
    pipeline: PipelineConfig = PipelineConfig()

    @property
    def pki_dir(self) -> Path:
        return self.layout.pki

    @classmethod
    def from_mapping(cls, data: Path, m: Mapping[str, Any], *, worker: bool = False) -> "CardConfig":
        """From the ``[card]`` table; pipeline keys sit in the same table.
        ``worker``: the fast path's pipeline worker's own copy (inline, but
        it acks nothing: its batch size is the acker's, already resolved)."""
        own = {f.name for f in fields(cls)} - {"data", "pipeline"}
        pipe = {f.name for f in fields(PipelineConfig)}
        kw: dict[str, Any] = {}
        pkw: dict[str, Any] = {}
        for k, v in m.items():
            if k in _SIZE_KEYS and not (k == "overflow_max" and v in (0, "0")):  # 0: no overflow log
                v = parse_size(v, k)
            if k in own:
                kw[k] = tuple(v) if k in ("cpus", "worker_cpus") and v is not None else v
            elif k in pipe:
                pkw[k] = v
            else:
                raise ConfigError(f"[card] has no key {k!r}")
        opts = dict(kw.get("transport_options", {}))
        if "data_size" in opts:
            opts["data_size"] = parse_size(opts["data_size"], "transport_options.data_size")
        kw["transport_options"] = opts
        if kw.get("fast_path", "process") not in ("process", "inline"):
            raise ConfigError(f"[card] fast_path must be \"process\" or \"inline\", not {kw['fast_path']!r}")
        if kw.get("acker_core", "shared") not in ACKER_CORES:
            raise ConfigError(f"[card] acker_core must be \"shared\" or \"dedicated\", not {kw['acker_core']!r}")
        if kw.get("acker_core") == DEDICATED and kw.get("fast_path", "process") != "process":
            raise ConfigError("[card] acker_core = \"dedicated\" needs fast_path = \"process\" (an inline card "
                              "has no acker of its own)")
        if kw.get("fast_path", "process") == "process":
            pkw = {**PROCESS_BATCH, **pkw}
        elif not worker and pkw.get("batch_bytes", 0) > INLINE_BATCH_BYTES_MAX:
            raise ConfigError(f"[card] batch_bytes {pkw['batch_bytes']} is above {INLINE_BATCH_BYTES_MAX} with "
                              "fast_path = \"inline\" (sealing a batch there holds every ack: ~0.5 ms for 256 KiB)")
        return cls(data=Path(data), pipeline=PipelineConfig.from_mapping(pkw), **kw)

    @classmethod
    def load(cls, cfg: Any) -> "CardConfig":
        """From a `nicsplit.core.config.Config`."""
        return cls.from_mapping(cfg.data, cfg.raw.get("card", {}))


class DatastoreCatalog:
    """A `CardCatalog` read from ``DATA/datastore/catalog.json`` through
    `nicsplit.core.catalog`: a vdisk's CG is its ``extra["cg"]``; a vdisk
    without a CG is its own group, named after it. ``refresh()`` re-reads the
    file only when its stamp changed; no file yet (or any more) keeps the map."""

    def __init__(self, datastore_dir: Path) -> None:
        self._reader = CatalogReader(datastore_dir)
        self._map: dict[int, tuple[str, str, int]] = {}
        self.refresh()

    def refresh(self) -> None:
        if self._reader.stamp() is None or not self._reader.refresh():
            return
        self._map = {v.id: (v.cg or v.name, v.name, v.size) for v in self._reader.vdisks()}

    def lookup(self, vdisk_id: int) -> tuple[str, str, int] | None:
        return self._map.get(vdisk_id)

    def cg_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(cg for cg, _, _ in self._map.values()))


class CardProcess:
    """The running card: poller + shipper + control socket around one pipeline.
    Built by `run_card`; tests may build it with a fake endpoint and connector."""

    def __init__(
        self,
        cfg: CardConfig,
        endpoint: Any,
        catalog: CardCatalog,
        *,
        key: bytes | None,
        connect: Callable | None = None,
        on_lost: Callable[[AugmentedWrite], None] | None = None,
        track_unshipped: bool = False,
    ) -> None:
        self.cfg = cfg
        self.endpoint = endpoint
        fill = getattr(endpoint, "fill", None)
        self._fill: Callable[[], float] = fill if callable(fill) else (lambda: 0.0)
        # (cg_id, cg_seq) of writes the transport refused: filled by its poll, emptied by `CardPipeline.skip`
        self._skipped: list[tuple[int, int]] = getattr(endpoint, "skipped", None)
        if self._skipped is None:
            self._skipped = []
        # (cg_id, cg_seq, vdisk_id, offset, length) of acked writes it found unshippable: `CardPipeline.open_gaps`
        self._gaps: list[tuple[int, int, int, int, int]] = getattr(endpoint, "gaps", None)
        if self._gaps is None:
            self._gaps = []
        self.catalog = catalog
        self._lost_log = LostLog(cfg.layout.card_lost_log) if on_lost is None and cfg.run_dir.is_dir() else None
        # io id -> (vdisk id, offset, length) of writes fed from the transport
        # and not released yet, when this process owns the transport
        # (fast_path = "inline", ring or nvme-pi): a stop that cannot
        # drain logs them to the lost log, as the ring acker does for its
        # worker's (`nicsplit.card.fastpath`); else the host, stopped first,
        # would never mark writes it was told were safe (P1).
        self._unshipped: dict[int, tuple[int, int, int]] | None = (
            {} if track_unshipped and self._lost_log is not None else None)
        self.overflow: Overflow | None = None
        if cfg.overflow_max > 0:
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            self.overflow = Overflow(OverflowLog(cfg.layout.card_overflow, cfg.overflow_max),
                                     release_ring=endpoint.release, ring_fill=cfg.overflow_ring_fill,
                                     cg_name=self._cg_of)
        self._sync_fut: asyncio.Future | None = None
        self.pipeline = CardPipeline(catalog, release=self._release, on_lost=on_lost or self._default_lost,
                                     key=key, config=cfg.pipeline, release_many=self._release_many)
        if callable(getattr(catalog, "cg_names", None)):
            self.pipeline.add_cgs(catalog.cg_names())
        if connect is None:
            host, _, port = cfg.appliance.rpartition(":")
            host = host.strip("[]") or "127.0.0.1"
            ctx = None
            if cfg.tls:
                ctx = client_context(cfg.pki_dir, "card")
            connect = tls_connector(host, int(port), ctx, cfg.server_hostname or host)
        self.shipper = Shipper(
            self.pipeline.window, connect=connect, card_id=cfg.card_id or f"card-{socket.gethostname()}",
            cgs=self._hello_cgs, heartbeat_s=cfg.heartbeat_s, dead_after_s=cfg.dead_after_s,
            backoff_min_s=cfg.backoff_min_s, backoff_max_s=cfg.backoff_max_s,
        )
        self.lost: list[AugmentedWrite] = []  # only with the default on_lost (bounded below)
        if self._lost_log is not None and hasattr(endpoint, "on_refused"):
            endpoint.on_refused = self._refused
        self._stop = asyncio.Event()
        self._napping: asyncio.Future | None = None  # the doorbell wait's future while the worker naps or sleeps
        self._full = False
        self._polls = self._entries = self._sleeps = self._doorbells = self._empty_ns = self._naps = self._naps_cut = 0
        self._rates = RateWindow(span_s=10.0, every_s=1.0)  # throughput for status, sampled by the poller

    def _hello_cgs(self) -> tuple[str, ...]:
        if callable(getattr(self.catalog, "refresh", None)):
            self.catalog.refresh()
        if callable(getattr(self.catalog, "cg_names", None)):
            self.pipeline.add_cgs(self.catalog.cg_names())
        return self.pipeline.cgs()

    def _release(self, io_id: int) -> None:
        """The pipeline is done with a write: a write fed from the overflow
        log gave its ring payload back when it was logged."""
        ovf = self.overflow
        if self._unshipped is not None:
            self._unshipped.pop(io_id, None)
        if ovf is None or not ovf.release(io_id):
            self.endpoint.release(io_id)

    def _release_many(self, io_ids: list[int]) -> None:
        """`_release` for a durable batch's writes: the ring's in one call."""
        ovf = self.overflow
        un = self._unshipped
        if un is not None:
            for io_id in io_ids:
                un.pop(io_id, None)
        if ovf is not None:
            io_ids = ovf.release_many(io_ids)
        many = getattr(self.endpoint, "release_many", None)
        if many is not None:
            many(io_ids)
        else:
            for io_id in io_ids:
                self.endpoint.release(io_id)

    def _cg_of(self, vdisk_id: int) -> str | None:
        r = self.catalog.lookup(vdisk_id)
        return None if r is None else r[0]

    def _start_sync(self) -> None:
        """Group fsync of the overflow log off the loop thread; its writes'
        ring payloads are released when it is done (`Overflow.synced`)."""
        ovf = self.overflow
        if ovf is not None and self._sync_fut is None and ovf.start_sync():
            self._sync_fut = asyncio.get_running_loop().run_in_executor(None, ovf.log.sync)
            self._sync_fut.add_done_callback(self._synced)

    def _synced(self, fut: asyncio.Future) -> None:
        self._sync_fut = None
        assert self.overflow is not None
        self.overflow.synced(OSError("fsync cancelled") if fut.cancelled() else fut.exception())
        self._start_sync()  # the group that gathered meanwhile

    def _refused(self, io_id: int, vdisk_id: int, offset: int, length: int, reason: str) -> None:
        """A write the card refused: its host may have answered the client
        already (a late write) and die before it hears the refusal, so the
        region goes to the lost log the host reads at its next start."""
        assert self._lost_log is not None
        self._lost_log.append(io_id, vdisk_id, offset, length, f"card refused it ({reason})")

    def _default_lost(self, w: AugmentedWrite) -> None:
        log.warning("io %d lost: vdisk %d %d+%d must be resynced", w.io_id, w.vdisk_id, w.voffset, w.length)
        if self._lost_log is not None:
            # Before the pipeline releases it: the host reads this log after
            # the released watermark, so it never forgets an unshipped write.
            self._lost_log.append(w.io_id, w.vdisk_id, w.voffset, w.length, "card could not ship it")
        if len(self.lost) < 65536:
            self.lost.append(w)

    def stop(self) -> None:
        self._stop.set()
        if self._napping is not None and not self._napping.done():
            self._napping.set_result(None)  # a stop does not wait out a nap or a doorbell sleep

    # -- the poller --------------------------------------------------------------

    async def poll_loop(self) -> None:
        spin_ns = int(self.cfg.idle_spin_us * 1000)
        now = time.monotonic_ns
        idle_since = now()
        sleep = asyncio.sleep
        poll_once = self.poll_once
        batcher = self.pipeline.batcher
        nap_ns = int(self.cfg.worker_nap_us * 1000)
        set_napping = getattr(self.endpoint, "set_napping", None) if nap_ns > 0 else None
        if set_napping is not None:
            spin_ns = 0  # nap at once: the acker acks, nothing here waits for us
        naps = NAPS_MAX  # consecutive empty naps
        nap = self._take_nap
        while not self._stop.is_set():
            t0, closed = now(), batcher.next_id
            busy, t = poll_once()
            if busy:
                idle_since = t
                naps = 0
                # Took everything there was: nap at once (the coalescing
                # window) instead of an empty round first, so a paced load
                # costs one round per nap, not two.
                if set_napping is not None and await nap(set_napping, t, nap_ns):
                    continue
            else:
                if closed == batcher.next_id:
                    # Nothing came and no batch closed (by delay): what a
                    # spinning DPU core spends anyway, reported apart from
                    # the card's work per write.
                    self._empty_ns += now() - t0
                if set_napping is not None and naps < NAPS_MAX and await nap(set_napping, t, nap_ns << naps):
                    naps += 1
                    continue
                if t - idle_since >= spin_ns:
                    woken = await self._sleep(t)
                    # A wake-up by timeout with nothing to do sleeps again at
                    # once: spinning after each one cost an idle card 19% of a core.
                    idle_since = now() if woken else now() - spin_ns
                    continue
            await sleep(0)

    async def _take_nap(self, set_napping, t: int, ns: int) -> bool:
        """Nap ``ns`` from ``t`` unless work is there; True if it napped.
        NAPPING is published before the last look for work (Dekker, as
        `_sleep` does): an entry handed over before NAPPING was visible is
        taken by another round now, one after it sees NAPPING (a BARRIER
        rings, cutting the nap short; `naps_cut`)."""
        if self._more_now():  # the common case, without publishing NAPPING
            return False
        set_napping(t + ns)
        full_fence()
        if self._more_now():
            set_napping(0)
            return False
        collect_when_idle(True)  # the middle generation too: a busy worker may never reach _sleep
        fd_of = getattr(self.endpoint, "doorbell_fd", None)
        try:
            if await self._wait_doorbell(fd_of() if callable(fd_of) else None, ns / 1e9):
                self._naps_cut += 1
        finally:
            set_napping(0)
        self._naps += 1
        return True

    async def _wait_doorbell(self, fd: int | None, timeout: float) -> bool | None:
        """Wait until the doorbell ``fd`` rings (True), ``timeout`` s pass
        (False) or the card stops (None); the doorbell is cleared after."""
        loop = asyncio.get_running_loop()
        woke = self._napping = loop.create_future()
        timer = loop.call_later(timeout, lambda: woke.done() or woke.set_result(False))
        if fd is not None:
            loop.add_reader(fd, lambda: woke.done() or woke.set_result(True))
        try:
            return await woke
        finally:
            self._napping = None
            timer.cancel()
            if fd is not None:
                loop.remove_reader(fd)
                try:
                    os.eventfd_read(fd)  # clear the doorbell (nonblocking eventfd)
                except (BlockingIOError, OSError):
                    pass

    def _more_now(self) -> bool:
        """Work a round could take at once: entries already queued by the
        acker, or the overflow log feeding the pipeline."""
        ovf = self.overflow
        if ovf is not None and ovf.active:
            return True
        pending = getattr(self.endpoint, "pending", None)
        return bool(pending()) if callable(pending) else True

    def poll_once(self) -> tuple[bool, int]:
        """One round of the poller (no waiting): poll the transport, feed or
        divert what came, tick the pipeline. Returns (whether anything came
        in, from the ring or the overflow log; the card clock it used)."""
        ep, p, ovf = self.endpoint, self.pipeline, self.overflow
        entries = ep.poll(self.cfg.poll_entries)
        t = time.monotonic_ns()
        self._polls += 1
        busy = False
        if entries:
            self._entries += len(entries)
            busy = True
        else:
            collect_when_idle(False)
        self._take(entries, t)
        if ovf is not None and ovf.active and ovf.feed(p, t):
            busy = True
        p.tick(t)
        ep.heartbeat()
        self._report_full()
        if self._rates.due(t / 1e9):
            self._rates.sample(t / 1e9, self._totals())
        return busy, t

    def _take(self, entries: list, t: int) -> None:
        """Feed what the transport polled to the pipeline, or divert it into
        the overflow log (in ring order, behind what the log holds) while the
        pipeline is behind; then skip the seqs the transport refused."""
        p, ovf = self.pipeline, self.overflow
        if entries:
            if ovf is not None and ovf.behind(p, entries, self._fill()):
                ovf.divert(entries, p, t)
                self._start_sync()
            else:
                if ovf is not None:
                    ovf.fed_direct(entries)  # before feeding: a write dropped at once is released in it
                un = self._unshipped
                if un is not None:
                    for e in entries:
                        if type(e) is AugmentedWrite:
                            un[e.io_id] = (e.vdisk_id, e.voffset, e.length)
                p.feed(entries, t)
        if self._gaps:  # before their seqs are skipped: nothing after them leaves hold unflagged
            p.open_gaps(self._gaps)
        if self._skipped:
            p.skip(self._skipped, t)

    def _report_full(self) -> None:
        """Refuse writes only when nothing can take them: the pipeline is
        full and there is no overflow log, or the log is full (or failed)."""
        full = self.pipeline.full if self.overflow is None else self.overflow.full
        if full != self._full:
            self._full = full
            log.warning("card %s", ("full: writes will be refused until the appliance catches up" if full
                                    else "no longer full"))
            set_full = getattr(self.endpoint, "set_full", None)
            if callable(set_full):
                set_full(full)

    async def _sleep(self, now_ns: int) -> bool:
        """Doorbell sleep with notification suppression; returns on a ring,
        a deadline, or after sleep_max_ms: True if work may be waiting."""
        ep = self.endpoint
        timeout = self.cfg.sleep_max_ms / 1000
        ovf = self.overflow
        p = self.pipeline
        if self._full or p.hold.held or not p.drained() or (ovf is not None and ovf.active):
            # work in flight (appliance acks free room; the overflow log feeds
            # hold; full is cleared by this loop): look again soon
            timeout = min(timeout, BUSY_SLEEP_S)
        deadline = self.pipeline.batcher.next_deadline_ns()
        if deadline is not None:
            timeout = min(timeout, max(0.0, (deadline - now_ns) / 1e9))
        if self.pipeline.merger.enabled and self.pipeline.merger.statistics().open_windows:
            timeout = min(timeout, self.pipeline.merger.window_ns / 1e9)
        fd_of = getattr(ep, "doorbell_fd", None)
        if not callable(fd_of) or not callable(getattr(ep, "pending", None)):
            if timeout <= 0:
                await asyncio.sleep(0)
                return True
            return bool(await asyncio.get_running_loop().run_in_executor(None, ep.wait_doorbell, timeout))
        collect_when_idle(True)  # before SLEEPING: a ring now waits for the poll, not for the collector
        ep.set_sleeping(True)
        full_fence()  # SLEEPING visible before we re-read the tail (Dekker; wire/ring.py)
        if ep.pending() or timeout <= 0:
            ep.set_sleeping(False)
            await asyncio.sleep(0)
            return True
        self._sleeps += 1
        try:
            rang = await self._wait_doorbell(fd_of(), timeout)
        finally:
            ep.set_sleeping(False)
            ep.heartbeat()
        if rang:
            self._doorbells += 1
        return bool(rang) or ep.pending()

    # -- control socket ------------------------------------------------------------

    def _totals(self) -> dict[str, int]:
        """Throughput counters by ``in:CG`` / ``out:CG`` (`RateWindow` keys):
        WRITE payload the card took from the ring (fed straight to the
        pipeline or diverted to the overflow log), batch bytes durable."""
        out: dict[str, int] = {f"in:{cg}": n for cg, n in self.pipeline.in_bytes().items()}
        if self.overflow is not None:
            for cg, n in self.overflow.in_bytes_by_cg().items():
                out[f"in:{cg}"] = out.get(f"in:{cg}", 0) + n
        for cg, n in self.pipeline.window.durable_bytes.items():
            out[f"out:{cg}"] = n
        return out

    def stats(self) -> dict[str, Any]:
        st = self.pipeline.statistics()
        ep_stats = self.endpoint.statistics() if callable(getattr(self.endpoint, "statistics", None)) else None
        ovf = self.overflow
        wall = time.time_ns()
        cgs = self.pipeline.cg_report(wall)
        if ovf is not None and ovf.in_use:
            for cg, t in ovf.oldest_by_cg().items():  # writes still unread in the overflow log are not protected
                c = cgs.setdefault(cg, {"last_durable_seq": 0, "unacked_batches": 0, "rpo_seconds": 0.0})
                c["rpo_seconds"] = max(c.get("rpo_seconds", 0.0), (wall - t) / 1e9)
            for cg, n in ovf.unread_bytes_by_cg().items():  # acked, logged, not yet in the pipeline
                c = cgs.setdefault(cg, {"last_durable_seq": 0, "unacked_batches": 0, "rpo_seconds": 0.0})
                c["rpo_bytes"] = c.get("rpo_bytes", 0) + n
            for c in cgs.values():
                c["lagging"] = c.get("rpo_seconds", 0.0) > 0
        totals = self._totals()
        rates = self._rates.rates(time.monotonic_ns() / 1e9, totals)
        for cg, c in cgs.items():
            c.setdefault("rpo_bytes", 0)
            c.setdefault("out_bytes_total", 0)
            c.setdefault("compression_ratio", None)
            c.setdefault("dedup_ratio", None)
            c.update(in_bytes_total=totals.get(f"in:{cg}", 0), in_bytes_per_s=rates.get(f"in:{cg}", 0.0),
                     out_bytes_per_s=rates.get(f"out:{cg}", 0.0))
        fill = getattr(self.endpoint, "fill", None)
        return {
            "hidden_volume_fill": round(fill(), 6) if callable(fill) else None,
            "pid": getattr(self.endpoint, "card_pid", os.getpid()),  # the acker's, with a fast path process
            "worker_pid": os.getpid(),
            "full": st.full if ovf is None else ovf.full,
            "cgs": cgs,
            "overflow": None if ovf is None else ovf.statistics(),
            "stages": {k: ctl.jsonable(getattr(st, k)) for k in
                       ("resolve", "hold", "merge", "dedup", "compress", "encrypt", "batch", "ship")},
            "writes_in": st.writes_in, "outcomes_in": st.outcomes_in, "released": st.released, "lost": st.lost,
            "payload_bytes_in": st.payload_bytes_in,
            "wire": {"bytes_out": st.wire_bytes_out, "bytes_in": self.shipper.bytes_in},
            "appliance": {"connected": st.ship.connected, "id": self.shipper.appliance_id,
                          "last_error": self.shipper.last_error},
            "endpoint": ctl.jsonable(ep_stats),
            "poller": {"polls": self._polls, "entries": self._entries, "sleeps": self._sleeps,
                       "doorbell_wakeups": self._doorbells, "empty_poll_s": self._empty_ns / 1e9,
                       "naps": self._naps, "naps_cut": self._naps_cut},
        }

    async def _ctl_request(self, req: dict) -> dict:
        if req.get("cmd") == "stats":
            return {"ok": True, "stats": self.stats()}
        return {"ok": False, "error": "unknown command (known: stats)"}

    # -- lifecycle -------------------------------------------------------------------

    async def run(self, *, ready: Callable[[dict], None] | None = None) -> int:
        ctl_path = self.cfg.layout.card_ctl_sock
        server = await ctl.serve(ctl_path, self._ctl_request, mode=0o600)
        ship_task = asyncio.create_task(self.shipper.run(), name="card-shipper")
        poll_task = asyncio.create_task(self.poll_loop(), name="card-poller")
        if ready:
            ready({"event": "ready", "pid": os.getpid(), "control": str(ctl_path)})
        stop_task = asyncio.create_task(self._stop.wait(), name="card-stop")
        try:
            done, _ = await asyncio.wait({ship_task, poll_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            for t in done & {ship_task, poll_task}:
                t.result()  # a crashed task is a crashed card: raise it
            self._stop.set()
            await poll_task
            await self._drain()
        finally:
            self._stop.set()
            self.shipper.stop()
            for t in (ship_task, poll_task, stop_task):
                t.cancel()
            for t in (ship_task, poll_task, stop_task):
                try:
                    await t
                except asyncio.CancelledError:
                    pass
            server.close()
            await server.wait_closed()
            try:
                ctl_path.unlink()
            except FileNotFoundError:
                pass
            while self._sync_fut is not None:
                await asyncio.wait([self._sync_fut])
                await asyncio.sleep(0)  # let its done callback run
            if self.overflow is not None:
                self.overflow.log.close()
        return 0

    async def _drain(self) -> None:
        """Ship what is committed; wait (bounded) for its durable acks."""
        p, ep = self.pipeline, self.endpoint
        deadline = time.monotonic() + self.cfg.drain_timeout_s
        # Outcomes already in the transport decide what is committed (the
        # supervisor stops the host first, so nothing new arrives).
        ovf = self.overflow
        for _ in range(10_000):
            entries = ep.poll(self.cfg.poll_entries)
            if not entries:
                break
            self._take(entries, time.monotonic_ns())
        if ovf is not None:
            while self._sync_fut is not None:
                await asyncio.wait([self._sync_fut])
                await asyncio.sleep(0)  # let its done callback run
            ovf.sync_now()  # what the log holds is replayed at the next start
        p.drain(time.monotonic_ns())
        while not p.drained() and time.monotonic() < deadline:
            ep.heartbeat()
            p.drain(time.monotonic_ns())
            await asyncio.sleep(0.01)
        st = p.statistics()
        if p.drained():
            log.info("card drained: everything committed is durable at the appliance")
        else:
            un = self._unshipped
            log.warning("card stopping with %d unacked batches and %d writes in hold; %s",
                        st.ship.unacked, st.hold.held,
                        f"{len(un)} unshipped writes go to the lost log (the host marks them at its next start)"
                        if un is not None else "the host marks them")
            if un is not None:
                assert self._lost_log is not None
                for io_id, (vdisk_id, offset, length) in un.items():
                    self._lost_log.append(io_id, vdisk_id, offset, length, "the card stopped before the appliance held it")
                un.clear()


async def run_card(
    cfg: CardConfig | Mapping[str, Any] | Any,
    *,
    endpoint: Any = None,
    catalog: CardCatalog | None = None,
    on_lost: Callable[[AugmentedWrite], None] | None = None,
    connect: Callable | None = None,
    install_signals: bool = True,
) -> int:
    """The card main. ``cfg``: a `CardConfig`, a `nicsplit.core.config.Config`
    (its ``[card]`` table), or a mapping with ``data`` plus ``[card]`` keys.
    ``endpoint`` (any `CardEndpoint`), ``catalog`` (any `CardCatalog`),
    ``on_lost`` and ``connect`` override the defaults (ring transport,
    DATA/datastore catalog, log-and-remember, TLS to ``appliance``)."""
    if not isinstance(cfg, CardConfig):
        if isinstance(cfg, Mapping):
            m = dict(cfg)
            cfg = CardConfig.from_mapping(Path(m.pop("data")), m)
        else:
            cfg = CardConfig.load(cfg)
    cpus = pin_cpus(cfg.cpus)
    priority = set_priority(cfg.priority)
    quiet_gc()
    key = None
    if cfg.encrypt:
        key = load_batch_key(cfg.pki_dir)
    if catalog is None:
        catalog = DatastoreCatalog(cfg.layout.datastore)
    own_endpoint = endpoint is None
    if own_endpoint:
        opts = dict(cfg.transport_options)
        if cfg.transport == "shadow":  # the emulated device writes the datastore's volumes; orphans at hold's timeout
            opts.setdefault("volume_dir", str(cfg.layout.datastore))
            opts.setdefault("match_timeout_ms", cfg.pipeline.outcome_timeout_ms)
        endpoint = open_endpoint(cfg.transport, str(cfg.run_dir), **opts)
    card = CardProcess(cfg, endpoint, catalog, key=key, connect=connect, on_lost=on_lost, track_unshipped=own_endpoint)
    loop = asyncio.get_running_loop()
    if install_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, card.stop)

    def ready(info: dict) -> None:
        info["cpus"] = list(cpus)
        info["priority"] = priority  # never the hidden volume's path or UID: only the splitter learns them (P6)
        sys.stdout.write(json.dumps(info) + "\n")
        sys.stdout.flush()

    try:
        return await card.run(ready=ready)
    finally:
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        if own_endpoint:
            endpoint.close()


def main(cfg: Any) -> int:
    """Synchronous entry for the CLI (``nicsplit card run``)."""
    if isinstance(cfg, CardConfig) and cfg.fast_path == "process" and cfg.transport in ("ring", "nvme-pi", "shadow"):
        return fastpath.main(cfg)
    try:
        # The entry point alone picks the loop: CardProcess and run_card run
        # on whatever loop their caller (a test, an embedder) already has.
        import uvloop

        return uvloop.run(run_card(cfg))
    except ImportError:
        return asyncio.run(run_card(cfg))
