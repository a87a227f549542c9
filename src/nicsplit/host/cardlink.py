"""The host's link to the offload card, shared by every splitter filter.

Rules:
- The link never blocks production: connecting is tried at most once per
  ``retry_s`` with a short timeout, and a missing card just means "no
  transport" (the splitter then marks).
- Acked is not yet protected: the card acknowledged a write, but it is only
  safe once the appliance holds it durably. The link keeps every split write
  until the card reports its payload released (shipped and durable, or
  dropped); if the card is lost, every write still kept is marked dirty in its
  vdisk's map, so a resync covers it (P1).
- A late ack is not a lost write: a write whose ack misses its deadline
  stays in flight in the ring, in order (the transport's ``detach``); the
  client's reply goes on (P4) and the write is *unconfirmed* until the card's
  verdict settles it: acked, it joins the kept list like any other; refused,
  its region is marked. If the card dies first, it is marked with the rest.
- A write is bound to the card it went to: a wait, a late verdict or an ack
  taken after that card was lost marks its region at once (the lost card's
  verdicts never come, and its payload positions mean nothing to the next
  card's release counter).
- Waiting for acks is pipelined: a write is published to the card, goes on
  to the datastore, and only its *reply* waits for the ack. A short spin
  catches the common case (the ack is there within microseconds); beyond it
  the wait becomes an asyncio future, so the host keeps taking other
  requests meanwhile — one spinning write must not serialize a queue depth
  of 16 behind the card's round trip. The loop does not spin for it either:
  a transport with a completion eventfd (`wake_fd`: ring, nvme-pi, shadow)
  is armed (`arm_wake`) and the loop sleeps until the card writes it after
  posting completions, or until the earliest deadline's timer; the poller
  then reaps. A spinning loop cost the host a core's share the card and the
  appliance need on a shared box. Deadlines are enforced by the same
  poller (P4).
- The kept list is bounded by the card's own capacity (a write the card has
  not released occupies hidden-volume space), plus ``max_tracked`` as a hard
  stop: beyond it the oldest entries' regions are marked dirty at once.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from time import monotonic_ns
from pathlib import Path
from typing import Any

from nicsplit.card.lostlog import LostLogReader
from nicsplit.card.transports.base import open_splitter, splitter_class
from nicsplit.host.load import ALONE_SPIN_US, HostLoad

log = logging.getLogger(__name__)


class CardLink:
    def __init__(self, card_sock: Path, lost_log: Path, *, transport: str = "ring", retry_s: float = 0.5,
                 connect_timeout_s: float = 0.05, max_tracked: int = 1 << 20, spin_us: float = 20,
                 options: dict[str, Any] | None = None, dmaps: dict[int, Any] | None = None,
                 load: HostLoad | None = None, alone_spin_us: float = ALONE_SPIN_US) -> None:
        self.card_sock = Path(card_sock)  # the transport's rendezvous (Layout.card_sock)
        self.kind = transport
        self.options = dict(options or {})  # the transport's own (net: appliance address, data directory, ...)
        # A transport that connects on the event loop (net: TLS to the
        # appliance) is opened by a task, never in `get`'s caller.
        cls = splitter_class(transport)
        self._async_open = getattr(cls, "open_async", None)
        # A transport that completes its own ack futures (net) is not spun on.
        self._notifies = hasattr(cls, "ack_future")
        self._opening: asyncio.Task | None = None
        self.retry_s = retry_s
        self.connect_timeout_s = connect_timeout_s
        self.max_tracked = max_tracked
        self._t: Any = None
        self._last_try = 0.0
        self._tracked: collections.deque = collections.deque()
        self.losses = 0
        self.last_error = ""
        # How far this host has read and marked is kept next to the log, so
        # a restart reads what the card wrote while no host ran (issue 11 item 1).
        self._lost_log = LostLogReader(lost_log, Path(str(lost_log) + ".read"))
        self.spin_ns = int(spin_us * 1000)
        # A waiter that is its host's only request spins this long instead
        # (nicsplit.host.load); a link with no host load never counts as alone.
        self.load = load
        self.alone_spin_ns = max(self.spin_ns, int(alone_spin_us * 1000))
        self._waiting: dict[int, tuple[asyncio.Future, int]] = {}  # io_id -> (future, deadline)
        self._poller_scheduled = False
        self._watched: int | None = None  # the transport's wake_fd while the loop watches it
        self._timer: asyncio.TimerHandle | None = None  # the earliest waiting deadline's
        self._timer_ns = 0
        self.async_waits = 0
        self.spin_ns_total = 0  # time spent spinning for acks not there at once
        # vdisk id -> DirtyMap, for the card's lost-writes log; shared by every
        # link of a host, so a vdisk now on another transport is still marked
        self._dmaps: dict[int, Any] = {} if dmaps is None else dmaps
        self._late: dict[int, tuple[int, Any, int, int]] = {}  # io_id -> (position, dmap, offset, length)
        # Verdicts of late writes that came before the write was registered
        # late (its waiter resumes a loop turn after the poller ended its wait).
        self._early: collections.OrderedDict[int, bool] = collections.OrderedDict()
        self.late_refused = 0

    def register(self, vdisk_id: int, dmap: Any) -> None:
        self._dmaps[vdisk_id] = dmap

    def read_lost(self) -> int:
        """Mark what the card's lost-writes log added since the last read
        (also what it wrote while no host ran: called at start); returns how
        many entries were read."""
        return self._read_lost()

    def _read_lost(self) -> int:
        entries = self._lost_log.read_new()
        if not entries:
            return 0
        touched = {}
        for e in entries:
            d = self._dmaps.get(e.get("vdisk_id"))
            if d is None:
                log.error("card reports a lost write on unknown vdisk id %s", e.get("vdisk_id"))
                continue
            d.enter_marking("card dropped acknowledged writes: " + str(e.get("reason", "")))
            d.mark(int(e["offset"]), int(e["length"]))
            touched[id(d)] = d
        for d in touched.values():
            d.sync()  # the marks are durable before the log's progress is
        self._lost_log.commit()
        return len(entries)

    def get(self) -> Any:
        """The transport, or None when no card is reachable now."""
        t = self._t
        if t is not None:
            return t
        if self._opening is not None:
            return self._opened()
        now = time.monotonic()
        if now - self._last_try < self.retry_s:
            return None
        self._last_try = now
        if self._async_open is not None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.last_error = f"the {self.kind} transport connects only on the host's event loop"
                return None
            self._opening = loop.create_task(self._async_open(str(self.card_sock), **self.options),
                                             name=f"open {self.kind} transport")
            return None
        try:
            self._t = self._connect()
            dev = getattr(self._t, "device", None)
            if dev is not None:  # shadow's real halves wait by the same rule
                dev.load, dev.alone_spin_ns = self.load, self.alone_spin_ns
            log.info("attached to the card through the %s transport", self.kind)
        except Exception as e:  # any failure to attach means "no card now"
            self.last_error = str(e)
            log.debug("card not reachable: %s", e)
            self._t = None
        return self._t

    def _opened(self) -> Any:
        """The transport an `open_async` task made, once it is done (else None)."""
        task = self._opening
        if not task.done():
            return None
        self._opening = None
        self._last_try = time.monotonic()
        try:
            self._t = task.result()
            log.info("attached through the %s transport", self.kind)
        except asyncio.CancelledError:
            self.last_error = "connection attempt cancelled"
        except Exception as e:  # any failure to attach means "no transport now"
            self.last_error = str(e)
            log.debug("%s transport not reachable: %s", self.kind, e)
        return self._t

    def _connect(self) -> Any:
        return open_splitter(self.kind, str(self.card_sock), timeout=self.connect_timeout_s, **self.options)

    # -- acks ------------------------------------------------------------
    def wait_ack(self, t: Any, io_id: int, deadline_ns: int) -> "bool | None | asyncio.Future":
        """The verdict for a submitted io: a bool now (acked within the spin,
        or refused), None when the deadline passed without one (the write is
        late: still in flight, see `late`), else a future the ack poller
        completes with one of those. A write submitted to a card that was
        lost since gets False (refused: the caller marks its region): that
        card's verdicts will never come, and its loss marked only what it
        had acked (a late write registered now would wait forever)."""
        if t is not self._t:
            return False
        if self._notifies:  # the transport completes its own futures (net: no spinning for a round trip)
            return t.ack_future(io_id, deadline_ns)
        v = t.poll_ack(io_id)
        if v is not None:
            return v
        load = self.load
        t0 = now = monotonic_ns()
        spin_until = min(deadline_ns, t0 + (self.alone_spin_ns if load is not None and load.alone() else self.spin_ns))
        while now < spin_until:
            v = t.poll_ack(io_id)
            now = monotonic_ns()
            if v is not None:
                self.spin_ns_total += now - t0
                return v
        # The host's spin for a late ack: CPU the card's latency costs the
        # host, reported apart from its own work per write (as the card's
        # empty polls are).
        self.spin_ns_total += now - t0
        if now >= deadline_ns:
            return t.detach(io_id)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._waiting[io_id] = (fut, deadline_ns)
        self.async_waits += 1
        if self._timer is None or deadline_ns < self._timer_ns:
            self._set_timer(loop, deadline_ns)
        if not self._poller_scheduled:
            self._wait_for_card(loop, t)
        return fut

    def _wait_for_card(self, loop: asyncio.AbstractEventLoop, t: Any) -> None:
        """Have `_poll_acks` run when the card posts completions: sleep on
        the transport's completion eventfd, or (a transport without one)
        poll on the next loop round."""
        fd = getattr(t, "wake_fd", None)
        if fd is not None:
            if self._watched != fd:
                self._unwatch()
                loop.add_reader(fd, self._on_wake, t)
                self._watched = fd
            if not t.arm_wake():
                return  # asleep until the card writes the eventfd, or the deadline timer
        self._poller_scheduled = True
        loop.call_soon(self._poll_acks)

    def _on_wake(self, t: Any) -> None:
        t.clear_wake()
        if not self._poller_scheduled:
            self._poll_acks()

    def _set_timer(self, loop: asyncio.AbstractEventLoop, deadline_ns: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_ns = deadline_ns
        self._timer = loop.call_at(deadline_ns / 1e9, self._on_deadline)  # loop.time() is time.monotonic()

    def _on_deadline(self) -> None:
        self._timer = None
        if not self._poller_scheduled:
            self._poll_acks()

    def _unwatch(self) -> None:
        """Stop watching a transport's eventfd (before it is closed)."""
        if self._watched is not None:
            try:
                asyncio.get_running_loop().remove_reader(self._watched)
            except RuntimeError:  # no loop runs (closing at exit): nothing watches it
                pass
            self._watched = None

    def _poll_acks(self) -> None:
        """Complete waiting acks; then sleep again (`_wait_for_card`) while
        any remain, with a timer for the earliest deadline."""
        self._poller_scheduled = False
        waiting = self._waiting
        t = self._t
        if not waiting:
            self._idle(t)
            return
        if t is None:  # the card was lost: nobody will ack
            for fut, _ in waiting.values():
                if not fut.done():
                    fut.set_result(False)
            waiting.clear()
            self._idle(t)
            return
        t.reap()
        now = monotonic_ns()
        for io_id in list(waiting):
            fut, deadline = waiting[io_id]
            v = t.take_ack(io_id)
            if v is None:
                if now < deadline:
                    continue
                v = t.detach(io_id)  # True / False, or None: late
            del waiting[io_id]
            if not fut.done():
                fut.set_result(v)
        if not waiting:
            self._idle(t)
            return
        loop = asyncio.get_running_loop()
        if self._timer is None or self._timer_ns <= now:
            self._set_timer(loop, min(d for _, d in waiting.values()))
        self._wait_for_card(loop, t)

    def _idle(self, t: Any) -> None:
        """No ack is awaited: the card need not wake us, no deadline runs."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if t is not None and self._watched is not None:
            t.disarm_wake()

    def late(self, io_id: int, position: int, dmap: Any, offset: int, length: int, transport: Any = None) -> None:
        """Keep a write whose ack missed its deadline as unconfirmed until
        the card's verdict arrives (`settle`) or the card is lost. With the
        ``transport`` it went to: if that card was lost meanwhile (the caller
        awaited between), its region is marked now."""
        if self._gone(transport, dmap, offset, length):
            return
        e = (position, dmap, offset, length)
        ok = self._early.pop(io_id, None) if self._early else None
        if ok is None:
            self._late[io_id] = e
        else:
            self._verdict(e, ok)

    def _gone(self, transport: Any, dmap: Any, offset: int, length: int) -> bool:
        """A write of a card lost since (``transport`` is not the link's):
        `lost` marked what that card held and its verdicts and positions
        mean nothing to the next one, so mark the region at once."""
        if transport is None or transport is self._t:
            return False
        dmap.enter_marking("card lost before the write was durable")
        dmap.mark(offset, length)
        return True

    def settle(self) -> None:
        """Apply the verdicts of late writes: an ack makes the write kept like
        any acked one; a refusal marks its region (the card will not ship it)."""
        t = self._t
        if t is None or not self._late:
            return
        for io_id, ok in t.take_late():
            e = self._late.pop(io_id, None)
            if e is None:  # its waiter has not registered it yet: `late` applies it
                self._early[io_id] = ok
                if len(self._early) > self.max_tracked:
                    self._early.popitem(last=False)  # a waiter that never came (cancelled)
                continue
            self._verdict(e, ok)

    def _verdict(self, e: tuple[int, Any, int, int], ok: bool) -> None:
        if ok:
            self._tracked.append(e)
            return
        _, d, o, n = e
        self.late_refused += 1
        d.enter_marking("card refused a write after its deadline (full, or a bad record)")
        d.mark(o, n)

    def track(self, position: int, dmap: Any, offset: int, length: int, transport: Any = None) -> None:
        """Keep an acked write until the card releases its position (with
        ``transport``: marked at once if that card was lost meanwhile)."""
        if self._gone(transport, dmap, offset, length):
            return
        tr = self._tracked
        tr.append((position, dmap, offset, length))
        if len(tr) > self.max_tracked:
            _, d, o, n = tr.popleft()
            d.enter_marking("card backlog beyond the host's tracking bound")
            d.mark(o, n)

    def trim(self) -> None:
        """Forget writes the card has released (durable at the appliance)."""
        t = self._t
        tr = self._tracked
        if t is None or not (tr or self._late):
            return
        self.settle()
        released = t.released_position()
        self._read_lost()  # after the watermark: see nicsplit.card.lostlog
        while tr and tr[0][0] <= released:
            tr.popleft()

    def lost(self, reason: str, transport: Any = None) -> None:
        """The card is gone or unusable: mark everything not known durable.
        With ``transport``: only if it is still the link's (a caller holding
        the transport of a card lost earlier must not drop its successor)."""
        if transport is not None and transport is not self._t:
            return
        if self._t is not None:
            self.trim()  # the hidden volume stays mapped: its counters are readable
            self._unwatch()
            try:
                self._t.close()
            except OSError as e:
                log.debug("closing the lost card transport: %s", e)
            self._t = None
            self.losses += 1
            self._last_try = time.monotonic()
        self.last_error = reason
        self._read_lost()
        n = len(self._tracked) + len(self._late)
        for _, d, o, ln in [*self._tracked, *self._late.values()]:
            d.enter_marking(reason)
            d.mark(o, ln)
        self._tracked.clear()
        self._late.clear()
        self._early.clear()
        if self._waiting and not self._poller_scheduled:  # their card is gone: refused on the next round
            self._poller_scheduled = True
            asyncio.get_running_loop().call_soon(self._poll_acks)  # waits exist only on the loop
        if n:
            log.warning("card lost (%s): %d unconfirmed writes marked dirty", reason, n)

    @property
    def attached(self) -> bool:
        return self._t is not None

    @property
    def tracked(self) -> int:
        return len(self._tracked)

    @property
    def unconfirmed(self) -> int:
        """Late writes whose verdict has not arrived."""
        return len(self._late)

    def unconfirmed_for(self, dmap: Any) -> int:
        """Late writes of one vdisk (its dirty map) without a verdict."""
        return sum(1 for e in self._late.values() if e[1] is dmap) if self._late else 0

    def close(self) -> None:
        if self._opening is not None:
            self._opening.cancel()
            self._opening = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._t is not None:
            self._unwatch()
            try:
                self._t.close()
            except OSError as e:
                log.debug("closing the card transport: %s", e)
            self._t = None
