"""The appliance's ingest server: authenticated cards in, durable acks out.

Theory of operation
===================
One asyncio (uvloop) server; per connection three tasks in a TaskGroup::

    reader:    TLS bytes -> FrameDecoder -> bounded queue (depth queue_depth)
    processor: queue -> Hello / Batch handling -> Ack frames
    heartbeat: a Heartbeat frame every heartbeat_interval seconds

A batch is handled off the event loop, in the journal worker pool:
unseal (AES-256-GCM with ``batch_aad``, then zstd) → ``decode_wire_records`` →
``Journal.append_batch`` (write + fdatasync) → the processor sends
``Ack(durable=True, known=<fingerprints of the data blocks stored>)``.
Moving the whole step to a thread keeps the loop free for heartbeats and
other connections while a 16 MiB batch decrypts and an fsync takes
milliseconds; a per-CG asyncio lock keeps one CG's batches in order even
across connections.

Rules
-----
1. TLS 1.3 with mutual certificates signed by our CA only (`control.pki`).
   We accept raw sockets and run the handshake ourselves
   (``loop.connect_accepted_socket(ssl=...)``) so a refused certificate is
   logged with the peer address and reason (asyncio's own TLS server drops
   handshake failures silently).  The peer's CN must be in ``peers``.
2. The first frame must be Hello with our PROTOCOL_VERSION; the reply is
   HelloAck(resume = last durable seq per CG accepted).  A CG is refused on
   its own, never the session: a name that breaks `nicsplit.core.names`, or a
   journal that cannot be opened, or a CG without a journal that this
   appliance does not know (not in ``cgs.json`` nor the catalog, both under
   its data directory) once ``max_unknown_cgs`` journals of unknown CGs
   exist (a Hello cannot create journals without bound), is logged and left
   out of ``resume``, and
   the card ships every other CG (one bad CG never blocks the others).  A
   batch for a CG not accepted in Hello, a second Hello, or any
   appliance-bound frame type that a card must not send is a protocol error.
3. Anything malformed, unauthenticated or undecryptable: the reason is
   logged, an Error frame is sent where possible, the connection is dropped,
   and nothing of that batch is journaled (append happens after unseal and
   decode succeeded, and is itself all-or-nothing via COMMIT).
4. Backpressure: the reader stops reading while the queue is full, so one
   connection buffers at most ``queue_depth`` batches (4 x 16 MiB).
5. A journal write failure is fatal for the process (durable.py rule 4): the
   connection gets Error(INTERNAL), the server stops and exits non-zero; the
   restart recovers the journal.
6. At start every existing journal is opened (recovered) before the ready
   line: torn tails are cut, a corrupt journal aborts the start.
7. SIGTERM / SIGINT: stop accepting, stop reading, let each connection finish
   the batch it is processing (ack it), tell the card Error(SHUTDOWN), exit 0.
8. Distribution (`nicsplit.recovery.distribution`): one thread per CG
   applies the journal to the CG's replica images behind ingest.  A group
   commit only *wakes* it (`CGDistribution.notify`, after the sync, outside
   the per-CG lock); it reads committed, durable records on its own and never
   takes the per-CG lock, so ingest never waits for it.  The CG's block
   index (what distribution, and later image access, work from) is built
   when the journal opens and refreshed by the ingest worker after each group
   commit, under the CG's lock: then no append extends or rolls a segment
   while the scan reads it.  After the fdatasync ingest offers the group's
   payloads to it (`PayloadHandoff`, distribution.py rule 7).
9. Control socket ``DATA/run/appliance.sock`` (JSON lines, like the host's):
   ``{"cmd": "status"}`` → per CG ``durable_seq`` and ``distribution`` (applied
   seq, lag in records and seconds, state); ``{"cmd": "wake", "cg": CG}``
   makes a CG's distribution look at once for a failover request;
   ``{"cmd": "ping"}``.
10. Retention (`nicsplit.recovery.trimmer`): every ``[retention] interval``
   each CG's oldest segments are folded into base images and deleted per the
   policy; the last report is in ``status`` (``retention``).
11. Image access (`nicsplit.recovery.imagehost`): ``image-export`` /
   ``image-close`` on the control socket serve a CG at a PIT over NBD from
   the block index kept current here, so an export needs no journal scan.
12. Group commit window: a connection's processor takes a CG's batch, then
   every batch of the same CG already queued or arriving within
   ``commit_window_us`` (default `COMMIT_WINDOW_US`, ``[appliance]
   commit_window_us``; 0: only what is queued), at most `MAX_GROUP`; the
   worker appends each with one write, then fdatasyncs the CG's segment once
   (one more only where a batch rolled to a new segment) and only then are
   they acked, in order.  CGs share nothing but the worker pool: each CG's
   journal is its own file, so a commit never waits for another CG's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import signal
import socket
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from nicsplit.appliance.idlewatch import IdleWatch
from nicsplit.appliance.startup import StartProgress, appliance_id, serving_gc, recover_journal
from nicsplit.core import failpoints as _fp
from nicsplit.recovery.distribution import NICE, CatalogMembers, CGDistribution, journaled_payloads
from nicsplit.journal.writer import AppendResult, BatchRejected, Journal, JournalError, JournalStatistics
from nicsplit.recovery.pits import PitError
from nicsplit.recovery.blockindex import BlockIndex
from nicsplit.recovery.imagehost import ApplianceImages, ImageRequestError
from nicsplit.recovery.retention import Policy
from nicsplit.recovery.trimmer import Trimmer
from nicsplit.core import ctl, pki
from nicsplit.core.catalog import CatalogReader, DatastoreError
from nicsplit.core.cgs import CGCatalog, CGError
from nicsplit.core.names import check_name, is_name, BadName
from nicsplit.core.layout import InDataDir
from nicsplit.wire import envelope, frames as F
from nicsplit.wire.wirerecords import decode_wire_records

_FP = _fp.ACTIVE  # armed failpoints (nicsplit.core.failpoints): empty unless a test arms some

log = logging.getLogger("nicsplit.appliance")

_EOF = object()

# Group commit (rule 12): an fdatasync costs ~0.3 ms of CPU here (an ext4
# journal commit), more than appending a small batch. A card with the inline
# fast path closes a batch of ~5 writes every 0.5 ms at 10,000 writes/s
# (batch_delay_us; the default fast path's batches are 4 MiB / 50 ms, and
# several cards share a CG's journal). Waiting up to 2 ms for the next
# batches makes one fdatasync serve ~4 of them; the
# card acks the host without waiting for us, so this only delays its release
# of the batch (RPO, by at most the window), never a write's completion.
COMMIT_WINDOW_US = 2000
MAX_GROUP = 64  # batches per group commit (at most 64 x 16 MiB in flight: the card's ship window)


@dataclass
class ServerConfig(InDataDir):
    data: Path  # the data directory; journals in data/appliance/journal/<cg>
    listen: tuple[str, int] = ("127.0.0.1", 10810)
    pki_dir: Path | None = None  # default data/pki
    identity: str = "appliance"  # our certificate in pki_dir
    peers: tuple[str, ...] = ("card",)  # accepted client certificate CNs: only cards ship batches
    encryption: bool = True  # require AES-256-GCM batches (batch.key); False: plaintext bodies only
    segment_size: int = 64 * 1024 * 1024
    heartbeat_interval: float = 5.0
    idle_timeout: float = 30.0  # drop a peer silent this long (6 missed heartbeats)
    handshake_timeout: float = 10.0
    queue_depth: int = 16
    commit_window_us: int = COMMIT_WINDOW_US  # rule 12: how long a group commit waits for more batches
    journal_threads: int = 4
    distribution: bool = True  # apply journals to replica images in the background (rule 8)
    distribution_nice: int = NICE  # how much lower the distribution threads run than ingest (0: as high)
    retention: Policy | None = None  # rule 10; None: keep everything
    dedup_min_age_s: float = 1200.0  # retention keeps segments appended this recently (2x the card's horizon)
    datastore_dir: Path | None = None  # the catalog (vdisk ids, names, sizes); default data/datastore
    max_unknown_cgs: int = 64  # journals a Hello may create for CGs not in cgs.json or the catalog (rule 2)

    @property
    def catalog_dir(self) -> Path:
        return self.datastore_dir or self.layout.datastore

    @property
    def journal_root(self) -> Path:
        return self.layout.journals


@dataclass(frozen=True, slots=True)
class ApplianceStatistics:
    connections: int  # open now
    accepted: int  # connections that completed TLS and the CN check
    refused: int  # TLS or CN failures
    dropped: int  # connections dropped for a protocol / auth / batch error
    batches: int  # batches acknowledged (applied or duplicate)
    duplicates: int
    bytes_in: int  # sealed batch body bytes received
    cgs_refused: int  # CGs a Hello named that were left out of resume (rule 2)
    group_commits: int  # fdatasyncs that made one or more batches durable
    journals: dict[str, JournalStatistics] = field(default_factory=dict)


class _Drop(Exception):
    """End this connection: ``code`` None means no Error frame is sent."""

    def __init__(self, reason: str, code: int | None, *, level: int = logging.WARNING) -> None:
        super().__init__(reason)
        self.reason, self.code, self.level = reason, code, level


class Appliance:
    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.pki_dir = cfg.pki_dir or cfg.layout.pki
        self.ssl = pki.server_context(self.pki_dir, cfg.identity)
        self.key = pki.load_batch_key(self.pki_dir) if cfg.encryption else None
        self.id = appliance_id(cfg.data)
        self.journals: dict[str, Journal] = {}
        self._cg_locks: dict[str, asyncio.Lock] = {}
        self._open_lock = asyncio.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(cfg.journal_threads, thread_name_prefix="journal")
        self._index_pool = concurrent.futures.ThreadPoolExecutor(cfg.journal_threads, thread_name_prefix="index")
        self._conns: set[_Connection] = set()
        self._handlers: set[asyncio.Task] = set()  # one per accepted TCP connection
        self._stopping = asyncio.Event()
        self.distribution: dict[str, CGDistribution] = {}
        self.indexes: dict[str, BlockIndex] = {}  # per CG, refreshed after each group commit (rule 8)
        self.trimmers: dict[str, Trimmer] = {}
        self.images = ApplianceImages(cfg.data, cfg.journal_root)  # image access from our index (rule 11)
        self.fatal: str | None = None
        self._counts = dict(accepted=0, refused=0, dropped=0, batches=0, duplicates=0, bytes_in=0, cgs_refused=0,
                            group_commits=0)

    # -- lifecycle --------------------------------------------------------------------

    async def serve(self, ready: Callable[[dict], None] | None = None) -> int:
        """Run until SIGTERM / SIGINT or a fatal journal error; returns the
        process exit status (0 clean, 1 fatal)."""
        loop = asyncio.get_running_loop()
        self.cfg.journal_root.mkdir(parents=True, exist_ok=True)
        # Recover every existing journal before accepting anyone: a torn tail
        # is cut now, a corrupt journal stops the start with a clear error.
        async with StartProgress(ready) as progress:  # a long recovery says so (appliance.startup)
            for d in sorted(self.cfg.journal_root.iterdir()):
                if d.is_dir() and is_name(d.name):  # the one name rule: also a safe directory name
                    progress.step = f"recovering journal {d.name}"
                    j = await loop.run_in_executor(self._pool, recover_journal, d, self.cfg.segment_size)
                    self.journals[d.name] = j
                    self._cg_locks[d.name] = asyncio.Lock()
                    log.info("journal %s recovered: last seq %d", d.name, j.last_seq)
                    progress.step = f"indexing journal {d.name}"
                    await loop.run_in_executor(self._pool, self._build_index, d.name)
                    self._distribute(d.name, j)
        serving_gc()
        lsock = socket.create_server(self.cfg.listen, backlog=128)
        lsock.setblocking(False)
        acceptor = loop.create_task(self._accept_loop(lsock))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, f"signal {signal.Signals(sig).name}")
        host, port = lsock.getsockname()[:2]
        layout = self.cfg.layout
        pid_file = layout.pid("appliance")  # read by `nicsplit status`, like host.pid
        pid_file.parent.mkdir(parents=True, exist_ok=True)
        control = await ctl.serve(layout.appliance_sock, self._control_request, errors=(ImageRequestError,))
        retention = loop.create_task(self._retention_loop()) if self.cfg.retention is not None else None
        pid_file.write_text(str(os.getpid()))
        info = {"event": "ready", "pid": os.getpid(), "address": f"{host}:{port}"}
        log.info("appliance %s listening on %s:%d (TLS 1.3, mutual auth, peers %s)", self.id, host, port,
                 ", ".join(self.cfg.peers))
        if ready:
            ready(info)
        try:
            await self._stopping.wait()
        finally:
            acceptor.cancel()
            await asyncio.gather(acceptor, return_exceptions=True)
            lsock.close()
            for c in list(self._conns):
                c.stop()
            for t in list(self._handlers):
                if not any(c.task is t for c in self._conns):
                    t.cancel()  # still in the TLS handshake
            if self._handlers:
                await asyncio.wait(list(self._handlers), timeout=30)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            control.close()
            layout.appliance_sock.unlink(missing_ok=True)
            await self.images.close_all()
            if retention is not None:
                retention.cancel()
                await asyncio.gather(retention, return_exceptions=True)
            # Distribution resolves references through the live journals: stop it first.
            await loop.run_in_executor(None, self._stop_distribution)
            await loop.run_in_executor(self._pool, self._close_journals)
            self._pool.shutdown(wait=True)
            self._index_pool.shutdown(wait=True)
            pid_file.unlink(missing_ok=True)
        return 1 if self.fatal else 0

    def request_stop(self, why: str = "stop requested") -> None:
        if not self._stopping.is_set():
            log.info("appliance stopping (%s)", why)
            self._stopping.set()

    def _close_journals(self) -> None:
        for j in self.journals.values():
            j.close()

    # -- distribution (rule 8) ----------------------------------------------------------

    def _build_index(self, cg: str) -> None:
        """Worker thread, right after the journal opened (nothing appends yet)."""
        if not self.cfg.distribution:
            return
        try:
            self.indexes[cg] = BlockIndex(self.cfg.layout.journal(cg))
        except (PitError, OSError) as e:  # distribution then indexes on its own, and says so if it cannot
            log.error("journal %s: block index not built: %s", cg, e)

    def _refresh_index(self, cg: str) -> None:
        idx = self.indexes.get(cg)
        if idx is None:
            return
        try:
            idx.refresh()
        except (PitError, OSError) as e:  # never a reason to fail ingest; distribution stalls and status shows it
            log.error("journal %s: block index refresh failed: %s", cg, e)
        except Exception:  # a bug in the index: the same, with its traceback
            log.exception("journal %s: block index refresh failed", cg)

    def _feed_index(self, cg: str, idx: BlockIndex, res: AppendResult) -> bool:
        """Worker thread, CG lock held: index an appended batch from the
        writer's heads; False when the index wants a scan instead."""
        try:
            return idx.feed(res.batch)
        except (PitError, OSError) as e:
            log.error("journal %s: block index update failed: %s", cg, e)
            return False

    def _distribute(self, cg: str, j: Journal) -> None:
        if not self.cfg.distribution or cg in self.distribution:
            return
        ds_dir = self.cfg.catalog_dir
        self.distribution[cg] = CGDistribution(
            self.cfg.data, cg, self.cfg.layout.journal(cg), journal=j, durable=lambda: j.durable_seq,
            index=self.indexes.get(cg), nice=self.cfg.distribution_nice,
            members=CatalogMembers(ds_dir, cg, self.cfg.layout.replica(cg))).start()

    def _stop_distribution(self) -> None:
        for d in self.distribution.values():
            d.stop()
        for d in self.distribution.values():
            d.join(30)  # a step is bounded (STEP_RECORDS / STEP_BYTES): well under a second

    # -- retention (rule 10) ------------------------------------------------------------

    async def _retention_loop(self) -> None:
        """Every ``interval``: each CG's Trimmer in the journal pool (base
        images are written off the loop; the CG's ingest lock is not taken:
        `Journal.trim` holds the journal's own lock only while it deletes)."""
        loop = asyncio.get_running_loop()
        policy = self.cfg.retention
        assert policy is not None
        ds_dir = self.cfg.catalog_dir
        while True:
            await asyncio.sleep(policy.interval_s)
            for cg, j in list(self.journals.items()):
                t = self.trimmers.get(cg)
                if t is None:
                    members = CatalogMembers(ds_dir, cg, self.cfg.layout.replica(cg))

                    def sizes(members: CatalogMembers = members) -> dict[int, int] | None:
                        vds = members()
                        return None if vds is None else {v.id: v.size for v in vds}

                    t = self.trimmers[cg] = Trimmer(self.cfg.data, cg, j, policy, sizes,
                                                    min_age_s=self.cfg.dedup_min_age_s)
                try:
                    await loop.run_in_executor(self._pool, t.run_once)
                except JournalError as e:  # the journal failed: ingest stops the appliance (rule 5)
                    log.error("retention of %s: %s", cg, e)
                except Exception:  # a bug or a disk problem in the base: keep the journal, say why
                    log.exception("retention of %s failed; the journal keeps everything until it works", cg)

    def status(self) -> dict[str, Any]:
        """What the control socket's ``status`` answers (rule 9)."""
        cgs: dict[str, Any] = {}
        for cg, j in self.journals.items():
            d = self.distribution.get(cg)
            t = self.trimmers.get(cg)
            cgs[cg] = {"durable_seq": j.durable_seq, "last_seq": j.last_seq,
                       "distribution": d.statistics().to_json() if d is not None else None,
                       "retention": t.last.to_json() if t is not None and t.last is not None else None}
        return {"pid": os.getpid(), "id": self.id, "cgs": cgs,
                "counts": {k: self._counts[k] for k in ("batches", "group_commits", "duplicates")}}

    async def _control_request(self, req: dict) -> dict:
        """A control-socket request (rule 9), decoded by `nicsplit.core.ctl`."""
        cmd = req.get("cmd")
        if cmd == "status":
            return {"ok": True, "status": self.status()}
        if cmd == "wake":
            d = self.distribution.get(str(req.get("cg")))
            if d is not None:
                d.notify()
            return {"ok": True, "distributing": d is not None}
        if cmd == "ping":
            return {"ok": True, "pid": os.getpid()}
        if cmd == "image-export":
            index = self.indexes.get(str(req.get("cg")))
            if index is None:  # no journal (or index) here: the standalone server says why
                return {"ok": False, "fallback": True, "error": "no block index for that CG"}
            return {"ok": True, "image": await self.images.export(req, index)}
        if cmd == "image-close":
            return {"ok": True, "closed": await self.images.close(str(req.get("id")))}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    def statistics(self) -> ApplianceStatistics:
        return ApplianceStatistics(
            connections=len(self._conns), **self._counts,
            journals={cg: j.statistics() for cg, j in self.journals.items()},
        )

    # -- journals ----------------------------------------------------------------------

    async def journal(self, cg: str) -> Journal:
        async with self._open_lock:
            j = self.journals.get(cg)
            if j is None:
                path = self.cfg.layout.journal(cg)
                if not path.is_dir():
                    self._may_create(cg)
                try:
                    j = await asyncio.get_running_loop().run_in_executor(
                        self._pool, lambda: Journal.open(path, segment_size=self.cfg.segment_size))
                except (JournalError, OSError) as e:
                    log.error("journal %s cannot be opened: %s", cg, e)
                    raise _Drop(f"journal {cg} cannot be opened: {e}", F.ErrorCode.INTERNAL, level=logging.ERROR) from None
                self.journals[cg] = j
                self._cg_locks[cg] = asyncio.Lock()
                log.info("journal %s opened: last seq %d", cg, j.last_seq)
                await asyncio.get_running_loop().run_in_executor(self._pool, self._build_index, cg)
                self._distribute(cg, j)
            return j

    def _known_cgs(self) -> set[str]:
        """The CGs of ``cgs.json`` and of the catalog (a vdisk in no CG ships
        as a CG of its own name); either file may be absent or unreadable."""
        known: set[str] = set()
        try:
            known.update(c.name for c in CGCatalog(self.cfg.data).list())
        except (CGError, OSError, ValueError, TypeError) as e:
            log.warning("cannot read the CG catalog: %s", e)
        reader = CatalogReader(self.cfg.catalog_dir)
        if reader.exists():
            try:
                known.update(v.cg or v.name for v in reader.vdisks())
            except (DatastoreError, OSError) as e:
                log.warning("cannot read the vdisk catalog: %s", e)
        return known

    def _may_create(self, cg: str) -> None:
        """A Hello may create a journal for a CG this appliance knows, or for
        an unknown one while fewer than ``max_unknown_cgs`` such journals
        exist (rule 2); else `_Drop` (the Hello leaves the CG out)."""
        known = self._known_cgs()
        if cg in known:
            return
        unknown = sorted(c for c in self.journals if c not in known)
        if len(unknown) >= self.cfg.max_unknown_cgs:
            raise _Drop(f"unknown CG {cg!r} (not in cgs.json or the catalog) and {len(unknown)} journals of unknown "
                        f"CGs exist already ([appliance] max_unknown_cgs = {self.cfg.max_unknown_cgs})",
                        F.ErrorCode.UNKNOWN_CG)

    def _ingest(self, j: Journal, b: F.Batch, *, sync: bool = True, keep: list | None = None) -> AppendResult:
        """Worker thread: unseal, decode, append (durable on return; with
        ``sync=False`` after `Journal.sync`).  ``keep``: the decoded records
        are appended to it (the distribution handoff, rule 8)."""
        try:
            plain = envelope.unseal(b.body, self.key, F.batch_aad(b))
        except F.FrameError as e:
            raise _Drop(f"batch {b.batch_id} of {b.cg}: {e}", F.ErrorCode.UNAUTHENTICATED) from None
        try:
            records = decode_wire_records(plain)  # views of plain: stored as they are (wirerecords.py)
        except F.FrameError as e:
            raise _Drop(f"batch {b.batch_id} of {b.cg}: bad records: {e}", F.ErrorCode.BAD_BATCH) from None
        if keep is not None:
            keep.append(records)
        try:
            return j.append_batch(b, records, sync=sync)
        except BatchRejected as e:
            raise _Drop(str(e), F.ErrorCode.BAD_BATCH) from None

    def _ingest_group(self, j: Journal, batches: list[F.Batch]) -> list[AppendResult]:
        """Worker thread, group commit: append every batch, then one
        fdatasync for all of them (an fsync costs more than appending a
        256 KiB batch). Nothing is acked before the sync returns."""
        results = []
        cg = batches[0].cg
        idx = self.indexes.get(cg)
        fed = idx is not None
        dist = self.distribution.get(cg)
        decoded: list | None = [] if dist is not None else None
        try:
            for b in batches:
                res = self._ingest(j, b, sync=False, keep=decoded)
                results.append(res)
                if fed and res.batch is not None:
                    fed = self._feed_index(cg, idx, res)  # the writer's own heads: nothing read back
        finally:
            # Else the block index reads what was appended while fdatasync waits
            # on the disk; both end before the CG's lock is released, so no append
            # runs while the index reads (rule 8).  Distribution caps at durable_seq.
            refresh = self._index_pool.submit(self._refresh_index, cg) if idx is not None and not fed else None
            try:
                if _FP:
                    _fp.hit("appliance.after-append")  # appended, not yet fdatasync'ed
                j.sync()  # also for the batches before one that failed: they are acked or resent
            finally:
                if refresh is not None:
                    refresh.result()
        if dist is not None:  # durable now: the thread takes these instead of reading them back
            dist.handoff.offer(journaled_payloads(results, decoded))
        return results

    async def ingest(self, b: F.Batch) -> AppendResult:
        return (await self.ingest_group([b]))[0]

    async def ingest_group(self, batches: list[F.Batch]) -> list[AppendResult]:
        j = await self.journal(batches[0].cg)
        async with self._cg_locks[batches[0].cg]:
            try:
                results = await asyncio.get_running_loop().run_in_executor(self._pool, self._ingest_group, j, batches)
            except JournalError as e:
                self.fatal = str(e)
                log.critical("journal %s failed: %s; stopping (a restart recovers the journal)", batches[0].cg, e)
                self.request_stop("journal failure")
                raise _Drop(f"journal failure: {e}", F.ErrorCode.INTERNAL, level=logging.ERROR) from None
        d = self.distribution.get(batches[0].cg)
        if d is not None:
            d.notify(j.durable_seq)  # wake only: distribution reads the journal on its own thread
        return results

    # -- connections ----------------------------------------------------------------------

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as e:  # EMFILE and friends: log, back off, go on
                log.error("accept failed: %s", e)
                await asyncio.sleep(0.1)
                continue
            task = loop.create_task(self._handle(conn))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    async def _handle(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            peer = sock.getpeername()
            where = f"{peer[0]}:{peer[1]}"
        except OSError:
            where = "?"
        reader = asyncio.StreamReader(limit=1 << 20)
        proto = asyncio.StreamReaderProtocol(reader)
        try:
            # The handshake happens here, so its failure is ours to log (rule 1).
            tls, _ = await asyncio.wait_for(
                loop.connect_accepted_socket(lambda: proto, sock, ssl=self.ssl,
                                             ssl_handshake_timeout=self.cfg.handshake_timeout),
                self.cfg.handshake_timeout + 1)
        except (ssl.SSLError, OSError, asyncio.TimeoutError) as e:
            self._counts["refused"] += 1
            reason = getattr(e, "verify_message", None) or getattr(e, "reason", None) or str(e) or type(e).__name__
            log.warning("refused %s: TLS handshake failed: %s", where, reason)
            sock.close()
            return
        writer = asyncio.StreamWriter(tls, proto, reader, loop)
        cn = pki.peer_name(writer.get_extra_info("ssl_object"))
        conn = _Connection(self, reader, writer, f"{where} ({cn})")
        conn.task = asyncio.current_task()
        if cn not in self.cfg.peers:
            self._counts["refused"] += 1
            log.warning("refused %s: certificate CN %r is not an accepted peer (%s)", where, cn, ", ".join(self.cfg.peers))
            await conn.close_with(F.Error(F.ErrorCode.UNAUTHENTICATED, f"certificate {cn!r} may not ship batches"))
            return
        self._counts["accepted"] += 1
        log.info("accepted %s", conn.name)
        self._conns.add(conn)
        try:
            await conn.run()
        finally:
            self._conns.discard(conn)


class _Connection:
    def __init__(self, app: Appliance, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str) -> None:
        self.app, self.reader, self.writer, self.name = app, reader, writer, name
        self.dec = F.FrameDecoder()
        self.queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=app.cfg.queue_depth)
        self.cgs: frozenset[str] | None = None
        self.busy = False
        self.stopping = False
        self.task: asyncio.Task | None = None
        self._tasks: list[asyncio.Task] = []
        self._wlock = asyncio.Lock()

    async def send(self, *frames: F.Frame) -> None:
        """Frames in order, with one write (a group's acks: one TLS record and syscall)."""
        async with self._wlock:
            self.writer.write(b"".join(map(F.encode, frames)) if len(frames) > 1 else F.encode(frames[0]))
            await self.writer.drain()

    async def close_with(self, frame: F.Frame | None) -> None:
        try:
            if frame is not None and not self.writer.is_closing():
                await asyncio.wait_for(self.send(frame), 2)
        except (OSError, asyncio.TimeoutError, ssl.SSLError):
            pass
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 2)
        except (OSError, asyncio.TimeoutError, ssl.SSLError):
            self.writer.transport.abort()

    def stop(self) -> None:
        """Shutdown: stop reading; the processor finishes its current batch."""
        self.stopping = True
        reader, processor, heartbeat = self._tasks or (None, None, None)
        for t in (reader, heartbeat):
            if t:
                t.cancel()
        if processor and not self.busy:
            processor.cancel()

    async def run(self) -> None:
        drop: _Drop | None = None
        try:
            async with asyncio.TaskGroup() as tg:
                self._tasks = [tg.create_task(self._read_loop()), tg.create_task(self._process_loop()),
                               tg.create_task(self._heartbeat_loop())]
        except* _Drop as eg:
            drop = eg.exceptions[0]  # type: ignore[assignment]
        except* OSError as eg:  # ConnectionError, ssl.SSLError: the link broke
            drop = _Drop(f"connection lost: {eg.exceptions[0]}", None)
        except* Exception as eg:  # a bug: log it whole, tell the peer, keep serving others
            log.error("internal error on %s", self.name, exc_info=eg)
            drop = _Drop(f"internal error: {eg.exceptions[0]!r}", F.ErrorCode.INTERNAL, level=logging.ERROR)
        if drop is None and self.stopping:
            drop = _Drop("appliance shutting down", F.ErrorCode.SHUTDOWN, level=logging.INFO)
        if drop is None:
            drop = _Drop("closed", None, level=logging.INFO)
        if drop.code not in (None, F.ErrorCode.SHUTDOWN):
            self.app._counts["dropped"] += 1
        log.log(drop.level, "dropping %s: %s", self.name, drop.reason)
        await self.close_with(F.Error(drop.code, drop.reason[: F.MAX_STRING]) if drop.code is not None else None)

    async def _read_loop(self) -> None:
        idle, task = self.app.cfg.idle_timeout, asyncio.current_task()
        assert task is not None
        watch = IdleWatch(asyncio.get_running_loop(), task, idle)  # a silent peer: one read pending idle s
        try:
            while True:
                watch.reading()
                try:
                    data = await self.reader.read(256 * 1024)
                except (ConnectionError, ssl.SSLError, OSError) as e:
                    raise _Drop(f"read failed: {e}", None) from None
                watch.read_done()
                try:
                    self.dec.receive_data(data)
                    while (frame := self.dec.next_event()) is not F.NEED_DATA:
                        if isinstance(frame, F.Heartbeat):
                            continue  # liveness only; reading it reset the idle timer
                        await self.queue.put(frame)
                except F.FrameError as e:
                    raise _Drop(f"protocol error: {e}", F.ErrorCode.PROTOCOL) from None
                if not data:
                    await self.queue.put(_EOF)
                    return
        except asyncio.CancelledError:
            if not watch.fired:
                raise
            task.uncancel()
            raise _Drop(f"peer silent for {idle:g}s (no frames or heartbeats)", F.ErrorCode.PROTOCOL) from None
        finally:
            watch.close()

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.app.cfg.heartbeat_interval)
            await self.send(F.Heartbeat(time.time_ns()))

    async def _process_loop(self) -> None:
        pending: Any = None  # a frame taken from the queue but not yet handled
        while True:
            item = pending if pending is not None else await self.queue.get()
            pending = None
            if item is _EOF:
                raise _Drop("peer closed the connection", None, level=logging.INFO)
            self.busy = True
            try:
                if isinstance(item, F.Batch) and self.cgs is not None:
                    group, pending = await self._gather(item)
                    await self._batches(group)
                else:
                    await self._handle_frame(item)
            finally:
                self.busy = False
            if self.stopping:
                return

    async def _gather(self, first: F.Batch) -> tuple[list[F.Batch], Any]:
        """Group commit (rule 12): ``first`` and the batches of its CG that
        are queued or arrive within the commit window, at most `MAX_GROUP`;
        also the frame that ended the group (another CG's, or a Hello), if any."""
        group = [first]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.app.cfg.commit_window_us / 1e6
        while len(group) < MAX_GROUP:
            if not self.queue.empty():
                nxt = self.queue.get_nowait()
            else:
                left = deadline - loop.time()
                if left <= 0 or self.stopping:
                    break
                getter = asyncio.ensure_future(self.queue.get())
                try:
                    await asyncio.wait({getter}, timeout=left)
                    if not getter.done():
                        getter.cancel()
                        await asyncio.wait({getter})  # it may complete before the cancel lands: never drop it
                finally:
                    if not getter.done():  # we were cancelled ourselves
                        getter.cancel()
                if getter.cancelled():
                    break
                nxt = getter.result()
            if isinstance(nxt, F.Batch) and nxt.cg == first.cg:
                group.append(nxt)
            else:
                return group, nxt
        return group, None

    async def _handle_frame(self, f: F.Frame) -> None:
        if isinstance(f, F.Hello):
            await self._hello(f)
        elif isinstance(f, F.Batch):
            await self._batch(f)
        elif isinstance(f, F.Error):
            raise _Drop(f"peer reported error {f.code}: {f.message}", None)
        else:
            raise _Drop(f"protocol error: unexpected {type(f).__name__} frame from a card", F.ErrorCode.PROTOCOL)

    async def _hello(self, h: F.Hello) -> None:
        if self.cgs is not None:
            raise _Drop("protocol error: second Hello", F.ErrorCode.PROTOCOL)
        if h.version != F.PROTOCOL_VERSION:
            raise _Drop(f"protocol version {h.version} not supported (appliance speaks {F.PROTOCOL_VERSION})",
                        F.ErrorCode.VERSION)
        self.name = f"{self.name} card {h.card_id!r}"
        resume: dict[str, int] = {}
        for cg in h.cgs:  # rule 2: each CG on its own
            try:
                check_name(cg, "CG")
                resume[cg] = (await self.app.journal(cg)).durable_seq
            except (BadName, _Drop) as e:
                self.app._counts["cgs_refused"] += 1
                log.warning("hello from %s: CG %r refused (left out of resume; the other CGs ship): %s",
                            self.name, cg, getattr(e, "reason", e))
        self.cgs = frozenset(resume)
        log.info("hello from %s: CGs %s, resume %s", self.name, ", ".join(resume) or "-", resume)
        await self.send(F.HelloAck(self.app.id, F.PROTOCOL_VERSION, resume))

    async def _batch(self, b: F.Batch) -> None:
        await self._batches([b])

    async def _batches(self, group: list[F.Batch]) -> None:
        """Batches of one CG, journaled with one fdatasync, then acked in order."""
        if self.cgs is None:
            raise _Drop("protocol error: Batch before Hello", F.ErrorCode.PROTOCOL)
        b0 = group[0]
        if b0.cg not in self.cgs:
            raise _Drop(f"batch {b0.batch_id} for CG {b0.cg!r} not accepted in Hello", F.ErrorCode.UNKNOWN_CG)
        for b in group:
            self.app._counts["bytes_in"] += len(b.body)
        results = await self.app.ingest_group(group)
        if _FP:
            _fp.hit("appliance.after-fsync")  # durable, not yet acked
        counts = self.app._counts
        counts["group_commits"] += 1
        counts["batches"] += len(group)
        debug = log.isEnabledFor(logging.DEBUG)
        for b, result in zip(group, results, strict=True):
            if not result.applied:
                counts["duplicates"] += 1
            if debug:
                log.debug("batch %d of %s seqs %d..%d %s", b.batch_id, b.cg, b.first_seq, b.last_seq,
                          "journaled" if result.applied else "duplicate")
        await self.send(*(F.Ack(b.batch_id, b.cg, b.last_seq, True, r.known) for b, r in zip(group, results)))


def run(cfg: ServerConfig) -> int:
    """Run the appliance in the foreground (uvloop); prints the JSON ready
    line on stdout.  Returns the exit status."""
    # The entry point alone picks the loop: Appliance.serve runs on whatever
    # loop its caller (a test, an embedder) already has.
    import uvloop

    app = Appliance(cfg)

    def ready(info: dict) -> None:
        print(json.dumps(info), flush=True)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(app.serve(ready))
