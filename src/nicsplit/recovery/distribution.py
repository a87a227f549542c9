"""Distribution inside the appliance: every CG's journal applied to its
replica images in the background, behind ingest, never in its way.

Theory of operation
===================
One `CGDistribution` per CG, each a thread that owns one
`nicsplit.recovery.replica.Distributor` over
``DATA/appliance/replicas/<cg>/`` (images, undo log, state.json; formats in
docs/recovery.md §4).  Ingest wakes it (`notify`, a ``threading.Event``)
after every group commit with the journal's new durable seq; the thread then
applies what is durable in bounded steps (`STEP_RECORDS` records and
`STEP_BYTES` bytes each, one undo fsync + one image fsync + one state.json
replacement per step) until it has caught up, and waits again.  It also wakes
every `WAKE_INTERVAL` seconds on its own, which is how it notices a failover
(below) or a catalog change when no writes arrive.  While less than a full
step waits, a cycle starts at most every `STEP_INTERVAL` after the previous
one, and inside a cycle a step follows another only while a full step
waits: a step's fsyncs cost the same for 5 records as for 1024.

Rules
-----
1. Distribution never touches the ingest path's lock: it reads committed
   segment bytes through its own descriptors (`_RecordSource`), resolving
   dedup references through the live `Journal` (`read_block` takes the
   journal's short internal lock only).  The block index it works from is the
   appliance's: built when the journal opens and refreshed by the ingest
   worker right after each group commit, while the CG's lock keeps every other
   append out — a scan must not race a segment being extended and rolled
   over (the scanner trusts its first fstat of a segment; see the report in
   docs/recovery.md "Distribution").  Without an index given (tests, tools)
   the thread builds and refreshes its own.
2. Only what is durable is applied: each step is capped at the journal's
   ``durable_seq`` (group commit writes a COMMIT before its fdatasync, and the
   scanner could see it in between).  A replica is therefore never ahead of
   what a restart of the journal would keep.
3. One writer per replica directory: the thread holds an exclusive
   ``flock`` on ``DATA/appliance/replicas/<cg>.lock`` for as long as it has
   the Distributor open.  Whoever else needs the replica (failover) first
   writes ``DATA/appliance/failover/<cg>.json`` — the thread sees it at the
   next step boundary, closes the Distributor and releases the lock — then
   takes the lock itself.  While that file exists the CG is *paused*.
4. Crash safety is the Distributor's: undo before do, state.json after the
   fsyncs, recovery at open (docs/recovery.md §4).  A kill -9 in the middle of
   a step is repaired when the thread reopens the replica after a restart.
5. The vdisks of a replica are the CG's members in the datastore catalog,
   reloaded when the catalog changes (a vdisk added to the CG gets its image
   before its first record is applied: the host only splits writes of a vdisk
   the catalog already puts in the CG), plus every vdisk the replica ever had
   (``vdisks.json``), so undo entries of a vdisk that left the CG still apply.
6. An error (a damaged record, ENOSPC on the replica) is logged with its
   cause, shown in status, and retried after a back-off (1 s doubling to
   60 s); it never stops ingest.
7. Ingest hands the payloads it has just journaled to the thread
   (`PayloadHandoff`, after the fdatasync, bounded): a step takes what it
   needs from there and reads only the rest from the journal (entry CRC,
   AEAD open).  At a paced load nearly every record is handed over.  While
   no Distributor is open (paused for a failover, an error's back-off) the
   handoff holds nothing and refuses offers; a full one refuses an offer
   without walking it.

Lag (what `nicsplit status` shows per CG under ``distribution``):
``lag_records`` = journal records with seq in (applied_seq, durable_seq];
``lag_seconds`` = how long the oldest durable-but-unapplied batch has been
durable (wall clock of this appliance; 0 when caught up).

Example::

    dist = CGDistribution(data, "cg1", journal_dir, members=CatalogMembers(Layout(data).datastore, "cg1", Layout(data).replica("cg1")),
                          durable=lambda: journal.durable_seq, journal=journal)
    dist.start(); ...; dist.notify(journal.durable_seq); ...; dist.stop(); dist.join()
"""

from __future__ import annotations

