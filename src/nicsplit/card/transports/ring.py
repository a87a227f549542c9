"""Ring transport: splitter -> card over the hidden volume's shared-memory rings.

Host half `RingSplitter` (used by the splitter filter) and card half
`RingEndpoint` (used by the card pipeline).  Formats and memory ordering are in
`nicsplit.wire.ring` and docs/formats.md; the interface in
`nicsplit.card.transports.base`.

Theory of operation
===================
Set-up.  The card creates the hidden volume and an eventfd (the doorbell) and
listens on ``RUN_DIR/card.sock`` (AF_UNIX, SOCK_SEQPACKET, mode 0600).  A host
connects; the card answers with one message: JSON (path, fake UID, geometry,
card pid) plus the eventfd as SCM_RIGHTS.  The host attaches the volume and
checks it against the JSON.  One host at a time: a second one gets
``{"error": ...}`` and no descriptors.  The socket stays open for the life of
the attachment; its EOF tells each side the other is gone.

Write (host, synchronous, one producer):

1. health: card state not CLOSED, heartbeat younger than ``stale_after_ns``;
2. room: a SQ slot and, for WRITE, ``length`` contiguous bytes in the data
   area (re-reading the card's heads only when the cached ones say full);
3. copy the payload once (memoryview slice assignment), checksum it, pack the
   descriptor with a pre-built ``struct.Struct.pack_into``;
4. publish ``data_tail`` then ``sq_tail``; full fence; ring the eventfd only
   if the card state is SLEEPING (notification suppression);
5. spin on ``cq_tail`` until a completion for this io_id arrives (True if OK)
   or ``timeout_ns`` passes (False).  Completions for other io_ids (late acks
   of timed-out splits) are matched against the tracker table and dropped.

``split`` = ``submit`` (steps 1-4, never waits) + ``wait_ack`` (step 5); the
two halves are public for tests and for a future batching host (several
submits, then waits in any order: verdicts are matched by io_id).

Card loop (single thread)::

    ep = RingEndpoint(run_dir)
    while running:
        recs = ep.poll()                  # acks each write before returning it
        if recs: handle(recs); idle_since = now
        elif now - idle_since > IDLE_SPELL: ep.wait_doorbell(0.01)
        ep.heartbeat()                    # at least every few ms
        ... ep.release(io_id) once a payload is shipped durably (any order)
        ... ep.set_full(True/False) when the pipeline cannot take more

Rules
-----
1. ``split`` never raises for card trouble and never waits longer than
   ``timeout_ns`` (plus the payload copy itself, ~0.1 us per KiB).  Card
   trouble = False; the filter marks.
2. The card acks (CQ) every write-like entry as soon as it has validated it,
   before returning it; a bad descriptor is acked FAILED with a reason, logged
   with its io_id, and never returned.  Outcomes get no completion.
3. The card stops consuming (leaves entries in the SQ) when the CQ is full;
   the host drains the whole CQ on every split, so this only happens if the
   host stopped splitting.
4. Payloads stay in the data area until ``release(io_id)``; ``data_head``
   advances over the released prefix in submission order, so releases may
   come in any order.
5. No lost wake-up: the card publishes SLEEPING, fences, re-checks the SQ,
   and only then blocks on the eventfd; the host publishes the tail, fences,
   then reads the state (Dekker; see wire/ring.py MEMORY ORDERING).
6. Neither half is thread-safe; the card's control socket is served by one
   daemon thread owned (and joined) by the endpoint, which never touches the
   rings.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import select
import socket
import stat
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from time import monotonic_ns

from xxhash import xxh3_64_intdigest as _xxh3

from nicsplit.card.hidden import DEFAULT_DATA_SIZE, DEFAULT_ENTRIES, HiddenVolume, HiddenVolumeError
from nicsplit.core.records import AugmentedWrite, Op, Outcome, Status, WFlag
from nicsplit.card.transports.base import TransportUnavailable
from nicsplit.wire import ring as R

__all__ = [
    "RingSplitter", "RingEndpoint", "RingStats", "EndpointStats", "SOCKET_NAME",
    "DEFAULT_STALE_AFTER_NS",
]

log = logging.getLogger(__name__)

SOCKET_NAME = "card.sock"
DEFAULT_STALE_AFTER_NS = 100_000_000  # 100 ms: 10x the card's longest doorbell sleep (10 ms)
_MAX_CONTROL_MSG = 4096  # the JSON hello is ~400 bytes
_M32 = 0xFFFFFFFF

# Hot-path constants pulled out of the enums (attribute lookups on IntEnum
# classes cost ~40 ns each).
_SQ_TAIL, _SQ_HEAD = int(R.Counter.SQ_TAIL), int(R.Counter.SQ_HEAD)
_CQ_TAIL, _CQ_HEAD = int(R.Counter.CQ_TAIL), int(R.Counter.CQ_HEAD)
_DATA_TAIL, _DATA_HEAD = int(R.Counter.DATA_TAIL), int(R.Counter.DATA_HEAD)
_STATE, _HEARTBEAT = int(R.Counter.CARD_STATE), int(R.Counter.CARD_HEARTBEAT)
_SLEEPING, _POLLING, _CLOSED = int(R.CardState.SLEEPING), int(R.CardState.POLLING), int(R.CardState.CLOSED)
_K_WRITE, _K_OUTCOME = int(R.Kind.WRITE), int(R.Kind.OUTCOME)
_OK, _FAILED = int(R.AckStatus.OK), int(R.AckStatus.FAILED)
_DF_CSUM = int(R.DescFlag.CSUM)
_R_FULL = int(R.AckReason.FULL)
_OPS = {int(o): o for o in Op}
_WFLAGS = {int(f): WFlag(f) for f in (0, 1)}
_STATUSES = {int(s): s for s in Status}

_WAITING, _ABANDONED = 0, 1

_desc_pack = R.DESC.pack_into
_desc_unpack = R.DESC.unpack_from
_cqe_pack = R.CQE.pack_into
_cqe_unpack = R.CQE.unpack_from
_fence = R.full_fence


class _RateLimitedLog:
    """Log the first ``burst`` events, then one in ``every`` (with a count)."""

    def __init__(self, burst: int = 20, every: int = 1000) -> None:
        self.n = 0
        self.burst, self.every = burst, every

    def __call__(self, msg: str, *args: object) -> None:
        self.n += 1
        if self.n <= self.burst or self.n % self.every == 0:
            log.warning(msg + " (event %d)", *args, self.n)


# ===========================================================================
# Host half
# ===========================================================================


@dataclass(frozen=True, slots=True)
class RingStats:
    submitted: int  # write-like entries published
    acked: int  # ... acked OK by the card (split returned True)
    rejected: int  # ... acked FAILED by the card (bad descriptor / checksum)
    timeouts: int  # splits that gave up waiting (ack may arrive late)
    full_sq: int  # splits/outcomes refused: no SQ slot
    full_data: int  # splits refused: no room in the data area
    unhealthy: int  # splits refused: card dead, closed or heartbeat stale
    invalid: int  # records that do not fit the format (caller bug; logged)
    doorbells: int  # eventfd writes (card was SLEEPING)
    spins: int  # CQ polls that found nothing yet
    outcomes: int  # OUTCOME entries published
    late_acks: int  # completions for io_ids that had already timed out
    unknown_acks: int  # completions for io_ids we never waited for
    bytes: int  # payload bytes copied into the data area
    abandoned: int  # timed-out io_ids still waiting for their late ack


class RingSplitter:
    """Host half of the ring transport (see module docstring)."""

    def __init__(
        self, sock: socket.socket, hv: HiddenVolume, doorbell: int, card_pid: int,
        stale_after_ns: int = DEFAULT_STALE_AFTER_NS, checksum: bool = True,
    ) -> None:
        self._sock = sock
        self._hv = hv
        self._efd = doorbell
        self.card_pid = card_pid
        self.volume_path = str(hv.path)
        self._stale_ns = stale_after_ns
        g = hv.geometry
        self._ctr = c = hv.counters
        self._sq, self._cq, self._data = hv.sq, hv.cq, hv.data
        self._sq_n, self._sq_mask = g.sq_entries, g.sq_entries - 1
        self._cq_mask = g.cq_entries - 1
        self._dsize = g.data_size
        self._csum = checksum and hv.identity.csum_alg == R.CsumAlg.XXH3_LOW32
        # Resume from the shared counters (a previous host may have used the volume).
        self._sq_tail = c[_SQ_TAIL]
        self._sq_head_c = c[_SQ_HEAD]
        self._cq_head = c[_CQ_HEAD]
        self._data_tail = c[_DATA_TAIL]
        self.last_position = self._data_tail  # position of the last split (see released_position)
        self._data_head_c = c[_DATA_HEAD]
        c[R.Counter.HOST_PID] = os.getpid()
        c[R.Counter.HOST_ATTACH_NS] = monotonic_ns()
        # Tracker table (SPDK style): io_id -> _WAITING / _ABANDONED (timed
        # out, its late ack will be dropped).  Acks are matched by io_id, so
        # they may come in any order; verdicts for io_ids other than the one
        # being waited for park in _done.  Abandoned entries are bounded by
        # both rings' capacity (beyond that the card cannot still owe them).
        self._inflight: dict[int, int] = {}
        self._done: dict[int, bool] = {}
        self._n_abandoned = 0
        self._abandon_cap = g.sq_entries + g.cq_entries
        self._dead = False
        self._closed = False
        self._submitted = self._acked = self._rejected = self._timeouts = 0
        self._full_sq = self._full_data = self._unhealthy = self._invalid = 0
        self._doorbells = self._spins = self._outcomes = self._late = self._unknown = self._bytes = 0
        self._warn = _RateLimitedLog()

    # -- set-up ----------------------------------------------------------------

    @classmethod
    def connect(
        cls, control_socket: str, timeout: float = 1.0, *, stale_after_ns: int = DEFAULT_STALE_AFTER_NS,
        checksum: bool = True,
    ) -> "RingSplitter":
        """Attach to the card serving ``control_socket``; TransportUnavailable
        (with the reason) if there is no card, it refuses, or its volume is bad."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        fds: list[int] = []
        try:
            s.settimeout(timeout)
            try:
                s.connect(str(control_socket))
                msg, fds, flags, _ = socket.recv_fds(s, _MAX_CONTROL_MSG, 1)
            except (OSError, ValueError) as e:  # ValueError: socket path too long
                raise TransportUnavailable(f"card control socket {control_socket}: {e}") from None
            if not msg:
                raise TransportUnavailable(f"card at {control_socket} closed the connection without a hello")
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise TransportUnavailable(f"card at {control_socket}: truncated hello")
            try:
                info = json.loads(msg)
            except ValueError:
                raise TransportUnavailable(f"card at {control_socket}: hello is not JSON") from None
            if not isinstance(info, dict):
                raise TransportUnavailable(f"card at {control_socket}: hello is not a JSON object")
            if "error" in info:
                raise TransportUnavailable(f"card at {control_socket} refused: {info['error']}")
            if len(fds) != 1:
                raise TransportUnavailable(f"card at {control_socket} sent {len(fds)} descriptors, expected 1")
            try:
                if info.get("transport") != "ring" or info.get("version") != R.VERSION:
                    raise TransportUnavailable(
                        f"card speaks {info.get('transport')!r} v{info.get('version')}, we speak 'ring' v{R.VERSION}"
                    )
                want = R.Geometry(int(info["sq_entries"]), int(info["cq_entries"]), int(info["data_size"]))
                path, uid, card_pid = str(info["path"]), str(info["uid"]), int(info["pid"])
            except (KeyError, TypeError, ValueError) as e:
                raise TransportUnavailable(f"card at {control_socket}: bad hello field: {e}") from None
            try:
                hv = HiddenVolume.attach(path, uid)
            except HiddenVolumeError as e:
                raise TransportUnavailable(str(e)) from None
            if hv.geometry != want or hv.identity.card_pid != card_pid:
                hv.close()
                raise TransportUnavailable(
                    f"hidden volume {path} does not match the card's hello "
                    f"({hv.geometry}, pid {hv.identity.card_pid} vs {want}, pid {card_pid})"
                )
            s.setblocking(False)
        except BaseException:
            s.close()
            for fd in fds:
                os.close(fd)
            raise
        log.info("attached to card pid %d: hidden volume %s", card_pid, path)
        return cls(s, hv, fds[0], card_pid, stale_after_ns=stale_after_ns, checksum=checksum)

    # -- the hot path ------------------------------------------------------------

    def split(self, w: AugmentedWrite, timeout_ns: int) -> bool:
        """Submit ``w`` and spin for its ack, at most ``timeout_ns``."""
        now = monotonic_ns()
        if not self._submit(w, now):
            return False
        return self.wait_ack(w.io_id, now + timeout_ns)

    def submit(self, w: AugmentedWrite) -> bool:
        """Publish ``w`` without waiting (the ``_nowait`` half of `split`).
        False if the card is unhealthy or there is no room; then nothing was
        published.  Every True must be followed by ``wait_ack(w.io_id, ...)``."""
        return self._submit(w, monotonic_ns())

    def _submit(self, w: AugmentedWrite, now: int) -> bool:
        if self._dead:
            self._unhealthy += 1
            return False
        c = self._ctr
        if now - c[_HEARTBEAT] > self._stale_ns or c[_STATE] == _CLOSED:
            self._unhealthy += 1
            if c[_STATE] == _CLOSED:
                self._set_dead("card closed the ring")
            return False
        tail = self._sq_tail
        if tail - self._sq_head_c >= self._sq_n:
            self._sq_head_c = c[_SQ_HEAD]
            if tail - self._sq_head_c >= self._sq_n:
                self._full_sq += 1
                return False
        op = w.op
        length = w.length
        data_pos = csum = dflags = end = 0
        if op == _K_WRITE:
            payload = w.data
            if payload is None or len(payload) != length or not length:
                return self._invalid_record(w, "WRITE payload missing or not `length` bytes")
            size = self._dsize
            pos = self._data_tail
            off = pos % size
            if off + length > size:  # does not fit before the end: pad to the next lap
                pos += size - off
                off = 0
            end = pos + length
            if end - self._data_head_c > size:
                self._data_head_c = c[_DATA_HEAD]
                if end - self._data_head_c > size:
                    self._full_data += 1
                    return False
            self._data[off: off + length] = payload  # the one copy
            if self._csum:
                csum = _xxh3(payload) & _M32
                dflags = _DF_CSUM
            data_pos = pos
        io_id = w.io_id
        if io_id in self._inflight:
            return self._invalid_record(w, "io_id already in flight")
        try:
            _desc_pack(
                self._sq, (tail & self._sq_mask) << 6, op, w.flags, dflags, 0, length, io_id, w.cg_seq,
                w.cg_id, w.vdisk_id, w.voffset, w.timestamp_ns, data_pos, csum, tail & _M32,
            )
        except struct.error as e:
            return self._invalid_record(w, str(e))
        if end:
            self._data_tail = end
            self._bytes += length
            c[_DATA_TAIL] = end
            self.last_position = end
        else:
            # No payload: count it durable only once a *later* write's payload
            # is released (conservative: the card holds no space for it).
            self.last_position = self._data_tail + 1
        tail += 1
        self._sq_tail = tail
        c[_SQ_TAIL] = tail  # publish (TSO: payload and descriptor are visible first)
        self._inflight[io_id] = _WAITING
        self._submitted += 1
        _fence()
        if c[_STATE] == _SLEEPING:
            self._ring()
        return True

    def released_position(self) -> int:
        """Payload position below which the card has released everything
        (shipped durable or dropped). A split whose `last_position` is at or
        below it needs no dirty mark if the card is lost. Readable after the
        card died: the hidden volume stays mapped."""
        return self._ctr[_DATA_HEAD]

    def wait_ack(self, io_id: int, deadline_ns: int) -> bool:
        """Spin until ``io_id`` (submitted) is acked or ``time.monotonic_ns()``
        passes ``deadline_ns``.  True = acked OK; False = refused or timed out
        (then a late ack is recognised and dropped)."""
        done = self._done.pop(io_id, None) if self._done else None
        if done is not None:
            return done
        c = self._ctr
        cq_head = self._cq_head
        while True:
            ctail = c[_CQ_TAIL]
            if ctail != cq_head:
                got = self._drain(ctail, io_id)
                if got is not None:
                    return got
                cq_head = ctail
            if monotonic_ns() > deadline_ns:
                return self._timed_out(io_id)
            self._spins += 1

    def reap(self) -> None:
        """Consume every completion available now, without waiting; their
        verdicts wait in a table for `take_ack` (the pipelined host path)."""
        ctail = self._ctr[_CQ_TAIL]
        if ctail != self._cq_head:
            self._drain(ctail, -1)

    def take_ack(self, io_id: int) -> bool | None:
        """The verdict for ``io_id`` if its completion was reaped, else None."""
        return self._done.pop(io_id, None) if self._done else None

    def abandon(self, io_id: int) -> bool:
        """Give up on ``io_id`` (its deadline passed); a late ack is dropped."""
        done = self._done.pop(io_id, None) if self._done else None
        if done is not None:
            return done
        return self._timed_out(io_id)

    def _drain(self, ctail: int, want: int) -> bool | None:
        """Consume completions up to ``ctail``; the verdict for ``want`` if seen.
        Verdicts for other in-flight io_ids are kept for their ``wait_ack``."""
        cq, mask = self._cq, self._cq_mask
        head = self._cq_head
        got = None
        inflight = self._inflight
        while head != ctail:
            io_id, status, reason, _r, seq = _cqe_unpack(cq, (head & mask) << 4)
            head += 1
            if seq != (head - 1) & _M32:
                self._warn("ring: completion at %d has seq %d (io %d): ignored", head - 1, seq, io_id)
                continue
            state = inflight.pop(io_id, None)
            if state is None:
                self._unknown += 1
                self._warn("ring: completion for unknown io %d", io_id)
                continue
            if state == _ABANDONED:
                self._late += 1
                self._n_abandoned -= 1
                continue
            ok = status == _OK
            if ok:
                self._acked += 1
            else:
                self._rejected += 1
                self._warn("ring: card refused io %d: %s", io_id, _reason_name(reason))
            if io_id == want:
                got = ok
            else:
                self._done[io_id] = ok
        self._cq_head = head
        self._ctr[_CQ_HEAD] = head
        return got

    def _timed_out(self, io_id: int) -> bool:
        self._timeouts += 1
        if self._inflight.get(io_id) == _WAITING:
            self._inflight[io_id] = _ABANDONED
            self._n_abandoned += 1
            if self._n_abandoned > self._abandon_cap:  # the card will never answer: forget the oldest
                self._forget_abandoned()
        if not self._socket_alive():
            self._set_dead("card control socket closed")
        return False

    def _forget_abandoned(self) -> None:
        for k in [k for k, v in self._inflight.items() if v == _ABANDONED][: self._abandon_cap // 2]:
            del self._inflight[k]
        self._n_abandoned = sum(1 for v in self._inflight.values() if v == _ABANDONED)

    def _ring(self) -> None:
        try:
            os.eventfd_write(self._efd, 1)
            self._doorbells += 1
        except OSError as e:  # EAGAIN only if the counter is near 2**64: the card is awake anyway
            self._warn("ring: doorbell failed: %s", e)

    def _invalid_record(self, w: AugmentedWrite, why: str) -> bool:
        self._invalid += 1
        log.error("ring: io %d cannot be encoded (%s): %s", w.io_id, why, _brief(w))
        return False

    # -- outcomes ------------------------------------------------------------------

    def post_outcome(self, io_id: int, status: Status) -> bool:
        if self._dead:
            return False
        c = self._ctr
        tail = self._sq_tail
        if tail - self._sq_head_c >= self._sq_n:
            self._sq_head_c = c[_SQ_HEAD]
            if tail - self._sq_head_c >= self._sq_n:
                self._full_sq += 1
                return False
        try:
            _desc_pack(self._sq, (tail & self._sq_mask) << 6, _K_OUTCOME, 0, 0, status, 0, io_id,
                       0, 0, 0, 0, 0, 0, 0, tail & _M32)
        except struct.error as e:
            self._invalid += 1
            log.error("ring: outcome for io %d cannot be encoded: %s", io_id, e)
            return False
        tail += 1
        self._sq_tail = tail
        c[_SQ_TAIL] = tail
        self._outcomes += 1
        _fence()
        if c[_STATE] == _SLEEPING:
            self._ring()
        return True

    # -- health, stats, close ---------------------------------------------------------

    def healthy(self) -> bool:
        if self._dead:
            return False
        c = self._ctr
        if c[_STATE] == _CLOSED:
            self._set_dead("card closed the ring")
            return False
        if not self._socket_alive():
            self._set_dead("card control socket closed")
            return False
        return monotonic_ns() - c[_HEARTBEAT] <= self._stale_ns

    def _socket_alive(self) -> bool:
        try:
            return self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except BlockingIOError:
            return True
        except OSError:
            return False

    def _set_dead(self, why: str) -> None:
        if not self._dead:
            self._dead = True
            log.warning("ring: card pid %d unavailable: %s", self.card_pid, why)

    def statistics(self) -> RingStats:
        return RingStats(
            submitted=self._submitted, acked=self._acked, rejected=self._rejected, timeouts=self._timeouts,
            full_sq=self._full_sq, full_data=self._full_data, unhealthy=self._unhealthy, invalid=self._invalid,
            doorbells=self._doorbells, spins=self._spins, outcomes=self._outcomes, late_acks=self._late,
            unknown_acks=self._unknown, bytes=self._bytes, abandoned=self._n_abandoned,
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._dead = True
        try:
            if not self._hv.closed:
                self._ctr[R.Counter.HOST_PID] = 0
        except ValueError:  # view already released
            pass
        self._sock.close()
        os.close(self._efd)
        self._hv.close()

    def __enter__(self) -> "RingSplitter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ===========================================================================
# Card half
# ===========================================================================


@dataclass(frozen=True, slots=True)
class EndpointStats:
    entries: int  # SQ entries consumed
    writes: int  # write-like entries acked OK
    outcomes: int  # outcomes received
    bad: int  # descriptors refused (FAILED ack or dropped outcome)
    bytes: int  # payload bytes received
    sleeps: int  # doorbell sleeps
    wakeups: int  # sleeps ended by the doorbell
    released: int  # payload bytes freed (incl. wrap padding)
    held: int  # payloads not yet released
    held_bytes: int  # data area bytes between data_head and the last payload
    cq_full: int  # polls that stopped early because the CQ was full
    refused_full: int  # writes refused (FAILED/FULL) while set_full(True)
    host_pid: int  # attached host (0 = none)


# A held payload allocation is a 3-item list [io_id, end, released] (cheaper
# to build than an object on the hot path); in submission order in _order.
_H_END, _H_RELEASED = 1, 2


class RingEndpoint:
    """Card half of the ring transport (see module docstring)."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        shm_dir: str | os.PathLike = "/dev/shm",
        data_size: int = DEFAULT_DATA_SIZE,
        sq_entries: int = DEFAULT_ENTRIES,
        cq_entries: int | None = None,
        verify_checksums: bool = True,
    ) -> None:
        R.check_platform()
        self.run_dir = Path(run_dir)
        self.socket_path = self.run_dir / SOCKET_NAME
        if len(os.fsencode(self.socket_path)) > 107:
            raise ValueError(f"control socket path too long for AF_UNIX (max 107 bytes): {self.socket_path}")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _claim_socket_path(self.socket_path)
        HiddenVolume.sweep_stale(shm_dir)  # volumes of cards killed with -9
        self._hv = HiddenVolume.create(shm_dir, data_size=data_size, sq_entries=sq_entries,
                                       cq_entries=cq_entries or sq_entries)
        self.volume_path = str(self._hv.path)
        self.fake_uid = self._hv.uid
        try:
            self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._lsock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            old = os.umask(0o177)
            try:
                self._lsock.bind(str(self.socket_path))
            finally:
                os.umask(old)
            self._lsock.listen(4)
        except BaseException:
            self._hv.close()
            self._hv.unlink()
            raise
        g = self._hv.geometry
        self._ctr = self._hv.counters
        self._sq, self._cq, self._data = self._hv.sq, self._hv.cq, self._hv.data
        self._sq_n, self._sq_mask = g.sq_entries, g.sq_entries - 1
        self._cq_n, self._cq_mask = g.cq_entries, g.cq_entries - 1
        self._dsize = g.data_size
        self._verify = verify_checksums
        self._full = False
        self._counters_ns = 0
        self._sq_head = self._cq_tail = self._cq_head_c = 0
        self._data_expect = 0  # logical end of the last accepted payload allocation
        self._data_head = 0
        self._held: dict[int, list] = {}  # io_id -> [io_id, end, released] for payloads handed out
        self._order: collections.deque[list] = collections.deque()  # every tracked allocation, in order
        self._n_entries = self._n_writes = self._n_outcomes = self._n_bad = self._n_bytes = 0
        self._n_sleeps = self._n_wakeups = self._n_released = self._n_cq_full = self._n_refused_full = 0
        self._warn = _RateLimitedLog()
        self._poller = select.poll()
        self._poller.register(self._efd, select.POLLIN)
        self.host_pid = 0
        self._closed = False
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._control = threading.Thread(target=self._serve_control, name="card-control", daemon=True)
        self._control.start()

    # -- the hot path ------------------------------------------------------------

    def poll(self, max_entries: int = 256) -> list[AugmentedWrite | Outcome]:
        c = self._ctr
        head = self._sq_head
        tail = c[_SQ_TAIL]
        if tail == head:
            return []
        avail = tail - head
        if avail > self._sq_n or avail < 0:
            self._warn("ring: host published sq_tail %d with sq_head %d: ignored", tail, head)
            return []
        data_tail = c[_DATA_TAIL]
        sq, cq, data = self._sq, self._cq, self._data
        sq_mask, cq_mask, size = self._sq_mask, self._cq_mask, self._dsize
        cq_tail = self._cq_tail
        held, order_append = self._held, self._order.append
        out: list[AugmentedWrite | Outcome] = []
        n = avail if avail < max_entries else max_entries
        for _ in range(n):
            (kind, wflags, dflags, status, length, io_id, cg_seq, cg_id, vdisk_id, voffset, ts, data_pos,
             csum, seq) = _desc_unpack(sq, (head & sq_mask) << 6)
            if kind == _K_OUTCOME:
                reason = R.check_fields(kind, wflags, dflags, status, length, data_pos, csum, seq, head)
                if reason:
                    self._n_bad += 1
                    self._warn("ring: bad outcome for io %d at %d: %s (dropped)", io_id, head,
                               _reason_name(reason))
                else:
                    self._n_outcomes += 1
                    out.append(Outcome(io_id, _STATUSES[status]))
                head += 1
                continue
            if cq_tail - self._cq_head_c >= self._cq_n:
                self._cq_head_c = c[_CQ_HEAD]
                if cq_tail - self._cq_head_c >= self._cq_n:
                    self._n_cq_full += 1
                    break  # leave the rest in the SQ until the host drains the CQ
            reason = R.check_fields(kind, wflags, dflags, status, length, data_pos, csum, seq, head)
            if self._full and not reason:
                reason = _R_FULL
            view = None
            track = False
            if (not reason or reason == _R_FULL) and kind == _K_WRITE:
                off = data_pos % size
                expect = self._data_expect
                if not (expect <= data_pos and data_pos - expect < size and data_pos + length <= data_tail
                        and off + length <= size):
                    reason = R.AckReason.BAD_RANGE
                else:
                    track = True  # (if FULL we only free its space)
                    if not reason:
                        view = data[off: off + length]
                        if self._verify and dflags & _DF_CSUM and _xxh3(view) & _M32 != csum:
                            reason = R.AckReason.BAD_CHECKSUM
                        elif io_id in held:
                            reason = R.AckReason.DUPLICATE
            _cqe_pack(cq, (cq_tail & cq_mask) << 4, io_id, _FAILED if reason else _OK, reason, 0, cq_tail & _M32)
            cq_tail += 1
            c[_CQ_TAIL] = cq_tail  # the ack is out before we look at the next entry
            if track:  # this payload's space is ours to free, good or bad
                h = [io_id, data_pos + length, reason != 0]
                order_append(h)
                self._data_expect = data_pos + length
                if not reason:
                    held[io_id] = h
                    self._n_bytes += length
            if reason == _R_FULL:
                self._n_refused_full += 1
            elif reason:
                self._n_bad += 1
                self._warn("ring: refused io %d at %d (kind %d, %d bytes at %d): %s", io_id, head, kind, length,
                           data_pos, _reason_name(reason))
            else:
                self._n_writes += 1
                out.append(AugmentedWrite(io_id, cg_id, cg_seq, vdisk_id, _OPS[kind], _WFLAGS[wflags], voffset,
                                          length, ts, view))
            head += 1
        consumed = head - self._sq_head
        self._sq_head = head
        self._cq_tail = cq_tail
        c[_SQ_HEAD] = head
        self._n_entries += consumed
        if self._order and self._order[0][_H_RELEASED]:  # refused payloads at the front
            self._advance()
        return out

    def release(self, io_id: int) -> None:
        try:
            h = self._held.pop(io_id)
        except KeyError:
            raise KeyError(f"ring: io {io_id} is not held by the card (never received, or released twice)") from None
        h[_H_RELEASED] = True
        if self._order[0] is h:
            self._advance()

    def _advance(self) -> None:
        order = self._order
        end = self._data_head
        while order and order[0][_H_RELEASED]:
            end = order.popleft()[_H_END]
        if end != self._data_head:
            self._n_released += end - self._data_head
            self._data_head = end
            self._ctr[_DATA_HEAD] = end

    # -- sleeping -----------------------------------------------------------------------

    def set_sleeping(self, sleeping: bool) -> None:
        self._ctr[_STATE] = _SLEEPING if sleeping else _POLLING

    def doorbell_fd(self) -> int:
        return self._efd

    def pending(self) -> bool:
        """True if the host published entries not yet consumed."""
        return self._ctr[_SQ_TAIL] != self._sq_head

    def wait_doorbell(self, timeout: float) -> bool:
        """Sleep until the host rings or ``timeout`` seconds pass; True if work
        is pending.  Keep ``timeout`` well under the host's staleness bound
        (100 ms): the card heartbeats only when it returns."""
        c = self._ctr
        c[_STATE] = _SLEEPING
        _fence()  # SLEEPING is globally visible before we re-read sq_tail (Dekker)
        if c[_SQ_TAIL] != self._sq_head:
            c[_STATE] = _POLLING
            return True
        self._n_sleeps += 1
        self.heartbeat()
        ready = self._poller.poll(max(0, int(timeout * 1000 + 0.999)))
        c[_STATE] = _POLLING
        if ready:
            try:
                os.eventfd_read(self._efd)
                self._n_wakeups += 1
            except BlockingIOError:
                pass
        self.heartbeat()
        return c[_SQ_TAIL] != self._sq_head

    def heartbeat(self) -> None:
        """Prove the card loop alive (cheap: call it every loop round); also
        refreshes the header's card counters at most once per millisecond."""
        now = monotonic_ns()
        self._ctr[_HEARTBEAT] = now
        if now - self._counters_ns > 1_000_000:
            self._counters_ns = now
            self._store_counters()

    def set_full(self, full: bool) -> None:
        """While full, every write-like entry is acked FAILED (reason FULL) at
        once and its payload freed, so the host goes to marking without waiting
        for a timeout.  Outcomes are still delivered."""
        if full != self._full:
            self._full = full
            log.warning("ring: card %s", "full: refusing writes" if full else "accepting writes again")

    # -- stats, close -----------------------------------------------------------------

    def _store_counters(self) -> None:
        c = self._ctr
        c[72], c[73], c[74], c[75] = self._n_entries, self._n_writes, self._n_outcomes, self._n_bad
        c[76], c[77], c[78], c[79] = self._n_bytes, self._n_sleeps, self._n_wakeups, self._n_released

    def statistics(self) -> EndpointStats:
        return EndpointStats(
            entries=self._n_entries, writes=self._n_writes, outcomes=self._n_outcomes, bad=self._n_bad,
            bytes=self._n_bytes, sleeps=self._n_sleeps, wakeups=self._n_wakeups, released=self._n_released,
            held=len(self._held), held_bytes=self._data_expect - self._data_head, cq_full=self._n_cq_full,
            refused_full=self._n_refused_full,
            host_pid=self.host_pid,
        )

    def close(self) -> None:
        """Tell the host (state CLOSED), stop serving, unmap and unlink the volume."""
        if self._closed:
            return
        self._closed = True
        self._store_counters()
        self._ctr[_STATE] = _CLOSED
        os.write(self._wake_w, b"x")
        self._control.join(timeout=5)
        for fd in (self._wake_r, self._wake_w, self._efd):
            os.close(fd)
        self._lsock.close()
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        self._held.clear()
        self._order.clear()
        self._hv.close()
        self._hv.unlink()

    def __enter__(self) -> "RingEndpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- control socket (own thread; never touches the rings) ------------------------------

    def _hello(self) -> bytes:
        g = self._hv.geometry
        return json.dumps({
            "transport": "ring", "version": R.VERSION, "path": self.volume_path, "uid": self.fake_uid,
            "pid": os.getpid(), "sq_entries": g.sq_entries, "cq_entries": g.cq_entries,
            "data_size": g.data_size,
        }).encode()

    def _serve_control(self) -> None:
        host: socket.socket | None = None
        p = select.poll()
        p.register(self._wake_r, select.POLLIN)
        p.register(self._lsock, select.POLLIN)
        try:
            while True:
                # Level-triggered: handle one event per poll() so a closed
                # host's fd, reused by a new connection, is never confused.
                events = dict(p.poll())
                if self._wake_r in events:
                    return
                if host is not None and host.fileno() in events:
                    if events[host.fileno()] & (select.POLLHUP | select.POLLERR) or not _peer_alive(host):
                        self._detach(host, p)
                        host = None
                elif self._lsock.fileno() in events:
                    host = self._accept(host, p)
        except Exception:  # a bug here must not go unnoticed, but must not take the card down
            log.exception("card: control socket thread failed")
        finally:
            if host is not None:
                host.close()

    def _detach(self, host: socket.socket, p: select.poll) -> None:
        log.info("card: host pid %d detached", self.host_pid)
        p.unregister(host)
        host.close()
        self.host_pid = 0

    def _accept(self, host: socket.socket | None, p: select.poll) -> socket.socket | None:
        if host is not None and not _peer_alive(host):  # it left; its EOF may not be polled yet
            self._detach(host, p)
            host = None
        try:
            conn, _ = self._lsock.accept()
        except OSError as e:
            log.warning("card: accept on %s failed: %s", self.socket_path, e)
            return host
        try:
            pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            if uid != os.geteuid():
                log.warning("card: refused host pid %d of uid %d", pid, uid)
                conn.send(json.dumps({"error": f"uid {uid} may not attach"}).encode())
                conn.close()
                return host
            if host is not None:
                log.warning("card: refused host pid %d: host pid %d is attached", pid, self.host_pid)
                conn.send(json.dumps({"error": f"another host (pid {self.host_pid}) is attached"}).encode())
                conn.close()
                return host
            socket.send_fds(conn, [self._hello()], [self._efd])
        except OSError as e:
            log.warning("card: hello to a host failed: %s", e)
            conn.close()
            return host
        p.register(conn, select.POLLIN)
        self.host_pid = pid
        log.info("card: host pid %d attached to %s", pid, self.volume_path)
        return conn


def _peer_alive(sock: socket.socket) -> bool:
    """False once the peer closed its end (EOF) or the socket failed.  The
    host never sends anything after connecting; stray bytes are discarded."""
    try:
        data = sock.recv(_MAX_CONTROL_MSG, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return data != b""


def _claim_socket_path(path: Path) -> None:
    """Remove a stale socket left by a dead card; refuse if a card answers."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        probe.settimeout(0.5)
        probe.connect(str(path))
    except OSError:
        os.unlink(path)  # nobody listening: stale
        return
    finally:
        probe.close()
    raise FileExistsError(f"a card is already serving {path}")


def _reason_name(reason: int) -> str:
    try:
        return R.AckReason(reason).name
    except ValueError:
        return f"reason {reason}"


def _brief(w: AugmentedWrite) -> str:
    return (f"io={w.io_id} cg={w.cg_id}/{w.cg_seq} vdisk={w.vdisk_id} op={w.op!r} flags={w.flags!r} "
            f"voffset={w.voffset} length={w.length}")
