"""Card half of the ring transport: `RingEndpoint`, used by the card
pipeline to take writes and outcomes from the SQ, ack them on the CQ and
free payloads once shipped; it also serves the control socket that hands
the hidden volume and the doorbell to one host at a time.  The protocol
(set-up, card loop, rules) is in `nicsplit.card.transports.ring`."""

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
from typing import Callable
from pathlib import Path
from time import monotonic_ns

from xxhash import xxh3_64_intdigest as xxh3

from nicsplit.card.hidden import DEFAULT_DATA_SIZE, DEFAULT_ENTRIES, HiddenVolume
from nicsplit.card.transports.ring_shared import (
    CLOSED, CQ_HEAD, CQ_TAIL, DATA_HEAD, DATA_TAIL, DF_CSUM, FAILED, HEARTBEAT, HOST_WAITING, K_OUTCOME, K_WRITE, M32, OK, OPS,
    POLLING, R_FULL, SLEEPING, SOCKET_NAME, SQ_HEAD, SQ_TAIL, STATE, STATUSES, WFLAGS, RateLimitedLog, cqe_pack,
    desc_unpack, fence, peer_alive, reason_name,
)
from nicsplit.core.records import AugmentedWrite, Outcome
from nicsplit.wire import ring as R

__all__ = ["RingEndpoint", "EndpointStats"]

