"""Host half of the ring transport: `RingSplitter`, used by the splitter
filter to hand each write to the card and wait for its ack.  The protocol
(set-up, the write steps, rules) is in `nicsplit.card.transports.ring`.

Reservations (issue 9: a large write's payload received in place)
-----------------------------------------------------------------
`reserve(length)` lends the NBD front end a `Reservation`: ``length`` bytes
of the data area past everything published or lent, so the payload is
received straight into the ring and checksummed chunk by chunk as it lands
(`Reservation.filled`), while it is hot in cache. A write whose ``data`` is
that reservation's view is then published in place by `submit`: only the
descriptor is written. Rules:

1. Space is handed out in position order from ``_rtail`` (>= ``data_tail``);
   a plain (copied) write goes there too, after every reservation.
2. A reservation is published in place only while nothing after it has
   been published (``pos >= data_tail``): the card requires payloads in
   ring order. Otherwise it is *moved*: copied to the tail like any write
   (its checksum is already known); its bytes left behind are padding.
3. Nothing of a reservation is visible to the card until its descriptor is
   published (the card reads only up to ``data_tail``); one released
   unpublished (client gone mid-payload, a bad request, an error above the
   splitter) is abandoned: the tail rolls back over it, or it becomes
   padding in front of the next payload. The card never sees it.
4. The host reads a reservation's bytes until the request ends (the
   datastore write reads them there), so it is *pinned* from `reserve` to
   `Reservation.release`: no payload is placed where it would overwrite a
   pinned one, even after the card freed it (room is counted from the
   oldest pinned position when that is before the card's ``data_head``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
from collections import deque
from dataclasses import dataclass
from time import monotonic_ns, perf_counter_ns

from xxhash import xxh3_64 as xxh3_stream
from xxhash import xxh3_64_intdigest as xxh3

from nicsplit.card.hidden import HiddenVolume, HiddenVolumeError
from nicsplit.card.transports.base import TransportUnavailable
from nicsplit.card.transports.ring_shared import (
    CLOSED, CQ_HEAD, CQ_TAIL, DATA_HEAD, DATA_TAIL, DEFAULT_STALE_AFTER_NS, DF_CSUM, HEARTBEAT, HOST_WAITING, K_OUTCOME, K_WRITE,
    M32, MAX_CONTROL_MSG, OK, SLEEPING, SQ_HEAD, SQ_TAIL, STATE, RateLimitedLog, brief, cqe_unpack, desc_pack,
    fence, reason_name,
)
from nicsplit.core.records import AugmentedWrite, Status
from nicsplit.wire import ring as R

__all__ = ["RingSplitter", "RingStats", "Reservation"]

log = logging.getLogger("nicsplit.card.transports.ring")  # one logger for both halves

# Tracker states: waited for; abandoned (a late ack is dropped); late (the
# caller went on without the ack, its verdict is kept for `take_late`).
_WAITING, _ABANDONED, _LATE = 0, 1, 2
TRACK_WAITING, TRACK_ABANDONED, TRACK_LATE = _WAITING, _ABANDONED, _LATE  # for subclasses (nvme_splitter)


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
    late: int  # detached io_ids whose verdict has not arrived yet
    reserved: int = 0  # reservations lent (payloads received into the ring)
    in_place: int = 0  # ... published in place (no copy)
    moved: int = 0  # ... published by a copy (a later payload was published first)
    dropped: int = 0  # ... released unpublished (never seen by the card)
    no_room: int = 0  # reservations refused: no room (the write takes the copy path)
    held: int = 0  # reservations not yet released (their space is pinned)
    ack_sleeps: int = 0  # times the host armed the completion eventfd to sleep for acks (`arm_wake`)


# Reservation states.
_HELD, _IN_PLACE, _MOVED, _RELEASED = 0, 1, 2, 3


class Reservation:
    """Space in the data area lent for one write's payload (see the module
    docstring). ``buf`` is where the payload is received (writable, exactly
    ``length`` bytes); ``data`` the read-only view the request carries down
    the chain. `filled` after bytes landed; `release` once the request is
    over (published or not). Not thread-safe, like the splitter."""

    __slots__ = ("_owner", "pos", "end", "length", "buf", "data", "_hasher", "hashed", "hash_ns", "state")

    def __init__(self, owner: "RingSplitter", pos: int, end: int, buf: memoryview, checksum: bool) -> None:
        self._owner = owner
        self.pos = pos  # logical start in the data area
        self.end = end
        self.length = end - pos
        self.buf = buf
        self.data = buf.toreadonly()
        self._hasher = xxh3_stream() if checksum else None
        self.hashed = 0  # bytes of buf already fed to the checksum
        self.hash_ns = 0  # time spent checksumming (the splitter's cost, counted in its histogram)
        self.state = _HELD

    def filled(self, n: int) -> None:
        """The first ``n`` bytes of ``buf`` hold the payload: checksum the
        new ones now, while they are hot in cache."""
        h = self._hasher
        if h is not None and n > self.hashed:
            t0 = perf_counter_ns()
            h.update(self.buf[self.hashed: n])
            self.hash_ns += perf_counter_ns() - t0
        self.hashed = max(self.hashed, min(n, self.length))

    def checksum(self) -> int:
        """The payload's checksum (every byte of it: the rest is hashed now if
        `filled` did not see it all)."""
        if self.hashed < self.length:
            self.filled(self.length)
        return self._hasher.intdigest() & M32 if self._hasher is not None else 0

    def release(self) -> None:
        """The request is over: the host reads ``buf`` no more. Unpublished,
        the space is given back (the card never saw it). Idempotent."""
        if self.state != _RELEASED:
            self._owner._release(self)


class RingSplitter:
    """Host half of the ring transport (see module docstring)."""

    TRANSPORT = "ring"  # the card's hello must name it (a subclass speaking another layout names its own)
    HELLO_FDS = 2  # descriptors the hello carries: the doorbell and the completion eventfd

    def __init__(
        self, sock: socket.socket, hv: HiddenVolume, doorbell: int, card_pid: int,
        stale_after_ns: int = DEFAULT_STALE_AFTER_NS, checksum: bool = True, cq_wake: int | None = None,
    ) -> None:
        self._sock = sock
        self._hv = hv
        self._efd = doorbell
        self.wake_fd = cq_wake  # readable when the card posted completions while we sleep (`arm_wake`)
        self._ack_sleeps = 0
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
        self._sq_tail = c[SQ_TAIL]
        self._sq_head_c = c[SQ_HEAD]
        self._cq_head = c[CQ_HEAD]
        self._data_tail = c[DATA_TAIL]
        self.last_position = self._data_tail  # position of the last split (see released_position)
        self._data_head_c = c[DATA_HEAD]
        # Reservations (module docstring): the next payload goes at _rtail;
        # _held are the ones not released yet, in position order (pinned).
        self._rtail = self._data_tail
        self._held: deque[Reservation] = deque()
        self._lent: dict[int, Reservation] = {}  # id(reservation.data) -> reservation, while held
        self.last_prepaid_ns = 0  # checksum time the last submit's payload cost before it (in-place writes)
        self._n_reserved = self._n_in_place = self._n_moved = self._n_dropped = self._n_no_room = 0
        c[R.Counter.HOST_PID] = os.getpid()
        c[R.Counter.HOST_ATTACH_NS] = monotonic_ns()
        c[HOST_WAITING] = 0  # a host that died asleep left it set: the card would wake nobody each round
        # Tracker table (SPDK style): io_id -> _WAITING / _ABANDONED (timed
        # out, its late ack will be dropped).  Acks are matched by io_id, so
        # they may come in any order; verdicts for io_ids other than the one
        # being waited for park in _done.  Abandoned entries are bounded by
        # both rings' capacity (beyond that the card cannot still owe them).
        self._inflight: dict[int, int] = {}
        self._done: dict[int, bool] = {}
        self._n_abandoned = 0
        self._n_late = 0
        self._late_verdicts: list[tuple[int, bool]] = []
        self._abandon_cap = g.sq_entries + g.cq_entries
        self._dead = False
        self._closed = False
        self._submitted = self._acked = self._rejected = self._timeouts = 0
        self._full_sq = self._full_data = self._unhealthy = self._invalid = 0
        self._doorbells = self._spins = self._outcomes = self._late = self._unknown = self._bytes = 0
        self._warn = RateLimitedLog()

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
                msg, fds, flags, _ = socket.recv_fds(s, MAX_CONTROL_MSG, cls.HELLO_FDS)
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
            if len(fds) != cls.HELLO_FDS:
                raise TransportUnavailable(f"card at {control_socket} sent {len(fds)} descriptors, "
                                           f"expected {cls.HELLO_FDS}")
            try:
                if info.get("transport") != cls.TRANSPORT or info.get("version") != R.VERSION:
                    raise TransportUnavailable(
                        f"card speaks {info.get('transport')!r} v{info.get('version')}, "
                        f"we speak {cls.TRANSPORT!r} v{R.VERSION}"
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
        return cls._from_hello(s, hv, fds, card_pid, info, stale_after_ns=stale_after_ns, checksum=checksum)

    @classmethod
    def _from_hello(cls, s: socket.socket, hv: HiddenVolume, fds: list[int], card_pid: int, info: dict,
                    **kw) -> "RingSplitter":
        """Build the host half from the card's hello (a subclass with more
        descriptors, `HELLO_FDS`, takes the rest: shadow's device queue)."""
        return cls(s, hv, fds[0], card_pid, cq_wake=fds[1], **kw)

    # -- the hot path ------------------------------------------------------------

    def split(self, w: AugmentedWrite, timeout_ns: int) -> bool:
        """Submit ``w`` and spin for its ack, at most ``timeout_ns``."""
        now = monotonic_ns()
        if not self.submit(w):
            return False
        return self.wait_ack(w.io_id, now + timeout_ns)

    def submit(self, w: AugmentedWrite) -> bool:
        """Publish ``w`` without waiting (the ``_nowait`` half of `split`).
        False if the card is unhealthy or there is no room; then nothing was
        published.  Every True must be followed by ``wait_ack(w.io_id, ...)``.
        A QD1 write pays each call several times its hot cost (cold caches),
        so the checks and a copied WRITE (no reservation lent or pinned) are
        inline: the stores of `_submit_general` in its order."""
        c = self._ctr
        now = monotonic_ns()
        if (self._dead or now - c[HEARTBEAT] > self._stale_ns or c[STATE] == CLOSED) and not self._live(now):
            return False
        tail = self._sq_tail
        if tail - self._sq_head_c >= self._sq_n and self._sq_full(tail):
            return False
        length = w.length
        if w.op != K_WRITE or self._lent or self._held:
            return self._submit_general(w, tail)
        payload = w.data
        if payload is None or len(payload) != length or not length:
            return self._invalid_record(w, "WRITE payload missing or not `length` bytes")
        size = self._dsize
        pos = self._rtail
        off = pos % size
        if off + length > size:
            pos += size - off
            off = 0
        end = pos + length
        if end - self._data_head_c > size:
            self._data_head_c = c[DATA_HEAD]
            if end - self._data_head_c > size:
                self._full_data += 1
                return False
        io_id = w.io_id
        if io_id in self._inflight:
            return self._invalid_record(w, "io_id already in flight")
        self._data[off: off + length] = payload  # the one copy
        if self._csum:
            csum, dflags = xxh3(payload) & M32, DF_CSUM
        else:
            csum = dflags = 0
        try:
            desc_pack(
                self._sq, (tail & self._sq_mask) << 6, K_WRITE, w.flags, dflags, 0, length, io_id, w.cg_seq,
                w.cg_id, w.vdisk_id, w.voffset, w.timestamp_ns, pos, csum, tail & M32,
            )
        except struct.error as e:
            return self._invalid_record(w, str(e))
        self.last_prepaid_ns = 0
        self._data_tail = self._rtail = self.last_position = c[DATA_TAIL] = end
        self._bytes += length
        self._inflight[io_id] = _WAITING
        self._submitted += 1
        tail += 1
        self._sq_tail = tail
        c[SQ_TAIL] = tail  # publish (TSO: payload and descriptor are visible first)
        fence()
        if c[STATE] == SLEEPING:
            self._ring()
        return True

    def _live(self, now: int) -> bool:
        """The card can take a submission now (not dead, closed or silent);
        counts the refusals.  Shared by this transport's subclasses."""
        if self._dead:
            self._unhealthy += 1
            return False
        c = self._ctr
        if now - c[HEARTBEAT] > self._stale_ns or c[STATE] == CLOSED:
            self._unhealthy += 1
            if c[STATE] == CLOSED:
                self._set_dead(f"card closed the {self.TRANSPORT} transport")
            return False
        return True

    def _submit_general(self, w: AugmentedWrite, tail: int) -> bool:
        """`submit` of everything but a copied WRITE: records without a
        payload, and WRITEs while reservations are lent or pinned (in place,
        moved, or copied past them)."""
        op = w.op
        length = w.length
        data_pos = csum = dflags = end = 0
        res = None
        self.last_prepaid_ns = 0
        if op == K_WRITE:
            payload = w.data
            if payload is None or len(payload) != length or not length:
                return self._invalid_record(w, "WRITE payload missing or not `length` bytes")
            if self._lent:
                res = self._lent.get(id(payload))
                if res is not None and (res.data is not payload or res.state != _HELD):
                    res = None
            if res is not None and res.pos >= self._data_tail:
                pos = res.pos  # in place: the payload is there already (rule 2)
                end = res.end
                if self._csum:
                    csum = res.checksum()
                    dflags = DF_CSUM
            else:
                place = self._place(length)
                if place is None:
                    self._full_data += 1
                    return False
                pos, off, end = place
                if res is not None:  # moved (rule 2): its checksum is known, its bytes copied
                    if self._csum:
                        csum = res.checksum()
                        dflags = DF_CSUM
                    self._data[off: off + length] = res.buf
                else:
                    self._data[off: off + length] = payload  # the one copy
                    if self._csum:
                        csum = xxh3(payload) & M32
                        dflags = DF_CSUM
            data_pos = pos
        io_id = w.io_id
        if io_id in self._inflight:
            return self._invalid_record(w, "io_id already in flight")
        try:
            desc_pack(
                self._sq, (tail & self._sq_mask) << 6, op, w.flags, dflags, 0, length, io_id, w.cg_seq,
                w.cg_id, w.vdisk_id, w.voffset, w.timestamp_ns, data_pos, csum, tail & M32,
            )
        except struct.error as e:
            return self._invalid_record(w, str(e))
        if end:
            self._data_tail = end
            if end > self._rtail:
                self._rtail = end
            self._ctr[DATA_TAIL] = end
            self.last_position = end
            if res is not None:
                self.last_prepaid_ns = res.hash_ns
                if res.pos == data_pos:
                    res.state = _IN_PLACE
                    self._n_in_place += 1
                else:
                    res.state = _MOVED
                    self._n_moved += 1
                    self._bytes += length
            else:
                self._bytes += length
        else:
            # No payload: count it durable only once a *later* write's payload
            # is released (conservative: the card holds no space for it).
            self.last_position = self._data_tail + 1
        self._inflight[io_id] = _WAITING
        self._submitted += 1
        self._publish(tail + 1)
        return True

    # -- reservations (module docstring) ----------------------------------------

    def reserve(self, length: int) -> Reservation | None:
        """Lend ``length`` bytes of the data area for a payload about to be
        received; None (the write takes the copy path) when the card is
        gone or there is no room now. Every reservation must be released."""
        if self._dead or not 0 < length <= self._dsize or self._ctr[STATE] == CLOSED:
            return None
        place = self._place(length)
        if place is None:
            self._n_no_room += 1
            return None
        pos, off, end = place
        self._rtail = end
        r = Reservation(self, pos, end, self._data[off: off + length], self._csum)
        self._held.append(r)
        self._lent[id(r.data)] = r
        self._n_reserved += 1
        return r

    def _place(self, length: int) -> tuple[int, int, int] | None:
        """Where a payload of ``length`` goes next, past everything published
        or reserved: (position, offset in the area, end), contiguous (a
        payload that does not fit before the area's end pads to the next
        lap); None when the card's head leaves no room for it."""
        size = self._dsize
        pos = self._rtail
        off = pos % size
        if off + length > size:
            pos += size - off
            off = 0
        end = pos + length
        return (pos, off, end) if self._room(end) else None

    def _room(self, end: int) -> bool:
        """A payload may end at ``end``: within one lap of the card's head
        and of the oldest pinned reservation (rule 4). The card's head is
        re-read only when the cached one says full."""
        size = self._dsize
        held = self._held
        if held and end - held[0].pos > size:
            return False
        if end - self._data_head_c > size:
            self._data_head_c = self._ctr[DATA_HEAD]
            if end - self._data_head_c > size:
                return False
        return True

    def _release(self, r: Reservation) -> None:
        if r.state == _HELD:
            self._n_dropped += 1
        r.state = _RELEASED
        self._lent.pop(id(r.data), None)
        held = self._held
        while held and held[0].state == _RELEASED:
            held.popleft()
        # Roll the tail back over trailing space nobody holds (rule 3): to the
        # end of the last reservation still held, or of the last payload published.
        rt = self._data_tail
        for h in reversed(held):
            if h.state != _RELEASED:
                if h.end > rt:
                    rt = h.end
                break
        self._rtail = rt

    def _sq_full(self, tail: int) -> bool:
        """True (and counted) if the SQ has no free slot at ``tail``; the
        card's head is re-read only when the cached one says full."""
        if tail - self._sq_head_c >= self._sq_n:
            self._sq_head_c = self._ctr[SQ_HEAD]
            if tail - self._sq_head_c >= self._sq_n:
                self._full_sq += 1
                return True
        return False

    def _publish(self, tail: int) -> None:
        """Move the SQ tail to ``tail`` and wake the card if it sleeps."""
        self._sq_tail = tail
        self._ctr[SQ_TAIL] = tail  # publish (TSO: payload and descriptor are visible first)
        fence()
        if self._ctr[STATE] == SLEEPING:
            self._ring()

    @property
    def data_size(self) -> int:
        """Bytes of the hidden volume's data area (payload positions wrap at it)."""
        return self._dsize

    def released_position(self) -> int:
        """Payload position below which the card has released everything
        (shipped durable or dropped). A split whose `last_position` is at or
        below it needs no dirty mark if the card is lost. Readable after the
        card died: the hidden volume stays mapped."""
        return self._ctr[DATA_HEAD]

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
            ctail = c[CQ_TAIL]
            if ctail == cq_head + 1:  # QD1: one completion, without `_drain`'s loop
                cid = self._take_lone_ok(c, cq_head)
                if cid == io_id:
                    return True
                if cid is not None:  # another waiter's: kept for its wait_ack, as `_drain` keeps it
                    self._done[cid] = True
                    cq_head = ctail
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
        self.poll_ack(-1)

    def poll_ack(self, io_id: int) -> bool | None:
        """`reap`, then `take_ack(io_id)`, in one call (QD1: the lone completion there is usually this io's)."""
        c = self._ctr
        head = self._cq_head
        ctail = c[CQ_TAIL]
        if ctail != head:
            cid = self._take_lone_ok(c, head) if ctail == head + 1 else None
            if cid == io_id:
                return True
            if cid is not None:
                self._done[cid] = True
            else:
                self._drain(ctail, -1)
        return self._done.pop(io_id, None) if self._done else None

    def _take_lone_ok(self, c, head: int) -> int | None:
        """The io_id of the completion at ``head`` if it is an OK for a
        waiting io: consumed and counted as `_drain` would; else None and
        nothing consumed (`_drain` takes it, with its checks and warnings)."""
        cid, status, _reason, _r, seq = cqe_unpack(self._cq, (head & self._cq_mask) << 4)
        if status != OK or seq != head & M32 or self._inflight.get(cid) != _WAITING:
            return None
        del self._inflight[cid]
        self._acked += 1
        self._cq_head = head + 1
        c[CQ_HEAD] = head + 1
        return cid

    def arm_wake(self) -> bool:
        """Before sleeping on `wake_fd` for acks: set HOST_WAITING, fence, and
        look again. True if completions came meanwhile (do not sleep: reap).
        The card writes the eventfd after a CQ publication while the flag is
        set (wire/ring.py MEMORY ORDERING), so no wake-up is lost."""
        c = self._ctr
        c[HOST_WAITING] = 1
        fence()
        self._ack_sleeps += 1
        return self._completion_pending()

    def disarm_wake(self) -> None:
        """Nobody waits for acks: the card need not write the eventfd."""
        if not self._closed:
            self._ctr[HOST_WAITING] = 0

    def clear_wake(self) -> None:
        """Consume the eventfd's count (nonblocking) before reaping."""
        try:
            os.eventfd_read(self.wake_fd)
        except BlockingIOError:
            pass

    def _completion_pending(self) -> bool:
        return self._ctr[CQ_TAIL] != self._cq_head

    def take_ack(self, io_id: int) -> bool | None:
        """The verdict for ``io_id`` if its completion was reaped, else None."""
        return self._done.pop(io_id, None) if self._done else None

    def abandon(self, io_id: int) -> bool:
        """Give up on ``io_id`` (its deadline passed); a late ack is dropped."""
        done = self._done.pop(io_id, None) if self._done else None
        if done is not None:
            return done
        return self._timed_out(io_id)

    def detach(self, io_id: int) -> bool | None:
        """Stop waiting for ``io_id`` but keep it: its verdict, if not here
        yet (None), is kept for `take_late` when it arrives.  The write stays
        in the ring in order; only the caller's wait ends (a late ack is not a
        lost write)."""
        done = self._done.pop(io_id, None) if self._done else None
        if done is not None:
            return done
        if self._inflight.get(io_id) == _WAITING:
            self._timeouts += 1
            self._inflight[io_id] = _LATE
            self._n_late += 1
            return None
        return False  # never submitted, or already settled: nothing is in flight

    def take_late(self) -> list[tuple[int, bool]]:
        """Verdicts (io_id, acked) of detached io_ids reaped so far."""
        self.reap()
        out, self._late_verdicts = self._late_verdicts, []
        return out

    def _drain(self, ctail: int, want: int) -> bool | None:
        """Consume completions up to ``ctail``; the verdict for ``want`` if seen.
        Verdicts for other in-flight io_ids are kept for their ``wait_ack``."""
        cq, mask = self._cq, self._cq_mask
        head = self._cq_head
        got = None
        inflight = self._inflight
        while head != ctail:
            io_id, status, reason, _r, seq = cqe_unpack(cq, (head & mask) << 4)
            head += 1
            if seq != (head - 1) & M32:
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
            ok = status == OK
            if state == _LATE:
                self._late += 1
                self._n_late -= 1
                self._late_verdicts.append((io_id, ok))
                if not ok:
                    self._rejected += 1
                    self._warn("ring: card refused late io %d: %s", io_id, reason_name(reason))
                else:
                    self._acked += 1
                continue
            if ok:
                self._acked += 1
            else:
                self._rejected += 1
                self._warn("ring: card refused io %d: %s", io_id, reason_name(reason))
            if io_id == want:
                got = ok
            else:
                self._done[io_id] = ok
        self._cq_head = head
        self._ctr[CQ_HEAD] = head
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
        log.error("ring: io %d cannot be encoded (%s): %s", w.io_id, why, brief(w))
        return False

    # -- outcomes ------------------------------------------------------------------

    def post_outcome(self, io_id: int, status: Status) -> bool:
        if self._dead:
            return False
        tail = self._sq_tail
        if self._sq_full(tail):
            return False
        try:
            desc_pack(self._sq, (tail & self._sq_mask) << 6, K_OUTCOME, 0, 0, status, 0, io_id,
                       0, 0, 0, 0, 0, 0, 0, tail & M32)
        except struct.error as e:
            self._invalid += 1
            log.error("ring: outcome for io %d cannot be encoded: %s", io_id, e)
            return False
        self._outcomes += 1
        self._publish(tail + 1)
        return True

    # -- health, stats, close ---------------------------------------------------------

    def healthy(self) -> bool:
        if self._dead:
            return False
        c = self._ctr
        if c[STATE] == CLOSED:
            self._set_dead("card closed the ring")
            return False
        if not self._socket_alive():
            self._set_dead("card control socket closed")
            return False
        return monotonic_ns() - c[HEARTBEAT] <= self._stale_ns

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
            unknown_acks=self._unknown, bytes=self._bytes, abandoned=self._n_abandoned, late=self._n_late,
            reserved=self._n_reserved, in_place=self._n_in_place, moved=self._n_moved, dropped=self._n_dropped,
            no_room=self._n_no_room, held=sum(1 for r in self._held if r.state != _RELEASED),
            ack_sleeps=self._ack_sleeps,
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._dead = True
        try:
            if not self._hv.closed:
                self._ctr[R.Counter.HOST_PID] = 0
                self._ctr[HOST_WAITING] = 0
        except ValueError:  # view already released
            pass
        self._sock.close()
        os.close(self._efd)
        if self.wake_fd is not None:
            os.close(self.wake_fd)
        self._hv.close()

    def __enter__(self) -> "RingSplitter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
