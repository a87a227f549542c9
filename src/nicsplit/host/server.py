"""The host front end: NBD sessions over the filter chains of a datastore.

Theory of operation
-------------------
`NBDSession` is an asyncio Protocol and a thin loop around the sans-IO codec
(`nicsplit.wire.nbd`): bytes in → events → chain calls → reply bytes out.

- Each request runs as a coroutine down its vdisk's chain, started *eagerly*
  (`run_eager`): one that never blocks (a page-cache write or read) completes
  inside ``data_received`` with no Task, and its reply joins a batch written
  with one ``writelines`` when the received bytes are used up. Only a request
  that must wait (flush, FUA, a delay filter) becomes a Task; its reply is
  written when it completes, so replies go out of order, as NBD allows.
- At most ``max_inflight`` Tasks per session; beyond that the session stops
  reading from its socket until half have finished (bounded, visible
  backpressure instead of unbounded buffering).
- Bytes are bounded too (`nicsplit.host.nbdpolicy`): before each request the
  session checks its own bytes (executing + batched + in the transport)
  against ``conn_bytes`` and the server's `ByteBudget`; over either it keeps
  the request in the codec (or in ``_pending``), pauses reading, and goes on
  when replies drained (``resume_writing``), a task ended, or the budget
  woke it. Handshake, idle and send timeouts and the connection cap live
  there too.
- Errors are raised where they happen as `IOFailure(errno)` and mapped to
  the NBD code in exactly one place, `_execute`, after logging the cause.
- One chain per vdisk, shared by all its sessions (multi-conn safe: a flush
  on any connection syncs the whole datastore).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable

from nicsplit.core import ctl
from nicsplit.core.cgs import CGCatalog, CGError
from nicsplit.core.config import Config
from nicsplit.host.chain import Chain, VdiskView, build_chain
from nicsplit.host.context import HostContext
from nicsplit.host.datastore import Datastore
from nicsplit.host.eager import run_eager
from nicsplit.host.filters.split import BarrierFailed
from nicsplit.host.io import EXTENT_DATA, Flag, IOFailure
from nicsplit.host.nbdpolicy import SMALL_REQUEST, ByteBudget, NbdLimits, RateLimitedLog
from nicsplit.host.plugin import DatastorePlugin, GroupSync
from nicsplit.host.resync import Resyncer
from nicsplit.wire import nbd

log = logging.getLogger(__name__)

# NBD command flags → chain flags, precomputed for every 16-bit combination
# the codec lets through (it already refused unknown bits).
_FLAG_MAP = [
    int(
        (Flag.FUA if f & nbd.NBD_CMD_FLAG_FUA else 0)
        | (Flag.NO_HOLE if f & nbd.NBD_CMD_FLAG_NO_HOLE else 0)
        | (Flag.FAST_ZERO if f & nbd.NBD_CMD_FLAG_FAST_ZERO else 0)
        | (Flag.REQ_ONE if f & nbd.NBD_CMD_FLAG_REQ_ONE else 0)
    )
    for f in range(64)
]

# NBD lengths are 32-bit; keep each reported extent below that.
_MAX_EXTENT = 0xFFFF_F000


class HostCommandError(Exception):
    """A control-socket command that cannot be done: one clear line."""


class ExportCatalog:
    """The codec's view of exports: one per vdisk, named by the vdisk.

    Answers from a cache rebuilt only when the datastore catalog or the CG
    roles (cgs.json) changed on disk (their stamps), so a handshake costs a
    stat or two, not a parse: a flood of NBD_OPT_LIST must not cost the
    event loop a catalog read each (issue 11 item 7)."""

    def __init__(self, host: "HostServer") -> None:
        self._host = host
        self._key: Any = None
        self._exports: dict[str, nbd.ExportInfo] = {}
        self.rebuilds = 0   # cache rebuilds (host stats: "exports")
        self.lookups = 0    # lookup + list calls

    def _info(self, v: Any) -> nbd.ExportInfo:
        owner = f" of {v.owner}" if v.owner else ""
        return nbd.ExportInfo(
            name=v.name,
            size=v.size,
            readonly=v.readonly or self._host.readonly or v.extra.get("cg") in self._host.fenced,
            description=f"nicsplit vdisk {v.name}{owner}",
        )

    def _current(self) -> dict[str, nbd.ExportInfo]:
        self.lookups += 1
        host = self._host
        host.datastore.reload_catalog()
        host.reload_fences()
        key = (host.datastore.catalog_stamp, host.fenced, host.readonly)
        if key != self._key:
            self._exports = {v.name: self._info(v) for v in host.datastore.list_vdisks()}
            self._key = key
            self.rebuilds += 1
        return self._exports

    def lookup(self, name: str) -> nbd.ExportInfo | None:
        return self._current().get(name)

    def list_exports(self) -> list[nbd.ExportInfo]:
        return list(self._current().values())

    def statistics(self) -> dict[str, int]:
        return {"lookups": self.lookups, "rebuilds": self.rebuilds, "fence_reads": self._host.fence_reads}


def file_stamp(path: Path) -> tuple[int, int, int] | None:
    """(inode, mtime_ns, size) of ``path``; None when it does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def allocated_ranges(vd: Any) -> list[tuple[int, int]]:
    """The (offset, length) runs of a datastore vdisk that hold data (its
    allocated extents): what an initial sync copies."""
    out, pos = [], 0
    for n, flags in vd.extents(0, vd.size):
        if flags == EXTENT_DATA:
            out.append((pos, n))
        pos += n
    return out


