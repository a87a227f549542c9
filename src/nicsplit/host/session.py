"""One NBD connection: `NBDSession`, the asyncio Protocol around the sans-IO
codec (`nicsplit.wire.nbd`) that the host and the image/failover servers
share. See host/server.py for the theory of operation (eager requests,
backpressure) and `nicsplit.host.nbdpolicy` for the limits and TLS it obeys.

The server object it is given (``host``) provides ``exports`` (an
`nbd.ExportProvider`), ``chain(name)``, ``max_inflight``, ``sessions``,
``limits``, ``refusals`` and ``budget``.

Receiving (a `asyncio.BufferedProtocol`): bytes are read into a scratch
buffer shared by the loop's sessions and fed to the codec, except the
payload of a large write, which is received straight into its destination
(``recv_into`` / SSL ``read_into``, `nbd.ServerConnection.sink_buffer`):
the codec's own exact-size buffer, or a buffer the chain lends for it
(``Chain.reserve``: the splitter's reservation in the card's ring, so the
payload is published where it landed, checksummed chunk by chunk as it
arrives). A lent buffer goes back (``release``) when its request has
replied, or when the payload never completes (the client went away or
broke framing) or its request never runs.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import ssl
import threading
import time
from typing import Any, Iterable

from nicsplit.core import pki
from nicsplit.host.chain import Chain
from nicsplit.host.eager import run_eager
from nicsplit.host.io import Flag, IOFailure
from nicsplit.host.load import HostLoad
from nicsplit.host.nbdpolicy import NO_TLS, SMALL_REQUEST, NbdTls
from nicsplit.wire import nbd

log = logging.getLogger("nicsplit.host.server")  # one logger for the host's NBD lines, as before the split

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

# One socket read: asyncio's own read size for a plain Protocol (256 KiB).
_READ_SIZE = 256 * 1024
# A large write's payload is received into its destination at most this much
# per read, so the chunk is still in cache when it is checksummed (half of
# this machine's 1 MiB L2; docs/benchmarks.md, issue 9).
_DIRECT_CHUNK = 256 * 1024
# The scratch buffer of the loop's sessions: get_buffer and buffer_updated
# run back to back in one loop callback and the codec copies what it keeps,
# so one buffer per thread serves every session of that thread's loop.
_scratch = threading.local()


def _scratch_buffer() -> memoryview:
    mv = getattr(_scratch, "mv", None)
    if mv is None:
        mv = _scratch.mv = memoryview(bytearray(_READ_SIZE))
    return mv


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


class NBDSession(asyncio.BufferedProtocol):
    """One NBD connection. Transports that cannot fill a buffer (pipes)
    call ``data_received``, as for a plain Protocol."""

    def __init__(self, host: Any, tls: NbdTls | None = None) -> None:
        self.host = host
        # Requests executing host-wide (nicsplit.host.load): in at the start, out at the reply.
        self._load = getattr(getattr(host, "context", None), "load", None) or HostLoad()
        self.tls = tls if tls is not None else NO_TLS
        self.codec = nbd.ServerConnection(host.exports, max_options=host.limits.max_options, tls=self.tls.mode)
        self._upgrading: list[bytes] | None = None  # bytes that arrived during the TLS handshake
        self.peer_cn: str | None = None
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
        self._direct = False  # the buffer handed out by get_buffer is a write payload's destination
        self._reserve: Any = None  # the chain's Chain.reserve (lends payload buffers), if any
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
        mode = self.tls.mode_for(transport.get_extra_info("peername"))
        if mode != self.tls.mode:   # a loopback peer of an `auto` listener beyond loopback
            self.codec = nbd.ServerConnection(self.host.exports, max_options=limits.max_options, tls=mode)
        limits.apply(transport)
        transport.write(self.codec.data_to_send())
        self._last = time.monotonic()
        if limits.handshake_timeout:
            self._timer = asyncio.get_running_loop().call_later(limits.handshake_timeout, self._handshake_expired)

    def connection_lost(self, exc: Exception | None) -> None:
        self.host.sessions.discard(self)
        self._closing = True
        self._lost = True
        self._drop_leases()
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

    def get_buffer(self, sizehint: int) -> memoryview:
        if not self._closing and self._upgrading is None:
            mv = self.codec.sink_buffer(_DIRECT_CHUNK)
            if mv is not None:
                self._direct = True
                return mv
        self._direct = False
        return _scratch_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        if not self._direct:
            self.data_received(_scratch_buffer()[:nbytes])
            return
        self._direct = False
        if self._closing:
            return
        self._last = time.monotonic()
        self.codec.sink_received(nbytes)
        self._pump()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        if self._upgrading is not None:   # decrypted bytes before start_tls() returned
            self._upgrading.append(bytes(data))  # (data may be the shared scratch buffer)
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
                    load = self._load
                    load.requests += 1
                    load.backlog = codec.unparsed() > 0
                    done, res = run_eager(self._execute(ev))
                    load.backlog = False
                    if done:
                        load.requests -= 1
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
                elif isinstance(ev, nbd.StartTLS):
                    self._flush_out()   # the ACK, in the clear
                    self._upgrading = []
                    task = asyncio.get_running_loop().create_task(self._start_tls())
                    self._tasks[task] = 0
                    task.add_done_callback(self._upgrade_done)
                    return
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
            self._drop_leases()
            self._flush_out(handshake=False)   # the codec's queued output is gone with its error
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

    async def _start_tls(self) -> bytes:
        """STARTTLS acknowledged: the TLS handshake as the server, on the
        same connection; then the codec goes on with the decrypted stream."""
        raw = self.transport
        assert raw is not None and self.tls.context is not None
        try:
            t = await asyncio.get_running_loop().start_tls(raw, self, self.tls.context, server_side=True)
        except (OSError, ssl.SSLError, ConnectionError, asyncio.TimeoutError) as e:
            log.warning("%s: TLS handshake failed: %s", self.peer, str(e) or type(e).__name__)
            self._closing = True
            raw.abort()
            return b""
        if t is None or self._lost:
            return b""
        self.transport = t  # type: ignore[assignment]
        self._reading_paused = False
        self.host.limits.apply(t)
        self.peer_cn = pki.peer_name(t.get_extra_info("ssl_object"))
        if not self.tls.admits(self.peer_cn):
            log.warning("%s: TLS client certificate %r is not among [host] tls_clients: closing", self.peer, self.peer_cn)
            self._closing = True
            t.abort()
            return b""
        if self.tls.psk:
            version, cipher = (t.get_extra_info("cipher") or ("?", "?"))[1::-1]
            log.info("%s: TLS up (pre-shared key, %s %s)", self.peer, version, cipher)
        else:
            log.info("%s: TLS up (client certificate %r)", self.peer, self.peer_cn)
        self.codec.tls_started()
        return b""

    def _upgrade_done(self, task: asyncio.Task) -> None:
        self._tasks.pop(task, None)
        early, self._upgrading = self._upgrading or [], None
        if task.cancelled() or self._closing:
            self._maybe_idle()
            return
        for data in early:
            self.codec.receive_data(data)
        self._pump()

    def _remeasure_all(self) -> None:
        for s in list(self.host.sessions):
            s._account()

    def _flush_out(self, handshake: bool = True) -> None:
        # Handshake replies exist only before transmission starts.
        hs = self.codec.data_to_send() if self.top is None and handshake else b""
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
            chain = self.host.chain(ev.export.name)
            self.top = chain.top
        except Exception as e:  # a chain that cannot build: refuse this session only
            log.error("%s: export %s unusable: %s", self.peer, ev.export.name, e)
            self.shutdown()
            return
        self._reserve = getattr(chain, "reserve", None)  # an image server's chain lends nothing
        if self._reserve is not None:
            self.codec.lend = self._lend
        self._ctx_id = next((i for i, n in ev.meta_contexts.items() if n == "base:allocation"), 0)
        log.info("%s: session on export %s (structured=%s)", self.peer, self.export, ev.structured)

    def _lend(self, handle: int, offset: int, length: int, flags: int) -> Any:
        """The codec's ``lend``: a buffer from the chain for a valid write's
        payload (None: the codec's own). Never raises: a failure only costs
        the copy."""
        try:
            return self._reserve(offset, length, _FLAG_MAP[flags & 63])
        except Exception:  # a bug in a lender must not break the session
            log.exception("%s %s: lending a buffer for write %#x failed", self.peer, self.export, handle)
            return None

    def _drop_leases(self) -> None:
        """Give back what was lent for payloads that will not be executed:
        the one being received, and a request held back by the budget."""
        lent = self.codec.abandon_sink()
        if lent is not None:
            lent.release()
        ev = self._pending
        if ev is not None and ev.lease is not None:
            self._pending = None
            ev.lease.release()

    def _track(self, task: asyncio.Task, cost: int) -> None:
        self._tasks[task] = cost
        task.add_done_callback(self._task_done)
        if len(self._tasks) >= self.host.max_inflight:
            self._paused = True

    def _task_done(self, task: asyncio.Task) -> None:
        self._load.requests -= 1
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
        finally:
            if req.lease is not None:  # the chain is done with the payload's buffer
                req.lease.release()

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
