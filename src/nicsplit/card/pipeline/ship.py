"""Stage 8, ship: send sealed batches to the appliance and keep each one until
the appliance says it is durable; then free its writes' hidden-volume slots.

Two layers, so the rules can be tested without a network:

`ShipWindow` (sans-IO) — the window of unacknowledged batches, in submission
order (which is seq order within each CG):

- ``submit`` adds a batch; if a link is up it is transmitted at once —
  unless its CG was not named in the link's Hello (the appliance would drop
  the link): then the Shipper reconnects with a Hello that names it;
- ``connected(resume, transmit, cgs, refused)`` after Hello → HelloAck: every batch whose
  ``last_seq <= resume[cg]`` is already durable at the appliance (a previous
  connection's ack was lost): it is released, not resent. Every other unacked
  batch is retransmitted, in order. A batch only partly covered by resume is
  resent whole; the appliance skips the seqs it holds;
- a *refused* CG (its name breaks `nicsplit.core.names`, so it is not named
  in the Hello, or the appliance left it out of HelloAck's resume) is held:
  its batches stay unacked and unsent until a later Hello is accepted for
  it, and they never make the link drop or re-Hello. Every other CG ships
  on (one bad CG never blocks the others); ``statistics().refused_cgs``
  says which and why;
- ``on_ack(Ack(durable=True))`` releases the acked batch *and* every earlier
  unacked batch of that CG with ``last_seq <= ack.last_seq`` (the journal is
  per-CG append-only, so durability of seq N implies every seq < N), calls
  ``release(io_id)`` for each of their writes and feeds ``ack.known`` to
  dedup. Nothing is released before its durable ack (or resume);
- ``room`` is false when ``ship_window`` batches or ``ship_window_bytes``
  bytes are unacked: the pipeline stops feeding it (backpressure reaches hold;
  the card reports full). The poller is never blocked.

`Shipper` (asyncio) — the connection: TLS 1.3 with mutual certificates
(``nicsplit.core.pki.client_context(pki_dir, "card")``), Hello with the
card id and its CGs, then batches out, acks in, a heartbeat every
``heartbeat_s``. Any error (refused, TLS, `FrameError`, Error frame, or no
frame for ``dead_after_s`` while batches are unacked) closes the link, and it reconnects after an exponential backoff
(``backoff_min_s`` doubling to ``backoff_max_s``, reset by a good HelloAck).

A CG the appliance refused is asked for again: while its batches wait, the
Shipper ends the session after ``refused_retry_s`` and says Hello anew (the
appliance may know the CG by then, e.g. after ``nicsplit cg create``).

Options: ``ship_window`` (default 64 batches), ``ship_window_bytes`` (default
64 MiB), ``heartbeat_s`` (1.0), ``dead_after_s`` (5.0), ``backoff_min_s``
(0.05), ``backoff_max_s`` (5.0), ``refused_retry_s`` (30.0).

Example::

    win = ShipWindow(release=endpoint.release, learn=dedup.learn)
    shipper = Shipper(win, connect=tls_connector(host, port, ctx), card_id="card-1", cgs=lambda: ("vm1",))
    async with asyncio.TaskGroup() as tg:
        tg.create_task(shipper.run())
        win.submit(batch, io_ids, now_ns)   # from the pipeline
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Iterable

from nicsplit.core import failpoints as _fp
from nicsplit.core.names import RULE, is_name
from nicsplit.wire.frames import (
    NEED_DATA, PROTOCOL_VERSION, Ack, Batch, Error, FrameDecoder, FrameError, Heartbeat, Hello, HelloAck, encode,
)

_FP = _fp.ACTIVE  # armed failpoints (nicsplit.core.failpoints): empty unless a test arms some

log = logging.getLogger(__name__)

Transmit = Callable[[bytes], None]


class _Unacked:
    __slots__ = ("head", "wire", "io_ids", "sent", "t_submit_ns")

    def __init__(self, head: Batch, wire: bytes, io_ids: list[int], t_submit_ns: int) -> None:
        self.head = head  # the batch header (body dropped: `wire` holds it)
        self.wire = wire  # the encoded Batch frame, reused for retransmits
        self.io_ids = io_ids
        self.sent = 0
        self.t_submit_ns = t_submit_ns


@dataclass(frozen=True)
class CGShipStats:
    last_durable_seq: int
    unacked_batches: int
    oldest_unacked_ns: int  # t_first_ns of the oldest unacked batch, 0 if none


@dataclass(frozen=True)
class ShipStats:
    connected: bool
    connects: int
    unacked: int
    unacked_bytes: int
    window: int
    window_bytes: int
    submitted: int
    sends: int  # frames transmitted, retransmits included
    retransmits: int
    durable_batches: int
    released_writes: int
    skipped_by_resume: int
    acks_unknown: int  # acks naming no unacked batch
    bytes_out: int  # batch frame bytes transmitted
    full: bool
    refused_cgs: dict[str, str] = field(default_factory=dict)  # CG -> why this link does not ship it


class ShipWindow:
    def __init__(
        self,
        *,
        release: Callable[[int], None],
        learn: Callable[[str, Iterable[bytes]], None] = lambda cg, fps: None,
        max_batches: int = 64,
        max_bytes: int = 64 << 20,
        release_many: Callable[[list[int]], None] | None = None,
    ) -> None:
        if max_batches < 1 or max_bytes < 1:
            raise ValueError("ship_window and ship_window_bytes must be positive")
        self._release = release
        self._release_many = release_many  # a durable batch's io ids in one call (else `release` each)
        self._learn = learn
        self.max_batches = max_batches
        self.max_bytes = max_bytes
        self._unacked: OrderedDict[int, _Unacked] = OrderedDict()
        self._bytes = 0
        self._transmit: Transmit | None = None
        self._session_cgs: frozenset[str] | None = None  # CGs named in this link's Hello (None: any)
        self._refused: dict[str, str] = {}  # CGs this link will not ship, and why (held, no re-Hello)
        self.refused_cgs = self._refused  # read-only view for the pipeline's per-write check (`refused`)
        self.new_cg = False  # a batch waits for a CG this link's Hello did not name: re-Hello needed
        self.on_new_cg: Callable[[], None] | None = None  # set by the Shipper: drop the link, re-Hello
        self._durable: dict[str, int] = {}
        self._connects = self._submitted = self._sends = self._retx = self._durable_n = 0
        self._released = self._skipped = self._acks_unknown = self._bytes_out = 0
        self.durable_bytes: dict[str, int] = {}  # CG -> batch frame bytes the appliance confirmed durable

    # -- pipeline side ---------------------------------------------------------

    @property
    def room(self) -> bool:
        return len(self._unacked) < self.max_batches and self._bytes < self.max_bytes

    @property
    def empty(self) -> bool:
        return not self._unacked

    def refused(self, cg: str) -> str | None:
        """Why this link does not ship ``cg`` (bad name, or the appliance left
        it out of resume), or None: the pipeline may report such a CG's new
        writes lost instead of batching them, so they cannot fill the window."""
        return self._refused.get(cg)

    def holds(self, cgs: Iterable[str]) -> bool:
        """True when a batch of one of ``cgs`` waits unacked."""
        want = frozenset(cgs)
        return any(u.head.cg in want for u in self._unacked.values())

    def submit(self, batch: Batch, io_ids: list[int], now_ns: int) -> None:
        if batch.batch_id in self._unacked:
            raise ValueError(f"batch {batch.batch_id} submitted twice")
        wire = encode(batch)
        # = replace(batch, body=b""): `dataclasses.replace` costs ~5 µs a batch in Python
        head = Batch(batch.batch_id, batch.cg, batch.first_seq, batch.last_seq, batch.t_first_ns, batch.t_last_ns, b"")
        u = _Unacked(head, wire, io_ids, now_ns)
        self._unacked[batch.batch_id] = u
        self._bytes += len(wire)
        self._submitted += 1
        if self._transmit is not None:
            self._send(u)

    # -- link side -------------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        return self._transmit is not None

    def connected(self, resume: dict[str, int], transmit: Transmit, cgs: Iterable[str] | None = None,
                  refused: dict[str, str] | None = None) -> None:
        """The link is up and HelloAck said ``resume``: skip what is durable,
        retransmit the rest in order, and send new batches through ``transmit``.
        ``cgs``: the CGs the appliance accepted; a batch of another CG is held
        back (the appliance would drop the link) and sets `new_cg`, unless
        its CG is in ``refused`` (CG -> why): that one is only held."""
        self._connects += 1
        self._session_cgs = None if cgs is None else frozenset(cgs)
        self._refused = self.refused_cgs = dict(refused or {})
        self.new_cg = False
        for cg, seq in resume.items():
            if seq > self._durable.get(cg, 0):
                self._durable[cg] = seq
        for bid in [bid for bid, u in self._unacked.items() if u.head.last_seq <= resume.get(u.head.cg, 0)]:
            self._skipped += 1
            log.info("batch %d (%s ..%d) already durable at the appliance (resume): released",
                     bid, self._unacked[bid].head.cg, self._unacked[bid].head.last_seq)
            self._finish(bid)
        self._transmit = transmit
        for u in list(self._unacked.values()):
            if self._transmit is None:
                break  # transmit failed and disconnected us
            self._send(u)

    def disconnected(self) -> None:
        self._transmit = None

    def on_ack(self, ack: Ack) -> None:
        if not ack.durable:
            return
        u = self._unacked.get(ack.batch_id)
        if u is not None and u.head.cg != ack.cg:
            log.warning("ack for batch %d names cg %s, but it belongs to %s: ignored", ack.batch_id, ack.cg, u.head.cg)
            self._acks_unknown += 1
            return
        if ack.last_seq > self._durable.get(ack.cg, 0):
            self._durable[ack.cg] = ack.last_seq
        done = [bid for bid, v in self._unacked.items()
                if bid == ack.batch_id or (v.head.cg == ack.cg and v.head.last_seq <= ack.last_seq)]
        if not done:
            self._acks_unknown += 1
        for bid in done:
            self._finish(bid)
        if ack.known:
            self._learn(ack.cg, ack.known)

    # -- stats -----------------------------------------------------------------

    def cg_statistics(self) -> dict[str, CGShipStats]:
        out: dict[str, list[int]] = {cg: [seq, 0, 0] for cg, seq in self._durable.items()}
        for u in self._unacked.values():
            s = out.setdefault(u.head.cg, [0, 0, 0])
            s[1] += 1
            if not s[2]:
                s[2] = u.head.t_first_ns
        return {cg: CGShipStats(*v) for cg, v in out.items()}

    def statistics(self) -> ShipStats:
        return ShipStats(
            connected=self.is_connected, connects=self._connects, unacked=len(self._unacked),
            unacked_bytes=self._bytes, window=self.max_batches, window_bytes=self.max_bytes,
            submitted=self._submitted, sends=self._sends, retransmits=self._retx,
            durable_batches=self._durable_n, released_writes=self._released, skipped_by_resume=self._skipped,
            acks_unknown=self._acks_unknown, bytes_out=self._bytes_out, full=not self.room,
            refused_cgs=dict(self._refused),
        )

    # -- internals -------------------------------------------------------------

    def _send(self, u: _Unacked) -> None:
        if self._session_cgs is not None and u.head.cg not in self._session_cgs:
            if u.head.cg in self._refused:
                return  # held until a Hello is accepted for it; the others ship on
            if not self.new_cg:
                self.new_cg = True
                log.info("batch %d: CG %s was not in this link's Hello: reconnecting to name it",
                         u.head.batch_id, u.head.cg)
                if self.on_new_cg is not None:
                    self.on_new_cg()
            return
        if u.sent:
            self._retx += 1
        u.sent += 1
        self._sends += 1
        self._bytes_out += len(u.wire)
        try:
            self._transmit(u.wire)
        except (OSError, RuntimeError) as e:  # the transport died under us: retried after reconnect
            log.info("transmit of batch %d failed (%s): link down", u.head.batch_id, e)
            self._transmit = None

    def _finish(self, bid: int) -> None:
        u = self._unacked.pop(bid)
        self._bytes -= len(u.wire)
        cg = u.head.cg
        self.durable_bytes[cg] = self.durable_bytes.get(cg, 0) + len(u.wire)
        self._durable_n += 1
        if self._release_many is not None:
            self._release_many(u.io_ids)
        else:
            for io_id in u.io_ids:
                self._release(io_id)
        self._released += len(u.io_ids)


# -- the connection -------------------------------------------------------------

Connector = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


def tls_connector(host: str, port: int, ctx: ssl.SSLContext | None, server_hostname: str | None = None) -> Connector:
    """A connector for `Shipper`: TCP + TLS (``ctx`` None: plain TCP, tests only)."""

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(host, port, ssl=ctx,
                                             server_hostname=(server_hostname or host) if ctx else None)

    return connect


class LinkDown(Exception):
    """The appliance link failed; the shipper reconnects after a backoff."""


class Shipper:
    def __init__(
        self,
        window: ShipWindow,
        *,
        connect: Connector,
        card_id: str,
        cgs: Callable[[], Iterable[str]],
        heartbeat_s: float = 1.0,
        dead_after_s: float = 5.0,
        backoff_min_s: float = 0.05,
        backoff_max_s: float = 5.0,
        hello_timeout_s: float = 5.0,
        refused_retry_s: float = 30.0,
    ) -> None:
        self.window = window
        self._connect = connect
        self.card_id = card_id
        self._cgs = cgs
        self.heartbeat_s = heartbeat_s
        self.dead_after_s = dead_after_s
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self.hello_timeout_s = hello_timeout_s
        self.refused_retry_s = refused_retry_s
        self.appliance_id = ""
        self.last_error = ""
        self.bytes_in = 0
        self._writer: asyncio.StreamWriter | None = None
        self._stopping = False
        self._hello_ok = False

    async def run(self) -> None:
        """Connect, ship, reconnect — until `stop` (or cancellation)."""
        delay = self.backoff_min_s
        while not self._stopping:
            self._hello_ok = False
            try:
                await self._session()
            except (OSError, ssl.SSLError, FrameError, LinkDown, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
                self.last_error = f"{type(e).__name__}: {e}"
                log.warning("appliance link down: %s; retry in %.2fs", self.last_error, delay)
            finally:
                self._down()
            if self._stopping:
                break
            if self._hello_ok:
                delay = self.backoff_min_s
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_max_s)

    def stop(self) -> None:
        self._stopping = True
        if self._writer is not None:
            self._writer.close()

    def _down(self) -> None:
        self.window.disconnected()
        w, self._writer = self._writer, None
        if w is not None:
            w.close()

    async def _session(self) -> None:
        reader, writer = await asyncio.wait_for(self._connect(), self.hello_timeout_s)
        self._writer = writer
        dec = FrameDecoder()
        named = tuple(dict.fromkeys(self._cgs()))
        # One rule for names (nicsplit.core.names): a CG the appliance would
        # refuse is not named at all, so it cannot cost the others the link.
        cgs = tuple(cg for cg in named if is_name(cg))
        refused = {cg: f"bad CG name ({RULE})" for cg in named if not is_name(cg)}
        writer.write(encode(Hello(self.card_id, PROTOCOL_VERSION, cgs)))
        first = await asyncio.wait_for(self._next_frame(reader, dec), self.hello_timeout_s)
        if isinstance(first, Error):
            raise LinkDown(f"appliance refused: error {first.code}: {first.message}")
        if not isinstance(first, HelloAck):
            raise LinkDown(f"expected HelloAck, got {type(first).__name__}")
        if first.version != PROTOCOL_VERSION:
            raise LinkDown(f"appliance speaks protocol {first.version}, the card {PROTOCOL_VERSION}")
        self.appliance_id = first.appliance_id
        log.info("connected to appliance %s; resume %s", first.appliance_id, first.resume)
        # A CG the Hello named but HelloAck's resume leaves out was refused by
        # the appliance (unknown, over its limit, journal unusable: its log says).
        accepted = tuple(cg for cg in cgs if cg in first.resume)
        by_appliance = tuple(cg for cg in cgs if cg not in first.resume)
        refused.update({cg: "refused by the appliance (see its log)" for cg in by_appliance})
        retry_at = time.monotonic() + self.refused_retry_s if by_appliance else None
        for cg, why in refused.items():
            log.error("CG %s is not shipped on this link: %s; its batches are held, the other CGs ship", cg, why)
        self.window.on_new_cg = lambda: asyncio.get_running_loop().call_soon(writer.close)
        write = writer.write

        def transmit(wire: bytes) -> None:
            write(wire)
            if _FP:  # a failpoint after each batch shipped, before its ack (armable while connected)
                _fp.hit("card.worker.after-ship")
        self.window.connected(first.resume, transmit, accepted, refused)
        self._hello_ok = True
        hb = asyncio.create_task(self._heartbeats(writer))
        try:
            while not self._stopping:
                try:
                    frame = await asyncio.wait_for(self._next_frame(reader, dec), self.dead_after_s)
                except asyncio.TimeoutError:
                    if self.window.empty:
                        continue  # an idle appliance need not talk
                    raise LinkDown(f"no frame for {self.dead_after_s}s with "
                                   f"{self.window.statistics().unacked} batches unacked") from None
                if isinstance(frame, Ack):
                    if _FP:
                        _fp.hit("card.worker.before-release")  # durable at the appliance, not yet released
                    self.window.on_ack(frame)
                elif isinstance(frame, Error):
                    raise LinkDown(f"appliance error {frame.code}: {frame.message}")
                elif not isinstance(frame, Heartbeat):
                    raise LinkDown(f"unexpected {type(frame).__name__} from the appliance")
                if not self.window.is_connected:
                    raise LinkDown("transmit failed")
                if retry_at is not None and time.monotonic() >= retry_at:
                    if self.window.holds(by_appliance):
                        raise LinkDown(f"saying Hello again for refused CG(s) {', '.join(by_appliance)}")
                    retry_at = time.monotonic() + self.refused_retry_s
        finally:
            hb.cancel()
            try:
                await hb
            except asyncio.CancelledError:
                pass

    async def _next_frame(self, reader: asyncio.StreamReader, dec: FrameDecoder):
        while True:
            frame = dec.next_event()
            if frame is not NEED_DATA:
                return frame
            data = await reader.read(1 << 16)
            if not data:
                raise LinkDown("appliance closed the connection")
            self.bytes_in += len(data)
            dec.receive_data(data)

    async def _heartbeats(self, writer: asyncio.StreamWriter) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            writer.write(encode(Heartbeat(time.time_ns())))
