"""A user-space link emulator: a TCP relay that shapes and breaks the link
between two peers (these machines have no netem). Used by the link fault
tests and the net transport benchmark (a 0.5 ms one-way link).

Two layers:

* `Shaper` — sans-IO, one direction of one connection: chunks in (with the
  time they arrived), `Emit`s out (the time each is due and its bytes).
  It applies, in order: blackhole (forward nothing), byte flips (at stream
  offsets, or per chunk with a seeded probability), duplication (a chunk
  forwarded twice: a replayed TLS record must be detected), the bandwidth
  cap (a token bucket: ``rate_mbit``, ``burst_bytes``), then the one-way
  delay plus seeded uniform jitter (``delay_ms`` ± ``jitter_ms``). Due
  times never go backwards: a byte stream cannot be reordered.
* `Relay` — asyncio: accepts on ``listen``, connects each client to ``to``
  and runs one `Shaper` per direction. Faults at run time: `cut` (abort
  every connection and refuse new ones with a reset until `heal`),
  `blackhole` (connections stay up, reads go on, nothing is forwarded, so
  the sender's TCP sees a live peer and only its own timeouts notice),
  `duplicate` and `flip` (armed once, taken by the next chunk of the given
  direction), `set` (delay, jitter, rate, flip probability).
  Each direction buffers at most ``buffer_bytes`` before it stops reading
  (backpressure, as a router's queue).

`LinkEmulator` runs a `Relay` on its own thread (for synchronous tests);
``python -m nicsplit.testing.linkemu --listen H:P --to H:P [--delay-ms
--jitter-ms --rate-mbit --seed --control PATH]`` runs one as a process,
controlled through a JSON-lines socket (`nicsplit.core.ctl`: ``{"cmd":
"cut"|"heal"|"blackhole"|"duplicate"|"flip"|"set"|"stats", ...}``) and
signals (SIGUSR1 cuts, SIGUSR2 heals, SIGTERM stops).

Timer accuracy: the loop runs on ``select()`` (microsecond timeouts);
epoll's and libuv's are rounded up to whole milliseconds, which alone would
turn a 0.5 ms delay into 1 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import selectors
import signal
import socket
import struct
import sys
import threading
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nicsplit.core import ctl

log = logging.getLogger(__name__)

C2S, S2C = "c2s", "s2c"  # client → server (the card → the appliance), and back
DIRECTIONS = (C2S, S2C)


@dataclass
class LinkParams:
    delay_ms: float = 0.0  # one-way, each direction
    jitter_ms: float = 0.0  # uniform in [-jitter, +jitter] around the delay (never below 0)
    rate_mbit: float = 0.0  # per direction; 0: unlimited
    burst_bytes: int = 16 << 10  # the token bucket's depth
    flip_probability: float = 0.0  # per chunk: flip one random byte of it

    def check(self) -> "LinkParams":
        if self.delay_ms < 0 or self.jitter_ms < 0 or self.rate_mbit < 0 or self.burst_bytes < 1:
            raise ValueError(f"link parameters out of range: {self}")
        if not 0.0 <= self.flip_probability <= 1.0:
            raise ValueError(f"flip_probability {self.flip_probability} is not in [0, 1]")
        return self


@dataclass(frozen=True)
class Emit:
    at: float  # due time (the clock `Shaper.feed` was given)
    data: bytes


@dataclass
class ShaperStats:
    bytes_in: int = 0
    bytes_out: int = 0
    chunks: int = 0
    dropped_bytes: int = 0  # blackholed
    duplicated: int = 0
    flipped: list[int] = field(default_factory=list)  # stream offsets of flipped bytes


class Shaper:
    """One direction of one connection, without IO (see the module doc)."""

    def __init__(self, params: LinkParams, rng: random.Random) -> None:
        self.params = params
        self.rng = rng
        self.blackhole = False
        self.flip_at: set[int] = set()  # stream offsets (of bytes_in) to flip
        self.duplicates = 0  # armed: the next chunks are forwarded twice
        self.stats = ShaperStats()
        self._tat = 0.0  # the token bucket's theoretical arrival time (GCRA)
        self._last_at = 0.0

    def feed(self, now: float, data: bytes) -> list[Emit]:
        p, st = self.params, self.stats
        start = st.bytes_in
        st.bytes_in += len(data)
        st.chunks += 1
        if self.blackhole:
            st.dropped_bytes += len(data)
            return []
        buf = bytearray(data)
        for off in sorted(o for o in self.flip_at if start <= o < start + len(buf)):
            self.flip_at.discard(off)
            buf[off - start] ^= 0xFF
            st.flipped.append(off)
        if p.flip_probability and buf and self.rng.random() < p.flip_probability:
            i = self.rng.randrange(len(buf))
            buf[i] ^= 1 << self.rng.randrange(8)
            st.flipped.append(start + i)
        out = [bytes(buf)]
        if self.duplicates:
            self.duplicates -= 1
            st.duplicated += 1
            out.append(out[0])
        emits = []
        for chunk in out:
            at = self._due(now, len(chunk))
            st.bytes_out += len(chunk)
            emits.append(Emit(at, chunk))
        return emits

    def _due(self, now: float, n: int) -> float:
        p = self.params
        depart = now
        if p.rate_mbit > 0:
            rate = p.rate_mbit * 1e6 / 8  # bytes/s
            tau = p.burst_bytes / rate
            tat = max(self._tat, now)
            depart = max(now, tat + n / rate - tau)  # the bucket holds burst_bytes of tokens
            self._tat = tat + n / rate
        delay = p.delay_ms
        if p.jitter_ms:
            delay = max(0.0, delay + self.rng.uniform(-p.jitter_ms, p.jitter_ms))
        at = max(depart + delay / 1e3, self._last_at)
        self._last_at = at
        return at


# -- the asyncio relay --------------------------------------------------------------


_SILENT_EOF = Emit(0.0, b"")
# A timer fires this much early: waking from select() and getting back to
# the callback takes about as long here (measured: 60-100 us late without it).
TIMER_SLACK_S = 50e-6


class _Pipe:
    """Forwards one direction: reads, shapes, and writes each chunk when due
    from a loop timer (no task switch: each hop through the loop costs tens
    of microseconds here). At most ``limit`` bytes wait before reading stops."""

    def __init__(self, shaper: Shaper, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 limit: int) -> None:
        self.shaper, self.reader, self.writer, self.limit = shaper, reader, writer, limit
        # None: the source's EOF, delivered in order; _SILENT_EOF: one a blackhole swallowed.
        self.queue: deque[Emit | None] = deque()
        self.queued = 0
        self.room = asyncio.Event()
        self.room.set()
        self.done = asyncio.get_running_loop().create_future()  # the EOF delivered (or swallowed)
        self._timer: asyncio.TimerHandle | None = None

    def drop_queued(self) -> None:
        self.queue = deque(e for e in self.queue if e is None or e is _SILENT_EOF)
        self.queued = 0
        self.room.set()

    def _push(self, e: Emit | None) -> None:
        self.queue.append(e)
        if e is not None:
            self.queued += len(e.data)
        if self._timer is None:
            self._flush()

    def _flush(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self.queue:
            e = self.queue[0]
            if e is None or e is _SILENT_EOF:
                self.queue.popleft()
                if e is None and self.writer.can_write_eof() and not self.writer.transport.is_closing():
                    self.writer.write_eof()
                if not self.done.done():
                    self.done.set_result(None)
                return
            if e.at > now + TIMER_SLACK_S:
                self._timer = loop.call_at(e.at - TIMER_SLACK_S, self._flush)
                break
            self.queue.popleft()
            self.queued -= len(e.data)
            if not self.writer.transport.is_closing():
                self.writer.write(e.data)
        if self.queued < self.limit:
            self.room.set()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.done.done():
            self.done.cancel()

    async def read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.room.wait()
            data = await self.reader.read(1 << 16)
            if not data:
                # A blackholed link forwards no FIN either: the peer learns nothing.
                self._push(_SILENT_EOF if self.shaper.blackhole else None)
                return
            for e in self.shaper.feed(loop.time(), data):
                self._push(e)
            if self.queued >= self.limit:
                self.room.clear()
            if self.writer.transport.get_write_buffer_size() > self.limit:
                await self.writer.drain()

    async def send_loop(self) -> None:
        await self.done


class _Conn:
    def __init__(self, relay: "Relay", number: int, client: tuple, server: tuple) -> None:
        self.relay, self.number = relay, number
        self.shapers = {d: Shaper(relay.params, random.Random(f"{relay.seed}/{number}/{d}")) for d in DIRECTIONS}
        for s in self.shapers.values():
            s.blackhole = relay.blackholed
        cr, cw = client
        sr, sw = server
        self.writers = (cw, sw)
        self.pipes = {C2S: _Pipe(self.shapers[C2S], cr, sw, relay.buffer_bytes),
                      S2C: _Pipe(self.shapers[S2C], sr, cw, relay.buffer_bytes)}
        self.tasks: list[asyncio.Task] = []

    async def run(self) -> None:
        clean = False
        try:
            async with asyncio.TaskGroup() as tg:
                for p in self.pipes.values():
                    self.tasks += [tg.create_task(p.read_loop()), tg.create_task(p.send_loop())]
            clean = True
        except* (OSError, asyncio.IncompleteReadError):
            pass  # a peer reset: the other side is reset below
        finally:
            if clean:  # both directions ended with EOF, everything delivered
                for w in self.writers:
                    w.close()
            else:
                self.abort()

    def abort(self) -> None:
        for p in self.pipes.values():
            p.cancel()
        for t in self.tasks:
            t.cancel()
        for w in self.writers:
            _reset(w)


def _reset(w: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0): a cut link, not a polite FIN."""
    sock = w.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    w.transport.abort()