class HostServer:
    """Owns the datastore (it holds the datastore's IO lock) and the chains."""

    def __init__(self, cfg: Config, datastore: Datastore, *, readonly: bool | None = None) -> None:
        self.cfg = cfg
        self.datastore = datastore
        self.readonly = bool(cfg.host("readonly", False) if readonly is None else readonly)
        self.validate = bool(cfg.host("validate", False))
        self.max_inflight = int(cfg.host("max_inflight", 128))
        self.exports = ExportCatalog(self)
        self.group_sync = GroupSync(datastore.sync)
        self.context = HostContext(cfg.data, card=cfg.raw.get("host", {}).get("card"))
        self.resyncer = Resyncer(self.context.card, mib_s=float(cfg.host("resync_mib_s", 64)),
                                 parallel=int(cfg.host("resync_parallel", 2)),
                                 latency_us=float(cfg.host("resync_latency_us", 2000)))
        self.auto_resync = bool(cfg.host("resync", True))
        self._chains: dict[str, Chain] = {}
        self.sessions: set[NBDSession] = set()
        self._servers: list[asyncio.AbstractServer] = []
        self.addresses: list[str] = []  # NBD URIs we listen on (status, restore --in-place)
        self.fenced: frozenset[str] = frozenset()  # CGs failed over to the appliance: read-only here
        self._fence_stamp: Any = False  # never equal to a stamp (None = no file)
        self.fence_reads = 0
        self.reload_fences()
        self.limits = NbdLimits.from_config(cfg)
        self.refusals = RateLimitedLog()
        self.budget = ByteBudget(self.limits.server_bytes)

    # -- consistency groups: fence and barrier ------------------------------
    def reload_fences(self) -> None:
        """The fenced CGs from DATA/cgs.json (their role is "failed-over"), so
        a fence set while the host was down still holds. Re-read only when
        the file's stamp changed (it is replaced atomically on every change)."""
        stamp = file_stamp(self.cfg.layout.cgs)
        if stamp == self._fence_stamp:
            return
        try:
            cgs = CGCatalog(self.cfg.data).list()
        except CGError as e:
            log.error("cannot read the consistency groups: %s", e)
            return
        self.fence_reads += 1
        self._fence_stamp = stamp
        self.fenced = frozenset(c.name for c in cgs if c.role == "failed-over")

    def _cg_vdisks(self, cg: str) -> list[str]:
        self.datastore.reload_catalog()
        return [v.name for v in self.datastore.list_vdisks() if v.extra.get("cg") == cg]

    def fence(self, cg: str, on: bool) -> dict[str, Any]:
        """Failover: the CG's vdisks become read-only here and their sessions
        are closed (in-flight requests still answer), so production cannot
        diverge from the appliance's copy. Failback lifts it."""
        catalog = CGCatalog(self.cfg.data)
        catalog.set_role(cg, "failed-over" if on else "production")
        self.reload_fences()
        names = set(self._cg_vdisks(cg))
        closed = 0
        if on:
            for s in list(self.sessions):
                if s.export in names:
                    s.shutdown()
                    closed += 1
        log.warning("consistency group %s %s (%d sessions closed)", cg,
                    "fenced: failed over to the appliance" if on else "unfenced: production again", closed)
        return {"cg": cg, "fenced": on, "vdisks": sorted(names), "sessions_closed": closed}

    async def barrier(self, cg: str) -> dict[str, Any]:
        """A barrier record in the CG's stream, acknowledged by the card: every
        write acknowledged to a client before this call has a lower seq, so
        the first PIT at or after the returned seq covers them all (bookmarks)."""
        names = self._cg_vdisks(cg)
        if not names:
            raise HostCommandError(f"consistency group {cg!r} has no vdisks on this host")
        splits = []
        for name in names:
            sp = self.chain(name).filter("split")
            if sp is None or sp.state == "unprotected":
                raise HostCommandError(f"vdisk {name} of {cg} has no splitter in its chain: it is not protected")
            splits.append(sp)
        marking = [n for n, sp in zip(names, splits) if sp.state == "marking"]
        if marking:
            raise HostCommandError(f"{', '.join(marking)} of {cg} {'is' if len(marking) == 1 else 'are'} marking: "
                                   "the journal lacks writes the card did not capture")
        resyncing = [f"{n} ({sp.resync.status()['percent'] if sp.resync else 0}%)"
                     for n, sp in zip(names, splits) if sp.state == "resyncing"]
        resyncing += [f"{n} (initializing, {sp.resync.status()['percent'] if sp.resync else 0}%)"
                      for n, sp in zip(names, splits) if sp.state == "initializing"]
        if resyncing:
            raise HostCommandError(f"{', '.join(resyncing)} of {cg} {'is' if len(resyncing) == 1 else 'are'} resyncing: "
                                   "no consistent point in time until the resync ends")
        try:
            seq = await splits[0].barrier()
        except BarrierFailed as e:
            raise HostCommandError(str(e)) from None
        return {"cg": cg, "seq": seq}

    def chain(self, name: str) -> Chain:
        ch = self._chains.get(name)
        if ch is None:
            info = self.datastore.get_vdisk(name)
            view = VdiskView(
                name=info.name,
                id=info.id,
                uuid=info.uuid,
                size=info.size,
                owner=info.owner,
                readonly=info.readonly or self.readonly,
                extra=dict(info.extra),
                context=self.context,
            )
            plugin = DatastorePlugin(self.datastore.vdisk(name), self.group_sync)
            ch = build_chain(view, self.cfg.vdisk_filters(name), plugin, validate=self.validate)
            sp = ch.filter("split")
            # Initial sync when the vdisk joined its CG holding data (not in
            # read-only mode, nor for a CG failed over to the appliance).
            if sp is not None and not self.readonly and view.extra.get("cg") not in self.fenced:
                sp.establish(lambda: allocated_ranges(self.datastore.vdisk(name)))
            self._chains[name] = ch
        return ch

    def check_chains(self) -> None:
        """Build every vdisk's chain now so a bad configuration fails at start."""
        for v in self.datastore.list_vdisks():
            self.chain(v.name)

    def statistics(self) -> dict[str, Any]:
        out: dict[str, Any] = {"vdisks": {}, "sessions": len(self.sessions), "exports": self.exports.statistics(),
                               "refused": self.refusals.total, "nbd_bytes": self.budget.statistics(),
                               "throttles": sum(x.throttles for x in self.sessions)}
        for name, ch in self._chains.items():
            out["vdisks"][name] = ctl.jsonable(ch.statistics())
        out["group_sync"] = {"requests": self.group_sync.requests, "syncs": self.group_sync.syncs}
        return out

    def status(self) -> dict[str, Any]:
        """Protection state per vdisk (from its splitter) for `nicsplit status`."""
        self.datastore.reload_catalog()
        vdisks = []
        for v in self.datastore.list_vdisks():
            try:
                ch = self.chain(v.name)
            except Exception as e:  # a vdisk whose chain cannot build is reported, not hidden
                vdisks.append({"name": v.name, "cg": v.extra.get("cg"), "state": "error", "reason": str(e)})
                continue
            sp = ch.filter("split")
            st = sp.statistics() if sp is not None else {"state": "unprotected"}
            vdisks.append({"name": v.name, "cg": v.extra.get("cg"), **st})
        link = self.context.card
        return {
            "pid": os.getpid(),
            "addresses": self.addresses,
            "fenced": sorted(self.fenced),
            "vdisks": vdisks,
            # The last CG sequence number handed out: the journal has caught
            # up with production once its latest PIT reaches it.
            # gap: vdisks of the CG marking or resyncing (its records carry WFlag.GAP).
            "cgs": {name: {"last_seq": seq, "gap": sorted(self.context.gap(name).vdisks)}
                    for name, seq in self.context.cg_last_seqs().items()},
            "card": {"attached": link.attached, "losses": link.losses, "last_error": link.last_error, "tracked": link.tracked,
                     # late writes still in flight without a verdict, and late ones the card refused
                     "unconfirmed": link.unconfirmed, "late_refused": link.late_refused},
        }

    async def start(self, listen: tuple[str, int] | None, socket_path: str | None) -> list[str]:
        loop = asyncio.get_running_loop()
        addrs = []
        if listen is not None:
            srv = await loop.create_server(lambda: NBDSession(self), listen[0], listen[1], reuse_address=True)
            self._servers.append(srv)
            host, port = srv.sockets[0].getsockname()[:2]
            addrs.append(f"nbd://{host}:{port}")
        if socket_path:
            Path(socket_path).unlink(missing_ok=True)
            srv = await loop.create_unix_server(lambda: NBDSession(self), socket_path)
            self._servers.append(srv)
            addrs.append(f"nbd+unix:///?socket={socket_path}")
        self.addresses = addrs
        return addrs

    async def housekeeping(self, interval: float = 0.2) -> None:
        """Notice a dead card and the card's lost-writes log even when no
        writes arrive (the splitter notices on its own while writes flow);
        start the resync of marking vdisks once the card is back."""
        link = self.context.card
        while True:
            await asyncio.sleep(interval)
            t = link.get()
            if t is None:
                continue
            if not t.healthy():
                link.lost("card stopped responding (heartbeat stale or connection closed)")
                continue
            link.trim()
            if self.auto_resync:
                self.resyncer.poll(self._chains.values())

    async def stop(self) -> None:
        await self.resyncer.stop()
        await close_exports(self._servers, self.sessions, self._chains.values())
        await asyncio.get_running_loop().run_in_executor(None, self.datastore.sync)
        self.context.close()


