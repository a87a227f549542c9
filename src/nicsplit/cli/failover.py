"""Failover and failback of a consistency group (issue 7).

    nicsplit failover CG (--seq N | --bookmark NAME | --at TIME | --latest | --resume)
                         [--listen HOST:PORT] [--json]
    nicsplit failback CG [--production-uri URI] [--json]
    nicsplit failover-serve CG --lock-fd FD [--listen HOST:PORT]      (failover runs this, detached)

Theory of operation
===================
**Failover** promotes the CG's replica images (``DATA/appliance/replicas/
<cg>/<vdisk>.img``, kept by the appliance's distribution) to production on
the appliance side, at a PIT:

1. every check that can fail on user input (unknown CG, no vdisks, no such
   PIT, unknown bookmark, a PIT in a merge window) runs before anything
   changes;
2. ``DATA/appliance/failover/<cg>.json`` is written with phase ``preparing``
   (from here on the appliance's distribution of the CG is *paused*:
   distribution.py rule 3), then production is **fenced**: the host's control
   command ``{"cmd": "fence", "cg": CG, "on": true}`` (it drops the CG's NBD
   sessions and serves its vdisks read-only from then on), or, when no host
   runs, the role ``failed-over`` in ``DATA/cgs.json`` (a host that starts
   later reads it);
3. with ``--latest`` it asks the fenced host for a barrier through the card
   (as bookmarks do) and waits (up to `CATCH_UP_TIMEOUT`) until the journal
   holds it, so the latest PIT is production as the fence left it;
4. it takes the replica's lock (the distribution thread lets go at its next
   step boundary) and brings the images to exactly the PIT
   (`Distributor.goto`: apply forward up to it, or roll back with the undo
   log);
5. it starts ``failover-serve`` detached, handing it the locked descriptor
   (the lock lives as long as the server), which serves every vdisk of the CG
   writable over NBD straight from the replica images
   (`nicsplit.recovery.image.ReplicaServer`), recording every written region
   in a persistent dirty bitmap (``DATA/appliance/failover/<cg>/<vdisk>.dirty``,
   one bit per 64 KiB, durable before the write);
6. phase ``serving``: the state file names the server's pid and exports.

**Failback** returns to production with a final sync:

1. phase ``syncing``: the failover server is stopped (SIGTERM: in-flight
   requests finish, images fsynced), the replica lock is taken;
2. production is unfenced (``{"cmd": "fence", "cg": CG, "on": false}``):
   the sync writes go through the host's NBD exports, so the splitter
   captures them and protection goes on (later PITs include them).  The
   CG's clients must not use production until failback returns;
3. the regions that may differ are copied from the replica images to
   production: those written at the failover site (dirty bitmaps) ∪ those
   production wrote after the failover PIT (journal records with seq > PIT,
   from the block index, after a barrier is journaled) ∪ those
   the host marked dirty without journaling them (marking bitmaps,
   ``DATA/host/marking/<uuid>.bitmap``); all-zero chunks go as WRITE_ZEROES;
   then one FLUSH per vdisk;
4. phase ``synced``: the replica images' dirty regions are laid back to the
   failover PIT from the journal (`PitReader`), so the replica is exactly at
   its persisted ``applied_seq`` again and its undo log stays exact;
5. role ``production``; the state file and bitmaps are removed; distribution
   resumes and applies the records after the PIT — production's own and the
   sync's — bringing the replica to production.

Both are re-runnable after a crash at any point: ``failover`` of a CG left in
``preparing`` starts over; ``failback`` in ``syncing`` copies again (the
replica still holds the failover image), in ``synced`` only finishes steps
4–5; ``failback`` of a ``preparing`` failover just lifts the fence.  A
failover server that died is restarted with ``failover CG --resume`` (same
PIT, same dirty bitmaps).

The copy uses a minimal blocking NBD client (`NbdClient`: fixed newstyle,
NBD_OPT_GO, simple replies, WRITE / WRITE_ZEROES / FLUSH pipelined
`COPY_DEPTH` deep), so failback needs no tool outside this package.

Example::

    nicsplit failover web --bookmark before-upgrade --json
    qemu-system-x86_64 ... -drive file=nbd://APPLIANCE:PORT/web1-root,format=raw
    nicsplit failback web
"""

from __future__ import annotations

import argparse
import errno as errno_mod
import json
import logging
import os
import re
import signal
import socket
import struct
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any, Iterable

from nicsplit.recovery.distribution import (
    CatalogMembers, ReplicaLock, failover_state_path, replica_dir,
)
from nicsplit.storage import atrest
from nicsplit.storage.image import Image, open_image
from nicsplit.storage.sealing import SealedError
from nicsplit.cli.pit import _cli_errors, _fmt
from nicsplit.core.fsutil import atomic_write, fsync_dir
from nicsplit.wire import nbd as N

log = logging.getLogger("nicsplit.cli.failover")