import collections
import fcntl
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from nicsplit.journal.writer import JournalError
from nicsplit.recovery.pits import PitError
from nicsplit.storage import atrest
from nicsplit.recovery.base import BaseError
from nicsplit.recovery.base import read_state as read_base_state
from nicsplit.recovery.blockindex import shared_index
from nicsplit.recovery.replica import Distributor
from nicsplit.core.fsutil import atomic_write
from nicsplit.core.catalog import CatalogReader
from nicsplit.core.layout import Layout
from nicsplit.core.records import Op

log = logging.getLogger("nicsplit.recovery.distribution")

__all__ = [
    "CGDistribution", "CatalogMembers", "DistributionStatistics", "ReplicaLock", "replica_dir", "failover_state_path",
    "paused", "PayloadHandoff", "journaled_payloads", "STEP_RECORDS", "STEP_BYTES", "WAKE_INTERVAL", "STEP_INTERVAL",
]

# A step costs three fsyncs (undo log, images, state.json), ~1-3 ms here; at
# the ~12k records/s a card ships on this machine, 1024 records per step keep
# that overhead near 3% while one step stays well under 100 ms.
STEP_RECORDS = 1024
# ... and 8 MiB: half a maximal batch, so a step of 1 MiB writes is as short.
STEP_BYTES = 8 << 20
# How often an idle thread looks for a failover request or a catalog change:
# a failover waits at most this long (plus one step) for the lock.
WAKE_INTERVAL = 0.25
# A step costs five fsyncs whatever its size (undo log, image data and tags,
# state.json and its directory), ~0.3 ms of CPU each here. Woken by every group
# commit (every ~2 ms under a paced load), steps of a few records would cost
# ~100 us of CPU per record in fsyncs alone; so while the backlog is below a
# full step, a step starts at most this often after the previous one (the
# replica trails the journal by up to this much more; a failover, which
# applies up to its PIT itself, never waits for it).
STEP_INTERVAL = 0.05
UNDO_TRIM_INTERVAL = 10.0  # seconds between checks of the base's seq (retention runs every minute)
# lag_seconds keeps (durable seq, time) per group commit; beyond this many
# pending entries the newest is extended instead (overstating, never hiding, lag).
_MAX_MARKS = 4096
# Niceness of the distribution threads relative to the appliance.  0: on a
# 2-core machine running host, card and appliance (bench/distribution.py, QD16)
# the replica then trails the journal by < 2 s (p99) and catches up within
# 0.5 s of the load ending; at +10 it trails by 5-7 s and needs 1.5-6 s, with
# no production gain measurable through the noise.  The environment variable
# is for such experiments; an appliance on its own machine wants 0.
NICE = int(os.environ.get("NICSPLIT_DISTRIBUTION_NICE", "0"))
_BACKOFF = (1.0, 60.0)
# Payloads held for the distribution thread (PayloadHandoff): two full steps
# (STEP_BYTES); at 10,000 4 KiB writes/s a 50 ms step interval holds 2 MiB.
HANDOFF_BYTES = 2 * STEP_BYTES
# An offer is not looked at while less room than one 4 KiB payload is left.
OFFER_ROOM = 4096


def replica_dir(data: str | Path, cg: str) -> Path:
    """`Layout.replica` (for callers that hold a data directory, not a Layout)."""
    return Layout(data).replica(cg)


def failover_state_path(data: str | Path, cg: str) -> Path:
    """`Layout.failover_state` (for callers that hold a data directory, not a Layout)."""
    return Layout(data).failover_state(cg)


def paused(data: str | Path, cg: str) -> bool:
    """Is the CG's replica handed over to a failover (rule 3)?"""
    return failover_state_path(data, cg).exists()


class ReplicaLock:
    """The exclusive flock of one replica directory (rule 3)."""

    def __init__(self, data: str | Path, cg: str) -> None:
        self.path = Layout(data).replica_lock(cg)
        self._fd = -1

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def fileno(self) -> int:
        return self._fd

    def acquire(self, timeout: float = 0.0) -> bool:
        """Take the lock, waiting up to ``timeout`` seconds; False if not."""
        if self._fd >= 0:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._fd = fd
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return False
                time.sleep(0.02)  # flock has no timed wait; a holder finishes its step within ~100 ms

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = -1


@dataclass(frozen=True, slots=True)
class _Vd:
    id: int
    name: str
    size: int