class Relay:
    """The relay on the running loop (see the module doc)."""

    def __init__(self, listen: tuple[str, int], to: tuple[str, int], params: LinkParams | None = None, *,
                 seed: int = 0, buffer_bytes: int = 4 << 20) -> None:
        self.listen, self.to = listen, to
        self.params = (params or LinkParams()).check()
        self.seed = seed
        self.buffer_bytes = buffer_bytes
        self.cut_now = False
        self.blackholed = False
        self.conns: dict[int, _Conn] = {}
        self._tasks: set[asyncio.Task] = set()  # the connections' handlers, awaited by close()
        self.accepted = self.refused = self.connect_failures = 0
        self.closed_stats: dict[str, ShaperStats] = {d: ShaperStats() for d in DIRECTIONS}
        self._armed_dup: dict[str, int] = {d: 0 for d in DIRECTIONS}
        self._armed_flip: dict[str, list[int]] = {d: [] for d in DIRECTIONS}
        self._server: asyncio.AbstractServer | None = None
        self.address: tuple[str, int] = listen

    async def start(self) -> "Relay":
        self._server = await asyncio.start_server(self._client, *self.listen)
        self.address = self._server.sockets[0].getsockname()[:2]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for c in list(self.conns.values()):
            c.abort()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            await self._relay(reader, writer)
        finally:
            self._tasks.discard(task)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut_now:
            self.refused += 1
            _reset(writer)
            return
        try:
            server = await asyncio.open_connection(*self.to)
        except OSError:
            self.connect_failures += 1
            _reset(writer)
            return
        self.accepted += 1
        number = self.accepted
        conn = _Conn(self, number, (reader, writer), server)
        self.conns[number] = conn
        self._take_armed(conn)
        try:
            await conn.run()
        finally:
            del self.conns[number]
            for d, s in conn.shapers.items():
                total = self.closed_stats[d]
                for k in ("bytes_in", "bytes_out", "chunks", "dropped_bytes", "duplicated"):
                    setattr(total, k, getattr(total, k) + getattr(s.stats, k))
                total.flipped += s.stats.flipped

    def _take_armed(self, conn: _Conn) -> None:
        for d, s in conn.shapers.items():
            s.duplicates += self._armed_dup[d]
            self._armed_dup[d] = 0
            for after in self._armed_flip[d]:
                s.flip_at.add(s.stats.bytes_in + after)
            self._armed_flip[d] = []

    # -- faults (call on the relay's loop) --

    def set(self, **params: Any) -> LinkParams:
        new = LinkParams(**{**asdict(self.params), **params}).check()
        for k, v in asdict(new).items():
            setattr(self.params, k, v)  # shared by every live shaper
        return self.params

    def cut(self) -> None:
        self.cut_now = True
        for c in list(self.conns.values()):
            c.abort()

    def heal(self) -> None:
        self.cut_now = False
        self.set_blackhole(False)

    def set_blackhole(self, on: bool = True) -> None:
        self.blackholed = on
        for c in self.conns.values():
            for d, s in c.shapers.items():
                s.blackhole = on
                if on:
                    c.pipes[d].drop_queued()

    def _newest(self) -> _Conn | None:
        return self.conns[max(self.conns)] if self.conns else None

    def duplicate(self, direction: str = C2S) -> None:
        """Forward the next chunk of ``direction`` twice (the newest connection's, else the next one's)."""
        c = self._newest()
        if c is None:
            self._armed_dup[_dir(direction)] += 1
        else:
            c.shapers[_dir(direction)].duplicates += 1

    def flip(self, direction: str = C2S, after: int = 0) -> None:
        """Flip the byte ``after`` bytes further into ``direction``'s stream."""
        if after < 0:
            raise ValueError("after must be >= 0")
        c = self._newest()
        if c is None:
            self._armed_flip[_dir(direction)].append(after)
        else:
            s = c.shapers[_dir(direction)]
            s.flip_at.add(s.stats.bytes_in + after)

    def stats(self) -> dict:
        per = {d: ShaperStats(**asdict(self.closed_stats[d])) for d in DIRECTIONS}
        for c in self.conns.values():
            for d, s in c.shapers.items():
                t = per[d]
                for k in ("bytes_in", "bytes_out", "chunks", "dropped_bytes", "duplicated"):
                    setattr(t, k, getattr(t, k) + getattr(s.stats, k))
                t.flipped = t.flipped + s.stats.flipped
        return {"address": f"{self.address[0]}:{self.address[1]}", "to": f"{self.to[0]}:{self.to[1]}",
                "params": asdict(self.params), "cut": self.cut_now, "blackhole": self.blackholed,
                "connections": len(self.conns), "accepted": self.accepted, "refused": self.refused,
                "connect_failures": self.connect_failures, "directions": {d: asdict(s) for d, s in per.items()}}

    async def control(self, req: dict) -> dict:
        """One control-socket request (the JSON-lines protocol of `nicsplit.core.ctl`)."""
        cmd = req.get("cmd")
        if cmd == "set":
            self.set(**{k: v for k, v in req.items() if k != "cmd"})
        elif cmd == "cut":
            self.cut()
        elif cmd == "heal":
            self.heal()
        elif cmd == "blackhole":
            self.set_blackhole(bool(req.get("on", True)))
        elif cmd == "duplicate":
            self.duplicate(req.get("direction", C2S))
        elif cmd == "flip":
            self.flip(req.get("direction", C2S), int(req.get("after", 0)))
        elif cmd != "stats":
            return {"ok": False, "error": f"unknown command {cmd!r}"}
        return {"ok": True, "stats": self.stats()}