log = logging.getLogger("nicsplit.card.transports.ring")  # one logger for both halves


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
            # The host's "interrupt": written after a CQ publication only while
            # the host sleeps on it (HOST_WAITING), so a host never spins its
            # event loop for an ack (`_wake_host`).
            self._cq_efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
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
        # Told of every write-like entry acked FAILED (io_id, vdisk_id, voffset,
        # length, reason): the host may already have answered its client (a
        # late write) and may die before it hears the refusal, so the card
        # records it where the host reads it at its next start (the lost log).
        self.on_refused: Callable[[int, int, int, int, str], None] | None = None
        # (cg_id, cg_seq) of writes refused since the card last took them: the
        # pipeline's hold skips those seqs at once (`Hold.skip`)
        self.skipped: list[tuple[int, int]] = []
        self._counters_ns = 0
        self._sq_head = self._cq_tail = self._cq_head_c = 0
        self._data_expect = 0  # logical end of the last accepted payload allocation
        self._data_head = 0
        self._held: dict[int, list] = {}  # io_id -> [io_id, end, released] for payloads handed out
        self._order: collections.deque[list] = collections.deque()  # every tracked allocation, in order
        self._n_entries = self._n_writes = self._n_outcomes = self._n_bad = self._n_bytes = 0
        self._n_sleeps = self._n_wakeups = self._n_released = self._n_cq_full = self._n_refused_full = 0
        self._n_host_wakes = 0
        self._warn = RateLimitedLog()
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
        tail = c[SQ_TAIL]
        if tail == head:
            return []
        avail = tail - head
        if avail > self._sq_n or avail < 0:
            self._warn("ring: host published sq_tail %d with sq_head %d: ignored", tail, head)
            return []
        data_tail = c[DATA_TAIL]
        sq, cq, data = self._sq, self._cq, self._data
        sq_mask, cq_mask, size = self._sq_mask, self._cq_mask, self._dsize
        cq_tail = self._cq_tail
        held, order_append = self._held, self._order.append
        out: list[AugmentedWrite | Outcome] = []
        n = avail if avail < max_entries else max_entries
        for _ in range(n):
            (kind, wflags, dflags, status, length, io_id, cg_seq, cg_id, vdisk_id, voffset, ts, data_pos,
             csum, seq) = desc_unpack(sq, (head & sq_mask) << 6)
            if kind == K_OUTCOME:
                reason = R.check_fields(kind, wflags, dflags, status, length, data_pos, csum, seq, head)
                if reason:
                    self._n_bad += 1
                    self._warn("ring: bad outcome for io %d at %d: %s (dropped)", io_id, head,
                               reason_name(reason))
                else:
                    self._n_outcomes += 1
                    out.append(Outcome(io_id, STATUSES[status]))
                head += 1
                continue
            if cq_tail - self._cq_head_c >= self._cq_n:
                self._cq_head_c = c[CQ_HEAD]
                if cq_tail - self._cq_head_c >= self._cq_n:
                    self._n_cq_full += 1
                    break  # leave the rest in the SQ until the host drains the CQ
            reason = R.check_fields(kind, wflags, dflags, status, length, data_pos, csum, seq, head)
            if self._full and not reason:
                reason = R_FULL
            view = None
            track = False
            if (not reason or reason == R_FULL) and kind == K_WRITE:
                reason, track = self._check_payload(reason, data_pos, length, data_tail, dflags, csum)
                if not reason:
                    if io_id in held:
                        reason = R.AckReason.DUPLICATE
                    else:
                        off = data_pos % size
                        view = data[off: off + length]
            cqe_pack(cq, (cq_tail & cq_mask) << 4, io_id, FAILED if reason else OK, reason, 0, cq_tail & M32)
            cq_tail += 1
            c[CQ_TAIL] = cq_tail  # the ack is out before we look at the next entry
            if track:  # this payload's space is ours to free, good or bad
                h = [io_id, data_pos + length, reason != 0]
                order_append(h)
                self._data_expect = data_pos + length
                if not reason:
                    held[io_id] = h
                    self._n_bytes += length
            if reason and length and self.on_refused is not None:
                self.on_refused(io_id, vdisk_id, voffset, length, reason_name(reason))
            if reason and (track or reason == R_FULL):  # its seq is real: hold skips it
                self.skipped.append((cg_id, cg_seq))
            if reason == R_FULL:
                self._n_refused_full += 1
            elif reason:
                self._n_bad += 1
                self._warn("ring: refused io %d at %d (kind %d, %d bytes at %d): %s", io_id, head, kind, length,
                           data_pos, reason_name(reason))
            else:
                self._n_writes += 1
                out.append(AugmentedWrite(io_id, cg_id, cg_seq, vdisk_id, OPS[kind], WFLAGS[wflags], voffset,
                                          length, ts, view))
            head += 1
        consumed = head - self._sq_head
        self._sq_head = head
        if cq_tail != self._cq_tail:
            self._cq_tail = cq_tail
            self._wake_host()
        c[SQ_HEAD] = head
        self._n_entries += consumed
        if self._order and self._order[0][_H_RELEASED]:  # refused payloads at the front
            self._advance()
        return out

    def _wake_host(self) -> None:
        """After a CQ_TAIL store: write the completion eventfd if the host
        sleeps on it (the Dekker handshake of wire/ring.py: the fence makes
        CQ_TAIL visible before HOST_WAITING is read)."""
        fence()
        if self._ctr[HOST_WAITING]:
            self._n_host_wakes += 1
            os.eventfd_write(self._cq_efd, 1)

    def _check_payload(self, reason: int, data_pos: int, length: int, data_tail: int, dflags: int,
                       csum: int) -> tuple[int, bool]:
        """A WRITE's payload: inside what the host published, right after the
        last accepted one, not across the wrap; then its checksum. Returns
        (reason, track): track = its space is the card's to free, good or bad
        (a FULL refusal keeps ``reason`` and only frees it)."""
        size = self._dsize
        off = data_pos % size
        expect = self._data_expect
        if not (expect <= data_pos and data_pos - expect < size and data_pos + length <= data_tail
                and off + length <= size):
            return R.AckReason.BAD_RANGE, False
        if not reason and self._verify and dflags & DF_CSUM and xxh3(self._data[off: off + length]) & M32 != csum:
            return R.AckReason.BAD_CHECKSUM, True
        return reason, True

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
            self._ctr[DATA_HEAD] = end

    def fill(self) -> float:
        """Fraction of the data area held by payloads not yet released."""
        return (self._data_expect - self._data_head) / self._dsize

    # -- sleeping -----------------------------------------------------------------------

    def set_sleeping(self, sleeping: bool) -> None:
        self._ctr[STATE] = SLEEPING if sleeping else POLLING

    def doorbell_fd(self) -> int:
        return self._efd

    def pending(self) -> bool:
        """True if the host published entries not yet consumed."""
        return self._ctr[SQ_TAIL] != self._sq_head

    def wait_doorbell(self, timeout: float) -> bool:
        """Sleep until the host rings or ``timeout`` seconds pass; True if work
        is pending.  Keep ``timeout`` well under the host's staleness bound
        (100 ms): the card heartbeats only when it returns."""
        c = self._ctr
        c[STATE] = SLEEPING
        fence()  # SLEEPING is globally visible before we re-read sq_tail (Dekker)
        if c[SQ_TAIL] != self._sq_head:
            c[STATE] = POLLING
            return True
        self._n_sleeps += 1
        self.heartbeat()
        ready = self._poller.poll(max(0, int(timeout * 1000 + 0.999)))
        c[STATE] = POLLING
        if ready:
            try:
                os.eventfd_read(self._efd)
                self._n_wakeups += 1
            except BlockingIOError:
                pass
        self.heartbeat()
        return c[SQ_TAIL] != self._sq_head

    def heartbeat(self) -> None:
        """Prove the card loop alive (cheap: call it every loop round); also
        refreshes the header's card counters at most once per millisecond."""
        now = monotonic_ns()
        self._ctr[HEARTBEAT] = now
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
        self._ctr[STATE] = CLOSED
        os.write(self._wake_w, b"x")
        self._control.join(timeout=5)
        for fd in (self._wake_r, self._wake_w, self._efd, self._cq_efd):
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

    def _hello_fds(self) -> list[int]:
        """Descriptors sent with the hello (SCM_RIGHTS): the doorbell and the
        completion eventfd."""
        return [self._efd, self._cq_efd]

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
                    if events[host.fileno()] & (select.POLLHUP | select.POLLERR) or not peer_alive(host):
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
        if host is not None and not peer_alive(host):  # it left; its EOF may not be polled yet
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
            socket.send_fds(conn, [self._hello()], self._hello_fds())
        except OSError as e:
            log.warning("card: hello to a host failed: %s", e)
            conn.close()
            return host
        p.register(conn, select.POLLIN)
        self.host_pid = pid
        log.info("card: host pid %d attached to %s", pid, self.volume_path)
        return conn


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