class CatalogMembers:
    """The vdisks of one CG's replica (rule 5): catalog members, plus every
    vdisk the replica ever had (``<replica>/vdisks.json``)."""

    def __init__(self, datastore_dir: str | Path, cg: str, replica: str | Path) -> None:
        self.datastore_dir = Path(datastore_dir)
        self.cg = cg
        self.record = Path(replica) / "vdisks.json"
        self._catalog = CatalogReader(self.datastore_dir)
        self._last: tuple[_Vd, ...] | None = None

    def __call__(self) -> tuple[_Vd, ...] | None:
        """The members now (None: no datastore catalog on this machine);
        re-read only when the catalog file changed."""
        if self._last is None and not self._catalog.exists():
            return None
        if not self._catalog.refresh() and self._last is not None:
            return self._last
        now = {v.id: _Vd(v.id, v.name, v.size) for v in self._catalog.cg_members(self.cg)}
        try:
            old = json.loads(self.record.read_text())["vdisks"]
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            old = []
        merged = dict(now)
        for o in old:
            if isinstance(o, dict) and o.get("id") not in merged:
                merged[o["id"]] = _Vd(int(o["id"]), str(o["name"]), int(o["size"]))
        out = tuple(sorted(merged.values(), key=lambda v: v.id))
        if [(v.id, v.name, v.size) for v in out] != [(o.get("id"), o.get("name"), o.get("size")) for o in old
                                                     if isinstance(o, dict)]:
            self.record.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.record, json.dumps({"vdisks": [{"id": v.id, "name": v.name, "size": v.size}
                                                             for v in out]}).encode())
        self._last = out
        return out


@dataclass(frozen=True, slots=True)
class DistributionStatistics:
    state: str  # "running", "caught-up", "paused" (failed over), "waiting" (lock or catalog), "error"
    applied_seq: int  # every record with seq <= this is in the replica images
    durable_seq: int  # the journal's
    lag_records: int  # journal records in (applied_seq, durable_seq]
    lag_seconds: float  # age of the oldest durable batch not applied yet (0 when caught up)
    records_applied: int  # since the appliance started
    steps: int
    reopened: int  # Distributor (re)opens: start, catalog change, end of a failover
    cpu_seconds: float  # CPU time of the distribution thread (index refresh, steps)
    errors: int
    last_error: str | None
    journal_stalled: str | None  # why the journal scan stops before the end of the files (pits.py rule 3), if it does
    payloads_handed: int  # payloads a step took from ingest's handoff (rule 7) ...
    payloads_read: int  # ... and those it read back from the journal (not held: lagging, refs, ZERO/TRIM)

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


class PayloadHandoff:
    """Payloads ingest has just journaled, handed to the distribution thread
    so a step need not read them back from the segment it was written to
    (rule 7).  Ingest `offer`s a group's inline WRITE payloads after the
    group's fdatasync (durable, as rule 2 wants); `take` hands out those a
    step asks for, in seq order, and drops older ones.  Bounded by
    `HANDOFF_BYTES`: what does not fit (a paused or lagging replica) is read
    from the journal as before, so nothing depends on the handoff but speed.

    Why this is the journal's payload: the seq is journaled once (a
    duplicate is not applied, journal.md MUST 7) and a journaled record never
    changes; the bytes are the very ones the writer sealed, views of the
    batch plaintext the card's AEAD authenticated (immutable ``bytes``)."""

    def __init__(self, max_bytes: int = 0, min_room: int = OFFER_ROOM) -> None:
        self.max_bytes = max_bytes or HANDOFF_BYTES
        self.min_room = min_room  # less room left than this: offers are refused unseen
        self._q: collections.deque[tuple[int, Any]] = collections.deque()  # (seq, payload), seq increasing
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.dropped = 0
        self._paused = False

    def pause(self) -> None:
        """No replica open (a failover, an error's back-off, a stop): let go
        of what is held and refuse offers until `resume`."""
        with self._lock:
            self._paused = True
            self._q.clear()
            self._bytes = 0

    def resume(self) -> None:
        """A replica is open again: offers are held."""
        self._paused = False

    def offer(self, items: Iterable[tuple[int, Any]]) -> None:
        """Ingest, after the fdatasync: (seq, payload) of journaled records, in
        seq order.  Held up to the first that does not fit or is not after the
        newest held; the rest of the offer is not looked at (``dropped`` counts
        such offers).  A full handoff (a paused or lagging replica) returns at
        once: ~0.5 us a record of walking and refusing the offer otherwise."""
        if self.max_bytes - self._bytes < self.min_room or self._paused:  # unlocked reads: a hint (rule 7)
            self.dropped += 1
            return
        with self._lock:
            q, room = self._q, self.max_bytes - self._bytes
            last = q[-1][0] if q else -1
            for seq, payload in items:
                n = len(payload)
                if n > room or seq <= last:
                    self.dropped += 1
                    break
                q.append((seq, payload))
                room -= n
                last = seq
            self._bytes = self.max_bytes - room

    def take(self, seqs: list[int]) -> list[Any]:
        """The payloads of ``seqs`` (increasing), None where not held; every
        entry before the last seq asked for is dropped (applied, or never wanted)."""
        out: list[Any] = []
        with self._lock:
            q, freed = self._q, 0
            for seq in seqs:
                while q and q[0][0] < seq:
                    freed += len(q.popleft()[1])
                if q and q[0][0] == seq:
                    p = q.popleft()[1]
                    freed += len(p)
                    out.append(p)
                else:
                    out.append(None)
            self._bytes -= freed
        hit = len(out) - out.count(None)
        self.hits += hit
        self.misses += len(out) - hit
        return out

    def __len__(self) -> int:
        return len(self._q)