def _dir(direction: str) -> str:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
    return direction


def precise_loop() -> asyncio.AbstractEventLoop:
    """An event loop whose timers have microsecond resolution (module doc)."""
    return asyncio.SelectorEventLoop(selectors.SelectSelector())


class LinkEmulator:
    """A `Relay` on its own thread with a precise loop; thread-safe methods.
    ``with LinkEmulator(("127.0.0.1", 0), to, LinkParams(delay_ms=0.5)) as link:``
    then ``link.address``, ``link.cut()``, ``link.heal()``, ``link.stats()``..."""

    def __init__(self, listen: tuple[str, int], to: tuple[str, int], params: LinkParams | None = None, *,
                 seed: int = 0, buffer_bytes: int = 4 << 20) -> None:
        self.relay = Relay(listen, to, params, seed=seed, buffer_bytes=buffer_bytes)
        self.loop = precise_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="linkemu", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        return self.relay.address

    def start(self) -> "LinkEmulator":
        self._thread.start()
        self._call(self.relay.start())
        return self

    def _call(self, coro, timeout: float = 10):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _do(self, fn, *args, **kw):
        async def call():
            return fn(*args, **kw)
        return self._call(call())

    def set(self, **params: Any) -> LinkParams:
        return self._do(self.relay.set, **params)

    def cut(self) -> None:
        self._do(self.relay.cut)

    def heal(self) -> None:
        self._do(self.relay.heal)

    def blackhole(self, on: bool = True) -> None:
        self._do(self.relay.set_blackhole, on)

    def duplicate(self, direction: str = C2S) -> None:
        self._do(self.relay.duplicate, direction)

    def flip(self, direction: str = C2S, after: int = 0) -> None:
        self._do(self.relay.flip, direction, after)

    def stats(self) -> dict:
        return self._do(self.relay.stats)

    def close(self) -> None:
        if self._thread.is_alive():
            self._call(self.relay.close())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
        self.loop.close()

    def __enter__(self) -> "LinkEmulator":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the process ------------------------------------------------------------------


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