STATE_VERSION = 1
# How long failover and failback wait for a barrier through the card to be
# journaled (milliseconds when the card ships; bounded for when it does not).
CATCH_UP_TIMEOUT = 30.0
# How long failover waits for the distribution thread to let go of the
# replica: one step (<100 ms) plus its wake interval, with a wide margin.
LOCK_TIMEOUT = 60.0
# Server start: interpreter (~0.2 s) plus opening the images.
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
# The copy: 1 MiB requests, 16 in flight: ~what nbdcopy uses per connection.
COPY_CHUNK = 1 << 20
COPY_DEPTH = 16
REGION = 64 << 10  # of dirty and marking bitmaps


# -- state -------------------------------------------------------------------------------


def state_path(data: str | Path, cg: str) -> Path:
    return failover_state_path(data, cg)


def dirty_dir(data: str | Path, cg: str) -> Path:
    return Path(data) / "appliance" / "failover" / cg


def read_state(data: str | Path, cg: str) -> dict | None:
    from nicsplit.cli.main import CliError

    p = state_path(data, cg)
    try:
        st = json.loads(p.read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise CliError(f"{p}: unreadable ({e}); fix or remove it") from None
    if st.get("version") != STATE_VERSION:
        raise CliError(f"{p}: version {st.get('version')!r} not supported")
    return st


def write_state(data: str | Path, cg: str, st: dict) -> None:
    p = state_path(data, cg)
    created = not p.parent.exists()
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if created:
        fsync_dir(p.parent.parent)
    atomic_write(p, json.dumps({"version": STATE_VERSION, **st}).encode(), 0o600)


def remove_state(data: str | Path, cg: str) -> None:
    p = state_path(data, cg)
    p.unlink(missing_ok=True)
    fsync_dir(p.parent)


def _server_alive(pid: int, cg: str) -> bool:
    """Is ``pid`` still the failover server of ``cg`` (not a zombie, not a reused pid)?"""
    from nicsplit.core.procutil import runs

    return runs(pid, "failover-serve", cg)


def status_fields(data: str | Path, cg: str, appliance_cg: dict | None) -> dict[str, Any]:
    """Per-CG keys `nicsplit status` adds: ``distribution`` (from the running
    appliance, else the replica's state.json) and ``failover`` (null unless
    failed over)."""
    dist = (appliance_cg or {}).get("distribution")
    if dist:
        distribution = {k: dist.get(k) for k in ("state", "applied_seq", "durable_seq", "lag_records",
                                                 "lag_seconds", "last_error")}
    else:
        applied = None
        try:
            applied = json.loads((replica_dir(data, cg) / "state.json").read_text()).get("applied_seq")
        except (OSError, ValueError, AttributeError):
            pass
        if appliance_cg is None:
            state = "appliance-down"
        elif "distribution" not in appliance_cg:
            state = "no-journal"  # the appliance has not heard of the CG yet
        else:
            state = "off"
        distribution = {"state": state, "applied_seq": applied, "durable_seq": None, "lag_records": None,
                        "lag_seconds": None, "last_error": None}
    failover = None
    try:
        st = json.loads(state_path(data, cg).read_text())
    except (OSError, ValueError):
        st = None
    if isinstance(st, dict):
        failover = {"phase": st.get("phase"), "seq": st.get("seq"), "time": st.get("time"),
                    "since": st.get("started"), "pid": st.get("pid"),
                    "alive": _server_alive(int(st.get("pid") or 0), cg), "exports": st.get("exports", {})}
    return {"distribution": distribution, "failover": failover}


# -- a minimal NBD client (for the failback copy) ------------------------------------------------

_HELLO = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
_OPT = struct.Struct(">QII")  # IHAVEOPT, option, length
_OPT_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
_REQUEST = struct.Struct(">IHHQQI")  # magic, command flags, type, cookie, offset, length
_SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
assert (_HELLO.size, _OPT.size, _OPT_REPLY.size, _REQUEST.size, _SIMPLE_REPLY.size) == (18, 16, 20, 28, 16)


class NbdError(Exception):
    """The NBD server refused or failed something (one line)."""


class NbdClient:
    """Blocking NBD client for writing one export: fixed-newstyle handshake,
    NBD_OPT_GO, simple replies only (structured replies are never asked
    for), WRITE / WRITE_ZEROES / FLUSH with up to ``depth`` in flight."""

    def __init__(self, uri: str, *, depth: int = COPY_DEPTH, timeout: float = 60.0) -> None:
        self.uri = uri
        self.depth = depth
        u = urllib.parse.urlsplit(uri)
        if u.scheme == "nbd":
            self.export = urllib.parse.unquote(u.path.lstrip("/"))
            self.sock = socket.create_connection((u.hostname or "127.0.0.1", u.port or 10809), timeout=timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        elif u.scheme == "nbd+unix":
            path = urllib.parse.parse_qs(u.query).get("socket", [""])[0]
            if not path:
                raise NbdError(f"{uri}: nbd+unix needs ?socket=PATH")
            self.export = urllib.parse.unquote(u.path.lstrip("/"))
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.settimeout(timeout)
            self.sock.connect(path)
        else:
            raise NbdError(f"{uri}: not an nbd:// or nbd+unix:// URI")
        self._cookie = 0
        self._inflight: dict[int, tuple[str, int, int]] = {}
        try:
            self.size, self.flags = self._handshake()
        except BaseException:
            self.sock.close()
            raise
        if self.flags & N.NBD_FLAG_READ_ONLY:
            self.sock.close()
            raise NbdError(f"{uri}: the export is read-only (is the consistency group still fenced?)")
        self.can_zero = bool(self.flags & N.NBD_FLAG_SEND_WRITE_ZEROES)

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise NbdError(f"{self.uri}: the server closed the connection")
            buf += chunk
        return bytes(buf)

    def _handshake(self) -> tuple[int, int]:
        magic, opt, hflags = _HELLO.unpack(self._recv(_HELLO.size))
        if magic != N.NBDMAGIC or opt != N.IHAVEOPT or not hflags & N.NBD_FLAG_FIXED_NEWSTYLE:
            raise NbdError(f"{self.uri}: not a fixed-newstyle NBD server")
        cflags = N.NBD_FLAG_C_FIXED_NEWSTYLE | (N.NBD_FLAG_C_NO_ZEROES if hflags & N.NBD_FLAG_NO_ZEROES else 0)
        name = self.export.encode()
        body = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self.sock.sendall(struct.pack(">I", cflags) + _OPT.pack(N.IHAVEOPT, N.NBD_OPT_GO, len(body)) + body)
        size = flags = None
        while True:
            rmagic, ropt, rtype, rlen = _OPT_REPLY.unpack(self._recv(_OPT_REPLY.size))
            data = self._recv(rlen) if rlen else b""
            if rmagic != N.NBD_OPT_REPLY_MAGIC or ropt != N.NBD_OPT_GO:
                raise NbdError(f"{self.uri}: bad option reply")
            if rtype == N.NBD_REP_ACK:
                break
            if rtype & (1 << 31):
                why = data.decode(errors="replace") or f"error {rtype & 0x7FFFFFFF}"
                raise NbdError(f"{self.uri}: export {self.export!r} refused: {why}")
            if rtype == N.NBD_REP_INFO and len(data) >= 12 and struct.unpack(">H", data[:2])[0] == N.NBD_INFO_EXPORT:
                size, flags = struct.unpack(">QH", data[2:12])
        if size is None or flags is None:
            raise NbdError(f"{self.uri}: the server did not say the export's size")
        return size, flags

    def _send(self, cmd: int, what: str, offset: int, length: int, data: bytes | memoryview = b"") -> None:
        while len(self._inflight) >= self.depth:
            self._reply()
        self._cookie += 1
        self._inflight[self._cookie] = (what, offset, length)
        head = _REQUEST.pack(N.NBD_REQUEST_MAGIC, 0, cmd, self._cookie, offset, length)
        if data:
            self.sock.sendall(head + bytes(data) if len(data) < 65536 else head)
            if len(data) >= 65536:
                self.sock.sendall(data)
        else:
            self.sock.sendall(head)

    def _reply(self) -> None:
        magic, err, cookie = _SIMPLE_REPLY.unpack(self._recv(_SIMPLE_REPLY.size))
        if magic != N.NBD_SIMPLE_REPLY_MAGIC or cookie not in self._inflight:
            raise NbdError(f"{self.uri}: unexpected reply (magic {magic:#x}, cookie {cookie})")
        what, off, n = self._inflight.pop(cookie)
        if err:
            name = errno_mod.errorcode.get(err, str(err))
            hint = " (is the consistency group still fenced?)" if err == N.NBD_EPERM else ""
            raise NbdError(f"{self.uri}: {what} of {n} bytes at offset {off} failed: {name}{hint}")

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self._send(N.NBD_CMD_WRITE, "write", offset, len(data), data)

    def zero(self, offset: int, length: int) -> None:
        self._send(N.NBD_CMD_WRITE_ZEROES, "write-zeroes", offset, length)

    def flush(self) -> None:
        """Wait for every request, then make them durable (NBD_CMD_FLUSH)."""
        while self._inflight:
            self._reply()
        self._send(N.NBD_CMD_FLUSH, "flush", 0, 0)
        while self._inflight:
            self._reply()

    def close(self) -> None:
        try:
            if not self._inflight:
                self.sock.sendall(_REQUEST.pack(N.NBD_REQUEST_MAGIC, 0, N.NBD_CMD_DISC, 0, 0, 0))
        except OSError:
            pass
        self.sock.close()

    def __enter__(self) -> "NbdClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- regions --------------------------------------------------------------------------------


def _mark(flags: bytearray, offset: int, length: int) -> None:
    if length > 0:
        r0, r1 = offset // REGION, (offset + length - 1) // REGION
        flags[r0 : r1 + 1] = b"\x01" * (r1 + 1 - r0)


def _bitmap_into(flags: bytearray, bits: bytes) -> int:
    """OR a 1-bit-per-region bitmap (bit r%8 of byte r//8) into ``flags``; bytes marked."""
    n = 0
    for i, b in enumerate(bits):
        if b:
            for k in range(8):
                r = i * 8 + k
                if b & (1 << k) and r < len(flags):
                    flags[r] = 1
                    n += REGION
    return n


def _runs(flags: bytearray, size: int) -> list[tuple[int, int]]:
    out = []
    for m in re.finditer(rb"\x01+", flags):
        off = m.start() * REGION
        out.append((off, min(m.end() * REGION, size) - off))
    return out


def failback_regions(data: Path, cg: str, vdisks: Iterable[Any], seq: int, index: Any) -> dict[int, dict[str, Any]]:
    """Per vdisk id: {"runs": [(offset, length)], "dirty", "production", "marked"} —
    the union that failback copies (module docstring, failback step 3)."""
    out: dict[int, dict[str, Any]] = {}
    for v in vdisks:
        flags = bytearray(-(-v.size // REGION))
        dirty = marked = 0
        p = dirty_dir(data, cg) / f"{v.name}.dirty"
        if p.exists():
            dirty = _bitmap_into(flags, p.read_bytes())
        uuid = getattr(v, "uuid", "")
        mp = Path(data) / "host" / "marking" / f"{uuid}.bitmap"
        if uuid and mp.exists():
            marked = _bitmap_into(flags, mp.read_bytes())
        out[v.id] = {"flags": flags, "size": v.size, "dirty": dirty, "production": 0, "marked": marked}
    ix = index
    o0 = ix.ordinal_upto(seq) + 1
    for o in range(o0, len(ix.rec_seq)):
        e = out.get(ix.rec_vdisk[o])
        if e is not None:
            off, n = ix.rec_off[o], ix.rec_len[o]
            if off + n > e["size"]:
                n = max(0, e["size"] - off)
            _mark(e["flags"], off, n)
            e["production"] += n
    for e in out.values():
        e["runs"] = _runs(e.pop("flags"), e["size"])
    return out


def copy_runs(client: NbdClient, img: Image, runs: list[tuple[int, int]], chunk: int = COPY_CHUNK) -> tuple[int, int]:
    """Copy the runs of an image (`sealed.Image`) to the NBD export, zeros as
    WRITE_ZEROES, then flush; (bytes written, bytes zeroed)."""
    written = zeroed = 0
    for off, ln in runs:
        pos, end = off, off + ln
        while pos < end:
            n = min(chunk, end - pos)
            data = img.pread(pos, n)
            if client.can_zero and data.count(0) == n:
                client.zero(pos, n)
                zeroed += n
            else:
                client.write(pos, data)
                written += n
            pos += n
    client.flush()
    return written, zeroed


# -- helpers --------------------------------------------------------------------------------


def _host_request(cfg: Any, cmd: dict, timeout: float = 30.0) -> dict | None:
    from nicsplit.core.ctl import request

    return request(cfg.run_dir / "host.sock", cmd, timeout)


def _fence(cfg: Any, cg: str, on: bool) -> str:
    """Fence (or unfence) production; "host" when the running host did it,
    "catalog" when no host runs (the role is all there is to change)."""
    from nicsplit.core.cgs import CGCatalog
    from nicsplit.cli.main import CliError

    reply = _host_request(cfg, {"cmd": "fence", "cg": cg, "on": on})
    if reply is not None and not reply.get("ok"):
        why = reply.get("error") or "no reason given"
        if "unknown command" in str(why):
            why += " (this host cannot fence; upgrade or stop it)"
        raise CliError(f"the host refused to {'fence' if on else 'unfence'} {cg}: {why}")
    CGCatalog(cfg.data).set_role(cg, "failed-over" if on else "production")  # idempotent after the host's
    return "catalog" if reply is None else "host"


def _wait_journal(index: Any, seq: int, timeout: float) -> bool:
    """Wait until the journal holds a PIT at or after ``seq``."""
    deadline = time.monotonic() + timeout
    pause = 0.002
    while True:
        index.refresh()
        if len(index.pits) and index.pits.latest(consistent=False).seq >= seq:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(pause)  # the journal is another process's file: nothing to wait on but its growth
        pause = min(pause * 2, 0.05)


def _catch_up(cfg: Any, cg: str, index: Any, why: str) -> None:
    """Make the journal hold every write production acknowledged so far: a
    barrier through the running host and card (what bookmarks use), then wait
    for it to be journaled.  Without a host nothing is in flight; when the
    barrier cannot be had (card down, a vdisk marking) say what that means."""
    reply = _host_request(cfg, {"cmd": "barrier", "cg": cg}, 10)
    if reply is None:
        return
    if not reply.get("ok"):
        print(f"nicsplit: warning: no barrier through the card for {cg} ({reply.get('error')}); {why} uses what "
              f"is journaled (and the host's marking bitmaps)", file=sys.stderr)
        return
    if not _wait_journal(index, int(reply["seq"]), CATCH_UP_TIMEOUT):
        latest = index.pits.latest(consistent=False).seq if len(index.pits) else 0
        print(f"nicsplit: warning: the barrier at seq {reply['seq']} of {cg} was not journaled within "
              f"{CATCH_UP_TIMEOUT:.0f} s (journal at seq {latest}); {why} goes on without the rest", file=sys.stderr)


def _vdisk_rows(vds: Iterable[Any]) -> list[dict]:
    return [{"id": v.id, "name": v.name, "size": v.size, "uuid": getattr(v, "uuid", "")} for v in vds]


class _Vd:
    def __init__(self, row: dict) -> None:
        self.id, self.name, self.size, self.uuid = int(row["id"]), str(row["name"]), int(row["size"]), row.get("uuid", "")
        self.owner, self.extra = None, {}


def _wake_appliance(cfg: Any, cg: str) -> None:
    from nicsplit.core.ctl import request

    request(cfg.run_dir / "appliance.sock", {"cmd": "wake", "cg": cg}, 2.0)


def _lock_replica(cfg: Any, cg: str) -> ReplicaLock:
    from nicsplit.cli.main import CliError

    lock = ReplicaLock(cfg.data, cg)
    _wake_appliance(cfg, cg)  # the distribution thread lets go at once instead of at its next wake
    if not lock.acquire(LOCK_TIMEOUT):
        raise CliError(f"the replica of {cg} stays locked ({lock.path}) after {LOCK_TIMEOUT:.0f} s; "
                       f"is another failover or failback running?")
    return lock


def _stop_server(pid: int, cg: str) -> bool:
    """SIGTERM the failover server and wait (SIGKILL after STOP_TIMEOUT); True if it had to be killed."""
    if not _server_alive(pid, cg):
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while _server_alive(pid, cg) and time.monotonic() < deadline:
        time.sleep(0.02)
    if not _server_alive(pid, cg):
        return False
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while _server_alive(pid, cg) and time.monotonic() < deadline:
        time.sleep(0.02)
    return True


def _spawn_server(cfg: Any, cg: str, lock: ReplicaLock, listen: str | None) -> dict:
    """Start failover-serve detached with the replica lock's descriptor; its ready line."""
    from nicsplit.cli.image import spawn_detached

    argv = [sys.executable, "-m", "nicsplit", "--data", str(cfg.data), "failover-serve", cg,
            "--lock-fd", str(lock.fileno()), "--detach-stdout"]
    if listen:
        argv += ["--listen", listen]
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    return spawn_detached(argv, cfg.run_dir / f"failover-{cg}.log", "failover server", READY_TIMEOUT,
                          pass_fds=(lock.fileno(),))


def _print(args: argparse.Namespace, out: dict, text: str) -> None:
    print(json.dumps(out) if args.json else text)


# -- failover ---------------------------------------------------------------------------------


@_cli_errors
def cmd_failover(args: argparse.Namespace) -> int:
    from nicsplit.cli.image import _cg_vdisks
    from nicsplit.cli.pit import _check_cg, _index, resolve_pit
    from nicsplit.recovery.blockindex import BlockIndex
    from nicsplit.recovery.replica import Distributor
    from nicsplit.core import config as cfgmod
    from nicsplit.cli.main import CliError
    from nicsplit.core.config import parse_listen

    t0 = time.monotonic()
    cfg = cfgmod.load(cfgmod.data_dir(args.data))
    cg = args.cg
    if args.listen:
        parse_listen(args.listen)
    vds = _cg_vdisks(cfg, cg)  # unknown CG, no catalog, no vdisks: one line
    jd = _check_cg(cfg.data, cg)
    st = read_state(cfg.data, cg)
    if args.resume:
        return _resume(args, cfg, cg, st)
    if st is not None and st.get("phase") == "serving":
        alive = _server_alive(int(st.get("pid") or 0), cg)
        raise CliError(f"consistency group {cg} is already failed over at seq {st.get('seq')}"
                       + (f" ({' '.join(st.get('exports', {}).values())})" if alive else
                          f"; its server is not running: restart it with 'nicsplit failover {cg} --resume'")
                       + f"; fail back first: nicsplit failback {cg}")
    if st is not None and st.get("phase") in ("syncing", "synced"):
        raise CliError(f"a failback of {cg} is in progress; finish it with: nicsplit failback {cg}")
    if not jd.is_dir():
        _index(jd, cg)  # "no journal yet"
    index = BlockIndex(jd)
    pit = resolve_pit(index.pits, cfg.data, cg, at=args.at, seq=args.seq, bookmark=args.bookmark, latest=args.latest)

    # From here on production changes hands; every failure lifts the fence again.
    write_state(cfg.data, cg, {"cg": cg, "phase": "preparing", "seq": None, "time": None, "started": time.time(),
                               "vdisks": _vdisk_rows(vds)})
    lock: ReplicaLock | None = None
    try:
        fenced_by = _fence(cfg, cg, True)
        if args.latest:
            _catch_up(cfg, cg, index, "the latest point in time")
            pit = resolve_pit(index.pits, cfg.data, cg, latest=True)
        lock = _lock_replica(cfg, cg)
        rd = replica_dir(cfg.data, cg)
        members = CatalogMembers(cfg.datastore_dir, cg, rd)()
        # The PIT was resolved from this index, so it holds every record up to
        # it; no rescans while the appliance may still be appending.
        with Distributor(jd, rd, members or vds, index=index, refresh=False) as d:
            before = d.applied_seq
            d.goto(pit.seq, 1024)
        dd = dirty_dir(cfg.data, cg)
        dd.mkdir(parents=True, exist_ok=True, mode=0o700)
        for p in dd.glob("*.dirty"):
            p.unlink()  # a fresh failover: nothing written at this site yet
        write_state(cfg.data, cg, {"cg": cg, "phase": "preparing", "seq": pit.seq, "time": pit.time_ns / 1e9,
                                   "started": time.time(), "fence": fenced_by, "vdisks": _vdisk_rows(vds),
                                   "listen": args.listen or "127.0.0.1:0"})
        ready = _spawn_server(cfg, cg, lock, args.listen)
    except BaseException:
        if lock is not None:
            lock.release()
        try:
            _fence(cfg, cg, False)
        except Exception as e:  # the first error is the one to report; say that this one happened too
            print(f"nicsplit: warning: could not lift the fence of {cg}: {e}", file=sys.stderr)
        remove_state(cfg.data, cg)
        raise
    lock.release()  # the server holds the lock through its inherited descriptor
    st = read_state(cfg.data, cg) or {}
    st.update(phase="serving", pid=ready["pid"], address=ready["address"], exports=ready["exports"])
    write_state(cfg.data, cg, {k: v for k, v in st.items() if k != "version"})
    out = {"cg": cg, "seq": pit.seq, "time": pit.time_ns / 1e9, "exports": ready["exports"], "pid": ready["pid"],
           "fenced_by": fenced_by, "replica_was_at": before, "ready_seconds": round(time.monotonic() - t0, 4)}
    lines = [f"failed over {cg} to seq {pit.seq} ({_fmt(pit.time_ns)}); production fenced ({fenced_by}); "
             f"ready in {out['ready_seconds']:.2f} s"]
    lines += [f"  {n:<20} {u}" for n, u in ready["exports"].items()]
    lines.append(f"fail back with: nicsplit failback {cg}")
    _print(args, out, "\n".join(lines))
    return 0


def _resume(args: argparse.Namespace, cfg: Any, cg: str, st: dict | None) -> int:
    from nicsplit.cli.main import CliError

    if st is None or st.get("phase") != "serving":
        raise CliError(f"consistency group {cg} is not failed over (nothing to resume)"
                       if st is None else f"the failover of {cg} is in phase {st.get('phase')!r}, not serving")
    if _server_alive(int(st.get("pid") or 0), cg):
        raise CliError(f"the failover server of {cg} is running (pid {st.get('pid')})")
    lock = _lock_replica(cfg, cg)
    try:
        ready = _spawn_server(cfg, cg, lock, args.listen or st.get("address") or st.get("listen"))
    finally:
        lock.release()
    st.update(pid=ready["pid"], address=ready["address"], exports=ready["exports"])
    write_state(cfg.data, cg, {k: v for k, v in st.items() if k != "version"})
    out = {"cg": cg, "seq": st["seq"], "time": st["time"], "exports": ready["exports"], "pid": ready["pid"],
           "resumed": True}
    _print(args, out, f"failover of {cg} at seq {st['seq']} serving again:\n"
           + "\n".join(f"  {n:<20} {u}" for n, u in ready["exports"].items()))
    return 0


# -- the server ---------------------------------------------------------------------------------


def cmd_failover_serve(args: argparse.Namespace) -> int:
    from nicsplit.cli.image import _run
    from nicsplit.core import config as cfgmod
    from nicsplit.cli.main import CliError
    from nicsplit.core.config import ConfigError, parse_listen

    if not getattr(args, "verbose", 0):
        logging.getLogger("nicsplit").setLevel(logging.INFO)  # a server logs its life (DATA/run/failover-CG.log)
    from nicsplit.recovery.image import ReplicaServer
    from nicsplit.recovery.pits import PitError

    try:
        cfg = cfgmod.load(cfgmod.data_dir(args.data))
        listen = parse_listen(args.listen or "127.0.0.1:0")
        st = read_state(cfg.data, args.cg)
        if st is None or st.get("seq") is None:
            raise CliError(f"consistency group {args.cg} is not being failed over (run: nicsplit failover {args.cg} ...)")
        try:
            srv = ReplicaServer(replica_dir(cfg.data, args.cg), [_Vd(r) for r in st["vdisks"]], int(st["seq"]),
                                dirty_dir=dirty_dir(cfg.data, args.cg), cg=args.cg,
                                validate=bool(cfg.host("validate", False)))
        except (PitError, OSError) as e:
            raise CliError(f"failover of {args.cg}: {e}") from None
    except (CliError, ConfigError) as e:
        print(json.dumps({"event": "error", "error": str(e)}), flush=True)
        raise
    _run(_serve(args, srv, listen, st))
    return 0


async def _serve(args: argparse.Namespace, srv: Any, listen: tuple[str, int], st: dict) -> None:
    import asyncio

    cg = args.cg
    try:
        try:
            host, port = await srv.start(*listen)
        except OSError as e:
            if listen[1] == 0:
                raise
            log.warning("failover %s: %s:%d is taken (%s); listening on a free port", cg, listen[0], listen[1], e)
            host, port = await srv.start(listen[0], 0)
        url_host = socket.gethostname() if host in ("0.0.0.0", "::") else host
        exports = srv.urls(url_host, port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print(json.dumps({"event": "ready", "pid": os.getpid(), "address": f"{host}:{port}", "exports": exports}),
              flush=True)
        if args.detach_stdout:
            fd = os.open(os.devnull, os.O_WRONLY)  # the starter stops reading us now
            os.dup2(fd, 1)
            os.close(fd)
        log.info("failover of %s at seq %d serving: %s", cg, st["seq"], " ".join(exports.values()))
        await stop.wait()
        log.info("failover of %s: stopping (in-flight requests finish first)", cg)
    finally:
        await srv.stop()  # fsyncs images and bitmaps
        if args.lock_fd is not None:
            os.close(args.lock_fd)


# -- failback ---------------------------------------------------------------------------------


def _production_uris(cfg: Any, args: argparse.Namespace, names: list[str]) -> dict[str, str]:
    """Where the host serves each vdisk: --production-uri, else what the host
    says (its status' addresses, else its listening TCP socket), else config."""
    from nicsplit.cli.main import CliError

    base = args.production_uri
    if base is None:
        reply = _host_request(cfg, {"cmd": "status"}, 10) or {}
        st = reply.get("status") or {}
        addrs = st.get("addresses") or []
        tcp = [a for a in addrs if a.startswith("nbd://")]
        if tcp:
            base = tcp[0]
        elif st.get("pid"):
            port = _listening_port(int(st["pid"]))
            if port:
                base = f"nbd://127.0.0.1:{port}"
        if base is None:
            base = "nbd://" + str(cfg.host("listen", "127.0.0.1:10809"))
    if base.startswith("nbd+unix"):
        u = urllib.parse.urlsplit(base)
        return {n: urllib.parse.urlunsplit((u.scheme, "", "/" + n, u.query, "")) for n in names}
    if not base.startswith("nbd://"):
        raise CliError(f"bad production URI {base!r}: use nbd://HOST:PORT or nbd+unix:///?socket=PATH")
    u = urllib.parse.urlsplit(base)
    host = u.hostname or "127.0.0.1"
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    hp = f"[{host}]" if ":" in host else host
    return {n: f"nbd://{hp}:{u.port or 10809}/{urllib.parse.quote(n)}" for n in names}


def _listening_port(pid: int) -> int | None:
    """The TCP port a local process listens on (the host: its NBD port)."""
    try:
        inodes = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                t = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if t.startswith("socket:["):
                inodes.add(t[8:-1])
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                lines = Path(table).read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                f = line.split()
                if len(f) > 9 and f[3] == "0A" and f[9] in inodes:  # 0A = LISTEN
                    return int(f[1].rsplit(":", 1)[1], 16)
    except OSError:
        return None
    return None


@_cli_errors
def cmd_failback(args: argparse.Namespace) -> int:
    from nicsplit.recovery.blockindex import BlockIndex
    from nicsplit.recovery.reader import PitReader
    from nicsplit.core import config as cfgmod
    from nicsplit.core.cgs import CGCatalog
    from nicsplit.cli.main import CliError

    t0 = time.monotonic()
    cfg = cfgmod.load(cfgmod.data_dir(args.data))
    cg = args.cg
    CGCatalog(cfg.data).get(cg)  # unknown CG: one line
    st = read_state(cfg.data, cg)
    if st is None:
        raise CliError(f"consistency group {cg} is not failed over (nothing to fail back)")
    vds = [_Vd(r) for r in st["vdisks"]]
    if st.get("phase") == "preparing" or st.get("seq") is None:
        # The failover never served: production holds everything; lift the fence.
        _stop_server(int(st.get("pid") or 0), cg)
        _fence(cfg, cg, False)
        shutil_rmtree(dirty_dir(cfg.data, cg))
        remove_state(cfg.data, cg)
        _wake_appliance(cfg, cg)
        _print(args, {"cg": cg, "seq": None, "aborted": True, "copied_bytes": 0},
               f"the failover of {cg} had not finished; production unfenced, nothing to copy")
        return 0
    if _host_request(cfg, {"cmd": "ping"}, 5) is None:
        raise CliError(f"failback writes through the host, and no host runs for {cfg.data} "
                       f"(start it: nicsplit up, or nicsplit host serve)")
    seq = int(st["seq"])
    jd = Path(cfg.data) / "appliance" / "journal" / cg
    killed = _stop_server(int(st.get("pid") or 0), cg)
    lock = _lock_replica(cfg, cg)
    try:
        rd = replica_dir(cfg.data, cg)
        index = BlockIndex(jd)
        copied = zeroed = 0
        per: dict[str, dict] = {}
        if st.get("phase") != "synced":
            if st.get("phase") != "syncing":
                st["phase"] = "syncing"
                write_state(cfg.data, cg, {k: v for k, v in st.items() if k != "version"})
            _fence(cfg, cg, False)  # the sync writes go through the splitter: production must take them
            _catch_up(cfg, cg, index, "failback")
            regions = failback_regions(cfg.data, cg, vds, seq, index)
            uris = _production_uris(cfg, args, [v.name for v in vds])
            for v in vds:
                r = regions[v.id]
                img = open_image(rd / f"{v.name}.img", v.size, atrest.keyring_for_images(rd), writable=False)
                try:
                    with NbdClient(uris[v.name]) as c:
                        if c.size != v.size:
                            raise NbdError(f"{uris[v.name]}: size {c.size}, but vdisk {v.name} has {v.size}")
                        w, z = copy_runs(c, img, r["runs"])
                except (NbdError, OSError, SealedError) as e:
                    raise CliError(f"failback of {cg}: copying {v.name} to production failed: {e}; the replica still "
                                   f"holds the failover image: run 'nicsplit failback {cg}' again") from None
                finally:
                    img.close()
                copied += w
                zeroed += z
                per[v.name] = {"dirty_bytes": r["dirty"], "production_bytes": r["production"],
                               "marked_bytes": r["marked"], "copied_bytes": w, "zeroed_bytes": z,
                               "regions": len(r["runs"])}
            st["phase"] = "synced"
            write_state(cfg.data, cg, {k: v for k, v in st.items() if k != "version"})
        else:
            _fence(cfg, cg, False)
        # Lay the failover site's writes back to the PIT in the replica, so it
        # is at its applied_seq again; distribution then applies the sync.
        reverted = 0
        with PitReader(jd, vds, seq, index=index) as reader:
            for v in vds:
                p = dirty_dir(cfg.data, cg) / f"{v.name}.dirty"
                if not p.exists():
                    continue
                flags = bytearray(-(-v.size // REGION))
                _bitmap_into(flags, p.read_bytes())
                img = open_image(rd / f"{v.name}.img", v.size, atrest.keyring_for_images(rd), writable=True)
                try:
                    for off, ln in _runs(flags, v.size):
                        pos = off
                        while pos < off + ln:
                            n = min(4 << 20, off + ln - pos)
                            img.pwrite(reader.pread(v.id, pos, n), pos)
                            pos += n
                        reverted += ln
                    img.fsync()
                finally:
                    img.close()
        CGCatalog(cfg.data).set_role(cg, "production")
        shutil_rmtree(dirty_dir(cfg.data, cg))
        remove_state(cfg.data, cg)  # distribution resumes
    finally:
        lock.release()
    _wake_appliance(cfg, cg)
    out = {"cg": cg, "seq": seq, "copied_bytes": copied, "zeroed_bytes": zeroed, "reverted_bytes": reverted,
           "vdisks": per, "server_killed": killed, "seconds": round(time.monotonic() - t0, 4)}
    _print(args, out, f"failed back {cg}: {copied} bytes written and {zeroed} zeroed on production "
                      f"in {out['seconds']:.2f} s; production unfenced, protection goes on")
    return 0


def shutil_rmtree(p: Path) -> None:
    import shutil

    shutil.rmtree(p, ignore_errors=True)


# -- parsers ---------------------------------------------------------------------------------


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``failover``, ``failback`` and ``failover-serve``."""
    from nicsplit.cli.pit import _seq

    s = sub.add_parser("failover", parents=[common],
                       help="serve a consistency group from its replicas at a point in time (production fenced)")
    s.add_argument("cg")
    when = s.add_mutually_exclusive_group(required=True)
    when.add_argument("--at", metavar="TIME", help="the latest point in time at or before TIME")
    when.add_argument("--seq", type=_seq, metavar="N", help="the point in time at seq N")
    when.add_argument("--bookmark", metavar="NAME")
    when.add_argument("--latest", action="store_true", help="the latest, after the journal caught up with production")
    when.add_argument("--resume", action="store_true", help="restart the server of a failed-over CG")
    s.add_argument("--listen", metavar="HOST:PORT", help="default 127.0.0.1:0 (a free port)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_failover)

    s = sub.add_parser("failback", parents=[common],
                       help="copy what changed back to production, unfence it, resume replication")
    s.add_argument("cg")
    s.add_argument("--production-uri", metavar="URI",
                   help="the host's NBD address (default: asked from the running host)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_failback)

    s = sub.add_parser("failover-serve", parents=[common], help="serve a failed-over CG (failover runs this)")
    s.add_argument("cg")
    s.add_argument("--lock-fd", type=int, metavar="FD", help=argparse.SUPPRESS)
    s.add_argument("--listen", metavar="HOST:PORT")
    s.add_argument("--detach-stdout", action="store_true", help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_failover_serve)
