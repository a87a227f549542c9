"""The ``net`` transport: the classic network splitter, without a card.

The host half (`NetSplitter`) ships each write straight to the appliance over
the card's own protocol (TLS 1.3 with mutual certificates, the ``host``
certificate of the deployment's PKI; Hello / Batch / Ack frames of
`nicsplit.wire.frames`, sealed with the batch key) and the splitter waits for
the appliance's *durable* ack before the write goes down to the datastore.
There is no card half: nothing polls a ring, nothing buffers, nothing ships
later. It is here to show, measured, what the card saves: every write pays
the link's round trip plus the appliance's group commit.

Set-up: `open_async` (the host's `CardLink` awaits it on its event loop, so
a slow or blackholed appliance never blocks production) connects, says Hello
naming every CG of ``cgs.json`` and checks HelloAck. Afterwards everything
runs on the host's event loop thread:

- `submit` adds the write to the sans-IO `NetState` (its payload is copied)
  and schedules one flush per loop turn: writes submitted together (QD>1)
  share one Batch frame per CG, written with one ``write``;
- a reader task feeds every frame to `NetState`; a durable Ack settles its
  writes: their `ack_future` resolves True;
- a write whose deadline passes resolves False and is forgotten (its late
  ack is dropped): the splitter marks its region (P4);
- a link error, EOF, an Error frame, or no frame at all (ack or heartbeat)
  for ``dead_after_s`` after a write went out, makes the transport dead: every waiting write resolves False
  (the splitter marks) and `healthy` says False; `CardLink` then connects
  anew after ``retry_s``, and the resync (`nicsplit.host.resync`) copies the
  marked regions through the new link as ordinary writes.

Contract differences from the ring (see `base`):

- ``ack_first`` is True: the splitter waits for the ack *before* passing the
  write down (the classic splitter's order), so a write failed below the
  splitter is already journaled; the splitter marks its region and the
  resync journals production's content over it (a failed write never stays
  the latest state of its blocks in the journal);
- ``post_outcome`` has nothing to deliver (the appliance journaled the write
  at the ack): it returns True;
- an acked write is durable: `released_position` covers every acked write,
  so `CardLink` keeps nothing after the ack;
- no reservations (`reserve` returns None), no late verdicts (`detach`
  never leaves a write in flight).

Options (``[splitter]`` of nicsplit.toml, docs/operations.md "Choosing a
transport"): ``appliance`` (HOST:PORT), ``tls`` (True), ``encrypt`` (True),
``heartbeat_s`` (1.0), ``dead_after_s`` (5.0), ``connect_timeout_s`` (5.0),
``compress`` (False: zstd costs latency on the write path).

Example::

    t = await NetSplitter.open_async("unused", data=Path("DATA"), appliance="127.0.0.1:10810")
    t.submit(w); ok = await t.ack_future(w.io_id, monotonic_ns() + 10**9)
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from pathlib import Path
from time import monotonic, monotonic_ns, time_ns
from typing import Any

from nicsplit.card.transports.base import TransportUnavailable
from nicsplit.card.transports.net_state import NetProtocolError, NetState, NetStats
from nicsplit.core import pki
from nicsplit.core.cgs import CGCatalog, CGError
from nicsplit.core.layout import Layout
from nicsplit.core.records import AugmentedWrite, Status
from nicsplit.wire.frames import NEED_DATA, FrameDecoder, FrameError, Heartbeat, encode

__all__ = ["NetSplitter", "NetStats", "DEFAULT_TIMEOUT_US"]

log = logging.getLogger("nicsplit.card.transports.net")

# The splitter's default deadline for a net write (``split_timeout_us`` when
# the filter's option is not set): the appliance's group commit window (2 ms)
# plus an fdatasync (~1-10 ms on this class of disk, more under load) plus a
# WAN round trip, with room: a second. A write past it is marked, not lost.
DEFAULT_TIMEOUT_US = 1_000_000


class NetSplitter:
    """Host half of the net transport (see the module docstring)."""

    ack_first = True  # the splitter waits for the ack before passing the write down
    default_timeout_us = DEFAULT_TIMEOUT_US

    def __init__(self, state: NetState, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 heartbeat_s: float = 1.0, dead_after_s: float = 5.0, peer: str = "",
                 decoder: FrameDecoder | None = None) -> None:
        self._st = state
        self._dec = decoder if decoder is not None else FrameDecoder()  # may hold frames that came with HelloAck
        self._reader = reader
        self._writer = writer
        self.peer = peer
        self.heartbeat_s = heartbeat_s
        self.dead_after_s = dead_after_s
        self._loop = asyncio.get_running_loop()
        self._waiting: dict[int, asyncio.Future] = {}  # io_id -> future of its verdict
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._done: dict[int, bool] = {}  # verdicts nobody waits for yet (take_ack)
        self._flush_scheduled = False
        self._dead = ""
        self._closed = False
        self._position = 0  # a counter per submitted write (`last_position`)
        self._positions: dict[int, int] = {}  # io_id -> its position, while in flight
        self._last_frame = monotonic()
        # The first submit since the last frame from the appliance (0: none):
        # nothing at all back for dead_after_s after it means a dead link,
        # even when each write gave up at its own deadline meanwhile (a blackhole).
        self._waiting_since = 0.0
        self.last_position = 0
        self.last_prepaid_ns = 0
        self.bytes_in = 0
        self._timeouts = self._unhealthy = 0
        self._tasks = [self._loop.create_task(self._read_loop(), name="net splitter reader"),
                       self._loop.create_task(self._heartbeats(), name="net splitter heartbeats")]
        self._feed()

    # -- set-up ------------------------------------------------------------
    @classmethod
    async def open_async(cls, control_socket: str = "", *, data: Path | str, appliance: str = "127.0.0.1:10810",
                         tls: bool = True, encrypt: bool = True, heartbeat_s: float = 1.0, dead_after_s: float = 5.0,
                         connect_timeout_s: float = 5.0, compress: bool = False, sender: str = "",
                         server_hostname: str = "") -> "NetSplitter":
        """Connect to the appliance and say Hello; TransportUnavailable with
        the reason when it cannot (refused, TLS, no HelloAck in time)."""
        layout = Layout(Path(data))
        host, _, port = str(appliance).rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        try:
            names = {c.id: c.name for c in CGCatalog(layout.data).list()}
            ctx = pki.client_context(layout.pki, "host") if tls else None
            key = pki.load_batch_key(layout.pki) if encrypt else None
        except (CGError, OSError, ssl.SSLError, pki.PkiError, ValueError) as e:
            raise TransportUnavailable(f"net transport: {e}") from None
        state = NetState(names, key=key, compress=compress)
        writer = None
        try:
            async with asyncio.timeout(connect_timeout_s):
                reader, writer = await asyncio.open_connection(
                    host, int(port), ssl=ctx, server_hostname=(server_hostname or host) if ctx else None)
                writer.write(state.hello(sender or f"host-{socket.gethostname()}"))
                dec = FrameDecoder()
                while (frame := dec.next_event()) is NEED_DATA:
                    chunk = await reader.read(1 << 16)
                    if not chunk:
                        raise TransportUnavailable(f"appliance at {appliance} closed the connection after Hello")
                    dec.receive_data(chunk)
                state.connected(frame)
        except TransportUnavailable:
            if writer is not None:
                writer.close()
            raise
        except (OSError, ssl.SSLError, FrameError, NetProtocolError, TimeoutError, ValueError) as e:
            if writer is not None:
                writer.close()
            raise TransportUnavailable(f"appliance at {appliance}: {type(e).__name__}: {e}") from None
        refused = sorted(set(names.values()) - state.accepted)
        if refused:
            log.error("net: the appliance did not accept CG(s) %s: their writes are marked", ", ".join(refused))
        log.info("net: connected to appliance %s at %s; resume %s", state.appliance_id, appliance, state.resume)
        return cls(state, reader, writer, heartbeat_s=heartbeat_s, dead_after_s=dead_after_s, peer=str(appliance),
                   decoder=dec)

    @classmethod
    def connect(cls, control_socket: str, timeout: float = 1.0, **options: Any) -> "NetSplitter":
        """The synchronous set-up of other transports: net connects only on
        an event loop (`open_async`), so it never blocks one."""
        raise TransportUnavailable("the net transport connects asynchronously (open_async, from the host's loop)")

    # -- the hot path ------------------------------------------------------
    def submit(self, w: AugmentedWrite) -> bool:
        """Queue ``w`` for this loop turn's batch; False (nothing queued) when
        the link is dead or the appliance does not take its CG."""
        if self._dead or self._closed:
            self._unhealthy += 1
            return False
        if w.cg_id not in self._st.cg_names:  # a CG created since the Hello: say Hello again (CardLink reconnects)
            self._die(f"consistency group id {w.cg_id} is not in this link's Hello")
            return False
        if not self._st.add(w):
            return False
        if not self._waiting_since:
            self._waiting_since = monotonic()
        self._position += 1
        self._positions[w.io_id] = self._position
        self.last_position = self._position
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        return True

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._dead:
            return
        wire = self._st.take_batches()
        if wire:
            try:
                self._writer.write(wire)
            except (OSError, RuntimeError) as e:  # RuntimeError: the transport is closing
                self._die(f"write failed: {e}")

    def split(self, w: AugmentedWrite, timeout_ns: int) -> bool:
        """No synchronous wait on the loop that must carry the ack: submits
        and says whether the verdict is already here (it never is): the
        filter uses `submit` + `ack_future`. False is always safe (marks)."""
        if not self.submit(w):
            return False
        v = self.take_ack(w.io_id)
        if v is None:
            self.abandon(w.io_id)
            return False
        return v

    def ack_future(self, io_id: int, deadline_ns: int) -> "bool | asyncio.Future":
        """The verdict of ``io_id``: a bool if it is here, else a future
        resolved True by its durable ack, or False at ``deadline_ns``
        (monotonic) or when the link dies; a late ack is then dropped."""
        v = self._done.pop(io_id, None)
        if v is not None:
            return v
        if io_id not in self._positions:
            return False  # never submitted, or already settled
        fut = self._loop.create_future()
        self._waiting[io_id] = fut
        delay = max(0.0, (deadline_ns - monotonic_ns()) / 1e9)
        self._timers[io_id] = self._loop.call_later(delay, self._expire, io_id)
        return fut

    def _expire(self, io_id: int) -> None:
        self._timers.pop(io_id, None)
        fut = self._waiting.pop(io_id, None)
        if fut is not None:
            self._timeouts += 1
            self._forget(io_id)
            if not fut.done():
                fut.set_result(False)

    def _forget(self, io_id: int) -> None:
        self._positions.pop(io_id, None)
        self._st.forget((io_id,))

    def _settle(self, io_id: int, ok: bool) -> None:
        if self._positions.pop(io_id, None) is None:
            return  # given up on: its ack is dropped
        h = self._timers.pop(io_id, None)
        if h is not None:
            h.cancel()
        fut = self._waiting.pop(io_id, None)
        if fut is None:
            self._done[io_id] = ok
        elif not fut.done():
            fut.set_result(ok)

    def reap(self) -> None:
        """Verdicts arrive through the reader task: nothing to poll."""

    def poll_ack(self, io_id: int) -> bool | None:
        return self.take_ack(io_id)  # `reap` does nothing here: verdicts arrive with the frames

    def take_ack(self, io_id: int) -> bool | None:
        return self._done.pop(io_id, None) if self._done else None

    def abandon(self, io_id: int) -> bool:
        v = self._done.pop(io_id, None)
        if v is not None:
            return v
        self._timeouts += 1
        self._forget(io_id)
        return False

    def detach(self, io_id: int) -> bool | None:
        """Net leaves nothing in flight past a deadline: the same as `abandon`."""
        return self.abandon(io_id)

    def take_late(self) -> list[tuple[int, bool]]:
        return []

    def released_position(self) -> int:
        """Every write below the oldest one still waiting is durable (acked)
        or was failed (the splitter marked it)."""
        if not self._positions:
            return self._position
        return min(self._positions.values()) - 1

    def post_outcome(self, io_id: int, status: Status) -> bool:
        """Nothing to tell: the appliance journaled the write at its ack."""
        return True

    def reserve(self, length: int) -> None:
        return None

    # -- the link ----------------------------------------------------------
    def _feed(self) -> None:
        dec = self._dec
        while True:
            try:
                frame = dec.next_event()
            except FrameError as e:
                self._die(f"bad frame from the appliance: {e}")
                return
            if frame is NEED_DATA:
                return
            self._last_frame = monotonic()
            self._waiting_since = 0.0
            try:
                verdicts = self._st.on_frame(frame)
            except NetProtocolError as e:
                self._die(str(e))
                return
            for io_id, ok in verdicts:
                self._settle(io_id, ok)

    async def _read_loop(self) -> None:
        try:
            while not self._dead:
                chunk = await self._reader.read(1 << 16)
                if not chunk:
                    self._die("appliance closed the connection")
                    return
                self.bytes_in += len(chunk)
                self._dec.receive_data(chunk)
                self._feed()
        except (OSError, ssl.SSLError) as e:
            self._die(f"link error: {type(e).__name__}: {e}")

    async def _heartbeats(self) -> None:
        while not self._dead:
            await asyncio.sleep(self.heartbeat_s)
            # dead: a write went out dead_after_s ago and no frame (ack, heartbeat) came since
            if self._waiting_since and monotonic() - self._waiting_since > self.dead_after_s:
                self._die(f"no frame from the appliance for {self.dead_after_s:g} s after a write went out")
                return
            try:
                self._writer.write(encode(Heartbeat(time_ns())))
            except (OSError, RuntimeError) as e:
                self._die(f"heartbeat failed: {e}")
                return

    def _die(self, why: str) -> None:
        """The link is gone: every write without its durable ack gets False."""
        if self._dead:
            return
        self._dead = why
        log.log(logging.INFO if why == "closed" else logging.WARNING, "net: appliance link %s down: %s", self.peer, why)
        self._st.fail_all(why)
        for io_id in list(self._positions):
            self._settle(io_id, False)
        self._done.clear()
        self._writer.close()

    # -- health, stats, close ----------------------------------------------
    def healthy(self) -> bool:
        return not self._dead and not self._closed

    @property
    def dead_reason(self) -> str:
        return self._dead

    def statistics(self) -> NetStats:
        return self._st.statistics()

    def close(self) -> None:
        if self._closed:
            return
        self._die("closed")
        self._closed = True
        for t in self._tasks:
            t.cancel()