async def _amain(args: argparse.Namespace) -> int:
    params = LinkParams(args.delay_ms, args.jitter_ms, args.rate_mbit, args.burst_bytes, args.flip_probability)
    relay = await Relay(args.listen, args.to, params, seed=args.seed).start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, relay.cut)
    loop.add_signal_handler(signal.SIGUSR2, relay.heal)
    ctl_server = None
    if args.control:
        ctl_server = await ctl.serve(Path(args.control), relay.control, errors=(ValueError, TypeError))
    print(json.dumps({"event": "ready", "address": f"{relay.address[0]}:{relay.address[1]}",
                      "to": f"{args.to[0]}:{args.to[1]}", "seed": args.seed, "control": args.control}), flush=True)
    await stop.wait()
    if ctl_server is not None:
        ctl_server.close()
    await relay.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nicsplit.testing.linkemu",
                                 description="a TCP relay that emulates a link: delay, jitter, rate, cut, blackhole")
    ap.add_argument("--listen", type=parse_hostport, required=True, metavar="HOST:PORT")
    ap.add_argument("--to", type=parse_hostport, required=True, metavar="HOST:PORT")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay, each direction")
    ap.add_argument("--jitter-ms", type=float, default=0.0, help="uniform +- around the delay")
    ap.add_argument("--rate-mbit", type=float, default=0.0, help="bandwidth cap per direction (0: none)")
    ap.add_argument("--burst-bytes", type=int, default=16 << 10)
    ap.add_argument("--flip-probability", type=float, default=0.0, help="per chunk: flip one random byte")
    ap.add_argument("--seed", type=int, default=0, help="jitter and flips are drawn from it")
    ap.add_argument("--control", metavar="PATH", help="JSON-lines control socket (cut, heal, blackhole, ...)")
    args = ap.parse_args(argv)
    try:
        LinkParams(args.delay_ms, args.jitter_ms, args.rate_mbit, args.burst_bytes, args.flip_probability).check()
    except ValueError as e:
        ap.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s linkemu %(levelname)s %(message)s")
    loop = precise_loop()
    try:
        return loop.run_until_complete(_amain(args))
    finally:
        loop.close()


if __name__ == "__main__":
    sys.exit(main())