async def close_exports(servers: list[asyncio.AbstractServer], sessions: set["NBDSession"],
                        chains: Iterable[Chain]) -> None:
    """Stop listening, let every session's in-flight requests reply, then
    close the chains (the host's and an image server's shutdown)."""
    for srv in servers:
        srv.close()
    for s in list(sessions):
        s.shutdown()
    await asyncio.gather(*(s.wait_idle() for s in list(sessions)), return_exceptions=True)
    for ch in chains:
        await ch.close()


class NBDSession(asyncio.Protocol):
    """One NBD connection."""

    def __init__(self, host: HostServer) -> None:
        self.host = host
        self.codec = nbd.ServerConnection(host.exports, max_options=host.limits.max_options)
        self.transport: asyncio.Transport | None = None
        self.top: Any = None
        self.export = ""
        self._ctx_id = 0
        self._out: list[bytes] = []
        self._tasks: dict[asyncio.Task, int] = {}   # task -> its request's bytes
        self._paused = False      # max_inflight tasks executing
        self._throttled = False   # byte budget spent (per connection or server)
        self._reading_paused = False
        self._closing = False
        self._lost = False
        self._exec = 0            # bytes of requests executing (read lengths, write payloads)
        self._out_bytes = 0       # read reply bytes batched in _out
        self._share = 0           # what this session holds of host.budget
        self._send_stalled = False
        self._send_timer: asyncio.TimerHandle | None = None
        self._send_mark = 0
        self._pending: Any = None  # a request held back while the server's budget is spent
        self.throttles = 0
        self._idle: asyncio.Future | None = None
        self._timer: asyncio.TimerHandle | None = None  # handshake, then idle timeout
        self._last = 0.0   # time.monotonic() of the last bytes received
        self.peer = "?"

    # -- asyncio.Protocol ------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.peer = str(transport.get_extra_info("peername") or "unix")
        limits = self.host.limits
        if limits.max_connections and len(self.host.sessions) >= limits.max_connections:
            self.host.refusals.warning("%s: connection refused: %d connections already (max_connections)",
                                       self.peer, len(self.host.sessions))
            self._closing = True
            transport.abort()
            return
        self.host.sessions.add(self)
        limits.apply(transport)
        transport.write(self.codec.data_to_send())
        self._last = time.monotonic()
        if limits.handshake_timeout:
            self._timer = asyncio.get_running_loop().call_later(limits.handshake_timeout, self._handshake_expired)

    def connection_lost(self, exc: Exception | None) -> None:
        self.host.sessions.discard(self)
        self._closing = True
        self._lost = True
        for timer in (self._timer, self._send_timer):
            if timer is not None:
                timer.cancel()
        self._timer = self._send_timer = None
        self.host.budget.cancel(self)
        self._out.clear()
        self._out_bytes = 0
        self._account()   # buffered replies are gone; executing requests still count until they end
        self._maybe_idle()

    def _handshake_expired(self) -> None:
        self._timer = None
        if self.top is None and not self._closing:
            log.warning("%s: no NBD handshake within %gs: closing", self.peer, self.host.limits.handshake_timeout)
            self._closing = True
            if self.transport is not None:
                self.transport.abort()

    def _idle_check(self) -> None:
        self._timer = None
        if self._closing:
            return
        limit = self.host.limits.idle_timeout
        now = time.monotonic()
        t = self.transport
        if self._tasks or (t is not None and t.get_write_buffer_size()):
            self._last = now   # busy is not idle
        left = self._last + limit - now
        if left > 0:
            self._timer = asyncio.get_running_loop().call_later(left, self._idle_check)
            return
        log.info("%s %s: no request for %gs (idle_timeout): closing", self.peer, self.export, limit)
        self.shutdown()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self._last = time.monotonic()
        codec = self.codec
        codec.receive_data(data)
        self._pump()

    def eof_received(self) -> bool:
        if not self._closing:
            self.codec.receive_data(b"")
            self._pump()
        return False

    # -- flow control (nbdpolicy: bytes held per connection and per server) --
    def pause_writing(self) -> None:
        """The transport holds more than its high-water mark of replies."""
        self._send_stalled = True
        t = self.host.limits.send_timeout
        if t and self._send_timer is None:
            self._send_mark = self.transport.get_write_buffer_size() if self.transport is not None else 0
            self._send_timer = asyncio.get_running_loop().call_later(t, self._send_check)

    def resume_writing(self) -> None:
        self._send_stalled = False
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        self._account()
        self._unthrottle()

    def _send_check(self) -> None:
        """send_timeout passed with the transport above its high-water mark:
        close unless the replies moved towards the client meanwhile."""
        self._send_timer = None
        t = self.transport
        if t is None or not self._send_stalled:
            return
        size = t.get_write_buffer_size()
        if size < self._send_mark:
            self._send_mark = size
            self._send_timer = asyncio.get_running_loop().call_later(self.host.limits.send_timeout, self._send_check)
            return
        log.warning("%s %s: client read none of %d bytes of replies for %gs (send_timeout): closing",
                    self.peer, self.export, size, self.host.limits.send_timeout)
        self._closing = True
        t.abort()

    def _account(self) -> None:
        """Re-measure this session's share of the server's byte budget:
        requests executing, replies batched, replies in the transport."""
        t = self.transport
        buf = t.get_write_buffer_size() if t is not None and not self._lost else 0
        share = self._exec + self._out_bytes + buf
        if share != self._share:
            self.host.budget.add(share - self._share)
            self._share = share

    def _unthrottle(self) -> None:
        t = self.transport
        if self._throttled and not self._lost and t is not None and not t.is_closing():
            self._throttled = False
            self._pump()

    def _set_reading(self) -> None:
        """Read from the socket unless too many requests are executing, the
        byte budget is spent, or the session is closing."""
        t = self.transport
        if t is None or self._lost:
            return
        want_pause = self._paused or self._throttled or self._closing
        if want_pause != self._reading_paused:
            self._reading_paused = want_pause
            if want_pause:
                t.pause_reading()
            else:
                t.resume_reading()

    # -- the loop around the codec ----------------------------------------
    def _pump(self) -> None:
        codec = self.codec
        out = self._out
        Request = nbd.Request
        READ, WRITE = nbd.NBD_CMD_READ, nbd.NBD_CMD_WRITE
        conn_limit = self.host.limits.conn_bytes
        budget = self.host.budget
        t = self.transport
        buffered = t.get_write_buffer_size() if t is not None and not self._lost else 0
        try:
            while True:
                if self._exec + self._out_bytes + buffered >= conn_limit:
                    # Take no request out of the input (nor read the socket)
                    # until replies drained: resume_writing or a task's end
                    # calls _unthrottle.
                    self._throttled = True
                    self.throttles += 1
                    break
                ev = self._pending
                if ev is not None:
                    self._pending = None
                else:
                    ev = codec.next_event()
                    if ev is nbd.NEED_DATA:
                        break
                if type(ev) is Request:
                    if ev.error:
                        log.debug("%s %s: request %#x refused: NBD errno %d", self.peer, self.export, ev.handle, ev.error)
                        out.append(codec.reply_error(ev.handle, ev.error))
                        continue
                    cost = ev.length if ev.cmd == READ or ev.cmd == WRITE else 0
                    if budget.held >= budget.limit and (self._share or cost > SMALL_REQUEST):
                        # The server's budget is spent: wait for the budget's
                        # wake-up. A session holding nothing still runs small
                        # requests, so clients that stopped reading cannot
                        # starve the others.
                        self._pending = ev
                        self._throttled = True
                        self.throttles += 1
                        budget.wait(self, self._unthrottle, asyncio.get_running_loop(), self._remeasure_all)
                        break
                    self._exec += cost
                    budget.held += cost
                    self._share += cost
                    done, res = run_eager(self._execute(ev))
                    if done:
                        self._exec -= cost
                        self._out_bytes += cost
                        if type(res) is list:
                            out.extend(res)
                        else:
                            out.append(res)
                    else:
                        self._track(res, cost)
                elif isinstance(ev, nbd.Negotiated):
                    self._negotiated(ev)
                elif isinstance(ev, nbd.Disconnect):
                    self.shutdown()
                    break
                elif isinstance(ev, nbd.Closed):
                    log.debug("%s: handshake ended: %s", self.peer, ev.reason)
                    self._flush_out()
                    self.shutdown()
                    return
        except nbd.RemoteProtocolError as e:
            log.warning("%s %s: closing connection: %s", self.peer, self.export, e)
            self._flush_out()
            self._closing = True
            if self.transport is not None:
                self.transport.close()
            return
        self._flush_out()
        if self._throttled and not self._tasks and not self._send_stalled and not budget.waiting(self):
            # Over this connection's bound only by what was just flushed, and
            # the socket took it at once (no pause_writing): nothing else
            # will wake this session, so look again on the next loop turn.
            asyncio.get_running_loop().call_soon(self._unthrottle)
        self._set_reading()

    def _remeasure_all(self) -> None:
        for s in list(self.host.sessions):
            s._account()

    def _flush_out(self) -> None:
        # Handshake replies exist only before transmission starts.
        hs = self.codec.data_to_send() if self.top is None else b""
        t = self.transport
        if t is None or t.is_closing():
            self._out.clear()
            self._out_bytes = 0
            self._account()
            return
        if hs:
            t.write(hs)
        out = self._out
        if out:
            if len(out) == 1:
                t.write(out[0])  # the QD1 case: one send, no list walk
            else:
                t.writelines(out)
            out.clear()
        self._out_bytes = 0
        self._account()

    def _negotiated(self, ev: Any) -> None:
        self.export = ev.export.name
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.host.limits.idle_timeout:
            self._timer = asyncio.get_running_loop().call_later(self.host.limits.idle_timeout, self._idle_check)
        # Handshake replies must reach the client before any transmission reply.
        hs = self.codec.data_to_send()
        if hs and self.transport is not None:
            self.transport.write(hs)
        try:
            self.top = self.host.chain(ev.export.name).top
        except Exception as e:  # a chain that cannot build: refuse this session only
            log.error("%s: export %s unusable: %s", self.peer, ev.export.name, e)
            self.shutdown()
            return
        self._ctx_id = next((i for i, n in ev.meta_contexts.items() if n == "base:allocation"), 0)
        log.info("%s: session on export %s (structured=%s)", self.peer, self.export, ev.structured)

    def _track(self, task: asyncio.Task, cost: int) -> None:
        self._tasks[task] = cost
        task.add_done_callback(self._task_done)
        if len(self._tasks) >= self.host.max_inflight:
            self._paused = True

    def _task_done(self, task: asyncio.Task) -> None:
        self._exec -= self._tasks.pop(task, 0)
        if not task.cancelled():
            res = task.result()  # _execute never raises
            t = self.transport
            if t is not None and not t.is_closing():
                if type(res) is list:
                    t.writelines(res)
                else:
                    t.write(res)
        self._account()
        if self._paused and len(self._tasks) <= self.host.max_inflight // 2:
            self._paused = False
        if self._throttled:
            self._unthrottle()
        else:
            self._set_reading()
        self._maybe_idle()

    async def _execute(self, req: Any) -> Any:
        """Run one request down the chain; returns the reply. Never raises."""
        codec = self.codec
        top = self.top
        cmd = req.cmd
        try:
            if cmd == nbd.NBD_CMD_WRITE:
                await top.pwrite(req.offset, req.data, _FLAG_MAP[req.flags & 63])
                return codec.reply_ok(req.handle)
            if cmd == nbd.NBD_CMD_READ:
                data = await top.pread(req.offset, req.length, 0)
                return codec.reply_read(req.handle, req.offset, data)
            if cmd == nbd.NBD_CMD_FLUSH:
                await top.flush(0)
                return codec.reply_ok(req.handle)
            if cmd == nbd.NBD_CMD_WRITE_ZEROES:
                await top.zero(req.offset, req.length, _FLAG_MAP[req.flags & 63])
                return codec.reply_ok(req.handle)
            if cmd == nbd.NBD_CMD_TRIM:
                await top.trim(req.offset, req.length, _FLAG_MAP[req.flags & 63])
                return codec.reply_ok(req.handle)
            if cmd == nbd.NBD_CMD_BLOCK_STATUS:
                ext = await top.extents(req.offset, req.length, _FLAG_MAP[req.flags & 63])
                return codec.reply_block_status(req.handle, self._ctx_id, _clip_extents(ext))
            raise IOFailure(errno.EINVAL, f"command {cmd} not supported")
        except IOFailure as e:
            log.info("%s %s: request %#x (cmd %d %d+%d) failed: %s", self.peer, self.export, req.handle, cmd, req.offset, req.length, e)
            return codec.reply_error(req.handle, nbd.errno_to_nbd(e.errno), str(e))
        except Exception:  # a bug below us: fail the IO, keep the session
            log.exception("%s %s: request %#x (cmd %d) crashed", self.peer, self.export, req.handle, cmd)
            return codec.reply_error(req.handle, nbd.NBD_EIO, "internal error")

    # -- shutdown ----------------------------------------------------------
    def shutdown(self) -> None:
        """Stop reading; close once in-flight requests have replied."""
        self._closing = True
        self._maybe_idle()

    def _maybe_idle(self) -> None:
        if self._closing and not self._tasks:
            if self.transport is not None and not self.transport.is_closing():
                self._flush_out()
                self.transport.close()
            if self._idle is not None and not self._idle.done():
                self._idle.set_result(None)

    async def wait_idle(self) -> None:
        if self._tasks:
            self._idle = asyncio.get_running_loop().create_future()
            await self._idle