def journaled_payloads(results: list[Any], decoded: list[list[Any]]) -> Iterator[tuple[int, Any]]:
    """(seq, data) of the inline WRITEs a group commit journaled, for
    `PayloadHandoff.offer`: per batch its `AppendResult` and its decoded
    `WireRecord`s; a duplicate batch gives nothing, an overlapping one only
    what it appended (seq >= its first appended record's)."""
    write = Op.WRITE
    for res, records in zip(results, decoded):
        if res.batch is None or not res.batch[1]:
            continue
        first = res.batch[1][0].seq
        for r in records:
            if r.seq >= first and r.op == write and not r.refs:
                yield r.seq, r.data


def crash_failpoint(env: dict[str, str] | None = None) -> Callable[[str], None] | None:
    """Opt-in fault injection for crash tests: ``NICSPLIT_DISTRIBUTION_CRASH=
    NAME@FILE`` makes the process SIGKILL itself at Distributor failpoint NAME
    (replica.py rule 5: ``undo-synced``, ``image-written``, ...) once FILE
    exists; FILE is removed first, so the restarted process runs on."""
    spec = (os.environ if env is None else env).get("NICSPLIT_DISTRIBUTION_CRASH", "")
    if "@" not in spec:
        return None
    where, trigger = spec.split("@", 1)

    def fp(name: str) -> None:
        if name == where and os.path.exists(trigger):
            os.unlink(trigger)
            log.warning("distribution: crashing at failpoint %s as %s asks", name, trigger)
            os.kill(os.getpid(), signal.SIGKILL)

    return fp


class CGDistribution:
    """The distribution thread of one CG (module docstring)."""

    def __init__(self, data: str | Path, cg: str, journal_dir: str | Path, *, members: Callable[[], Any],
                 durable: Callable[[], int], journal: Any | None = None, index: Any | None = None,
                 step_records: int = STEP_RECORDS,
                 step_bytes: int = STEP_BYTES, wake_interval: float = WAKE_INTERVAL, nice: int = NICE,
                 failpoint: Callable[[str], None] | None = None, step_interval: float = STEP_INTERVAL) -> None:
        self.data = Path(data)
        self.cg = cg
        self.journal_dir = Path(journal_dir)
        self.dir = Layout(self.data).replica(cg)
        self._members = members
        self._durable = durable
        self._journal = journal
        self.step_records = step_records
        self.step_bytes = step_bytes
        self.wake_interval = wake_interval
        self.step_interval = step_interval
        self._cycled_at = float("-inf")  # monotonic time the last cycle ended
        self.nice = nice
        self.failpoint = failpoint if failpoint is not None else crash_failpoint()
        self._lock = ReplicaLock(self.data, cg)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._dist: Distributor | None = None
        self._vds: tuple = ()
        # Given: its owner refreshes it while no append runs (rule 1); else ours, refreshed by us.
        self._own_index = index is None
        self._index: Any = index
        self._marks: collections.deque[tuple[int, float]] = collections.deque()
        self._marks_lock = threading.Lock()
        self._state = "starting"
        self._applied = 0
        self._records = self._steps = self._reopened = self._errors = 0
        self._cpu = 0.0
        self._tt = 0.0  # thread_time() when _cpu was last brought up to date
        self._last_error: str | None = None
        self._idle = threading.Condition()
        self._rekeyed_for: int | None = None  # the active key the replica was last re-sealed for
        self._undo_trimmed_at = float("-inf")
        self.handoff = PayloadHandoff()  # rule 7: ingest offers, our steps take

    # -- control (any thread) -----------------------------------------------------------

    def start(self) -> "CGDistribution":
        self.notify(self._durable())
        self._thread = threading.Thread(target=self._run, name=f"distribute-{self.cg}", daemon=True)
        self._thread.start()
        return self

    def notify(self, durable_seq: int | None = None) -> None:
        """A group commit landed (or something else changed): wake the thread."""
        if durable_seq is not None:
            now = time.monotonic()
            with self._marks_lock:
                if self._marks and self._marks[-1][0] >= durable_seq:
                    pass
                elif len(self._marks) >= _MAX_MARKS:
                    self._marks[-1] = (durable_seq, self._marks[-1][1])
                else:
                    self._marks.append((durable_seq, now))
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every durable record is applied (or the CG is paused); tests and benches."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while not ((self._state == "paused" and paused(self.data, self.cg))
                       or (self._state == "caught-up" and self._applied >= self._durable())):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._wake.set()
                self._idle.wait(min(left, 0.05))
        return True

    def statistics(self) -> DistributionStatistics:
        applied, durable = self._applied, self._durable()
        lag_records = 0
        ix = self._index
        if ix is not None and durable > applied:
            lag_records = max(0, ix.ordinal_upto(durable) - ix.ordinal_upto(applied))
        now = time.monotonic()
        with self._marks_lock:
            while self._marks and self._marks[0][0] <= applied:
                self._marks.popleft()
            lag_s = now - self._marks[0][1] if self._marks and durable > applied else 0.0
        return DistributionStatistics(self._state, applied, durable, lag_records, round(lag_s, 3), self._records,
                                      self._steps, self._reopened, round(self._cpu, 3), self._errors, self._last_error,
                                      ix.pits.stalled if ix is not None else None, self.handoff.hits,
                                      self.handoff.misses)

    # -- the thread ------------------------------------------------------------------

    def _set_state(self, state: str) -> None:
        with self._idle:
            self._state = state
            self._idle.notify_all()

    def _fp(self, name: str) -> None:
        if self.failpoint is not None:
            self.failpoint(name)

    def _run(self) -> None:
        backoff = _BACKOFF[0]
        if self.nice:
            try:  # Linux: a thread id names the thread alone
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                               min(19, os.getpriority(os.PRIO_PROCESS, 0) + self.nice))
            except OSError as e:
                log.warning("distribution of %s: cannot lower its priority: %s", self.cg, e)
        try:
            while not self._stop.is_set():
                # A cycle that left records for the next one (below) needs no wake.
                behind = self._state == "running" and self._durable() > self._applied
                self._wake.wait(0 if behind else self.wake_interval)
                self._wake.clear()
                # STEP_INTERVAL: a small backlog waits to become a larger step.
                early = self._cycled_at + self.step_interval - time.monotonic()
                if early > 0 and self._durable() - self._applied < self.step_records:
                    self._stop.wait(early)
                if self._stop.is_set():
                    break
                self._tt = time.thread_time()
                try:
                    self._cycle()
                    backoff = _BACKOFF[0]
                except Exception as e:  # rule 6: logged, shown, retried; ingest goes on
                    self._errors += 1
                    self._last_error = f"{type(e).__name__}: {e}"
                    # IO trouble and damaged records say all in one line; anything else is a bug: traceback.
                    log.error("distribution of %s failed (retry in %.0f s): %s", self.cg, backoff, self._last_error,
                              exc_info=not isinstance(e, (OSError, PitError, JournalError)))
                    self._close()
                    self._set_state("error")
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, _BACKOFF[1])
                finally:
                    self._account()
                    self._cycled_at = time.monotonic()
        finally:
            self._close()
            self._set_state("stopped")

    def _account(self) -> None:
        now = time.thread_time()
        self._cpu += now - self._tt
        self._tt = now

    def _close(self) -> None:
        self.handoff.pause()  # nothing takes from it until a Distributor opens again
        if self._dist is not None:
            self._dist.close()
            self._dist = None
        self._lock.release()

    def _open(self) -> bool:
        if not self.journal_dir.is_dir():
            self._set_state("waiting")
            return False
        if self._index is None:
            self._index = shared_index(self.journal_dir)  # one scan, then refreshed by every step
        if paused(self.data, self.cg):
            self._close()
            if self._own_index:
                self._index.refresh()  # so lag_records keeps counting what waits
            self._set_state("paused")
            return False
        vds = self._members()
        if vds is None:
            self._close()
            self._last_error = "no datastore catalog on this machine: the replica's vdisk sizes are unknown"
            self._set_state("waiting")
            return False
        if self._dist is not None and vds == self._vds:
            return True
        if not self._lock.acquire():
            self._set_state("waiting")
            return False
        if paused(self.data, self.cg):  # a failover wrote its file before we took the lock
            self._close()
            self._set_state("paused")
            return False
        if self._dist is not None:
            self._dist.close()
            log.info("distribution of %s: vdisks changed, reopening the replica", self.cg)
        self._dist = Distributor(self.journal_dir, self.dir, vds, index=self._index, journal=self._journal,
                                 refresh=self._own_index, failpoint=self.failpoint, handoff=self.handoff)
        self.handoff.resume()
        self._vds = vds
        self._reopened += 1
        self._applied = self._dist.applied_seq
        st = self._dist.statistics()
        if st.recovered_entries:
            log.warning("replica of %s: recovered an interrupted step (%d undo entries laid back), at seq %d",
                        self.cg, st.recovered_entries, self._dist.applied_seq)
        return True

    def _cycle(self) -> None:
        if not self._open():
            return
        d = self._dist
        assert d is not None
        self._set_state("running")
        while not self._stop.is_set():
            if paused(self.data, self.cg):  # rule 3: hand the replica over at a step boundary
                self._close()
                self._set_state("paused")
                log.info("distribution of %s paused for a failover at seq %d", self.cg, self._applied)
                return
            before = d.statistics().records_applied
            n = d.step(self.step_records, self._durable(), self.step_bytes)
            self._applied = d.applied_seq
            self._account()
            if n == 0:
                break
            self._steps += 1
            self._records += d.statistics().records_applied - before
            self._fp("step")
            # What became durable while this step ran is a few group commits:
            # it waits for the next cycle (STEP_INTERVAL) unless a full step
            # waits, instead of a step of a few records with the same fsyncs.
            if self.step_interval > 0 and self._durable() - self._applied < self.step_records:
                break
        self._maybe_rekey(d)
        self._maybe_trim_undo(d)
        self._set_state("caught-up" if self._applied >= self._durable() else "running")

    def _maybe_trim_undo(self, d: Distributor) -> None:
        """Drop undo entries older than the base images (retention trimmed
        the journal before them: no PIT there can be asked for), at most
        every UNDO_TRIM_INTERVAL seconds; the undo log would grow forever."""
        now = time.monotonic()
        if now - self._undo_trimmed_at < UNDO_TRIM_INTERVAL:
            return
        self._undo_trimmed_at = now
        try:
            base_seq = read_base_state(Layout(self.data).base(self.cg)).seq
        except BaseError as e:
            log.warning("distribution of %s: not trimming the undo log: %s", self.cg, e)
            return
        n = d.trim_undo(base_seq)
        if n:
            log.info("replica of %s: %d undo entries up to seq %d dropped (older than the protection window)",
                     self.cg, n, d.undo_floor)

    def _maybe_rekey(self, d: Distributor) -> None:
        """After a key rotation (and once after each start), re-seal what the
        replica holds under older keys, so they can be retired (docs/recovery.md §13)."""
        active = atrest.new_active(d.keyring, self._rekeyed_for)
        if active is None:
            return
        blocks, entries = d.rekey()
        self._rekeyed_for = active
        if blocks or entries:
            log.info("replica of %s: re-sealed %d image block(s) and %d undo entr(ies) under at-rest key %d",
                     self.cg, blocks, entries, active)