def _clip_extents(ext: list[tuple[int, int]]) -> list[tuple[int, int]]:
    if all(n <= _MAX_EXTENT for n, _ in ext):
        return ext
    return [(min(n, _MAX_EXTENT), t) for n, t in ext]


def control_handler(host: HostServer) -> Callable[[dict], Awaitable[dict]]:
    """The host's control socket (`nicsplit.core.ctl`): ``{"cmd": "stats"}``,
    ``status``, ``ping``; also ``fence`` (failover) and ``barrier``
    (bookmarks), see HostServer."""

    async def handle(req: dict) -> dict:
        cmd = req.get("cmd")
        if cmd == "stats":
            return {"ok": True, "stats": host.statistics()}
        if cmd == "status":
            return {"ok": True, "status": host.status()}
        if cmd == "ping":
            return {"ok": True, "pid": os.getpid()}
        if cmd == "fence":
            return {"ok": True, **host.fence(str(req.get("cg")), bool(req.get("on", True)))}
        if cmd == "barrier":
            return {"ok": True, **(await host.barrier(str(req.get("cg"))))}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    return handle


async def serve(
    cfg: Config,
    *,
    listen: tuple[str, int] | None,
    socket_path: str | None,
    readonly: bool | None = None,
    ready: Callable[[dict], None] | None = None,
) -> None:
    """Run the host until SIGTERM/SIGINT; then finish in-flight IO and sync."""
    ds = Datastore.open(cfg.datastore_dir)
    ds.open_io()
    try:
        host = HostServer(cfg, ds, readonly=readonly)
        host.check_chains()
        addrs = await host.start(listen, socket_path)
        layout = cfg.layout
        layout.run.mkdir(parents=True, exist_ok=True)
        control = await ctl.serve(layout.host_sock, control_handler(host), errors=(HostCommandError, CGError))
        pid_file = layout.pid("host")
        pid_file.write_text(str(os.getpid()))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        keeper = loop.create_task(host.housekeeping())
        if ready is not None:
            ready({"event": "ready", "pid": os.getpid(), "addresses": addrs})
        await stop.wait()
        log.info("stopping: finishing in-flight IO")
        keeper.cancel()
        control.close()
        await host.stop()
        pid_file.unlink(missing_ok=True)
    finally:
        ds.close()
