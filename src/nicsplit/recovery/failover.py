"""Failover and failback of a consistency group (issue 7).

    failover(cfg, cg, Selector(...), listen=None)   nicsplit failover CG (--seq N | ... | --latest)
    resume(cfg, cg, listen=None)                     nicsplit failover CG --resume
    failback(cfg, cg, production_uri=None)           nicsplit failback CG
    prepare_server(cfg, cg, listen) / serve(...)     nicsplit failover-serve CG (failover runs this, detached)

Theory of operation
===================
**Failover** promotes the CG's replica images (``DATA/appliance/replicas/
<cg>/vdisk+<id>.img``, kept by the appliance's distribution) to production on
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
   in a persistent dirty bitmap (``DATA/appliance/failover/<cg>/vdisk+<id>.dirty``,
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

The copy uses the package's blocking NBD client (`nicsplit.recovery.nbdclient`,
around the sans-IO codec's client side: WRITE / WRITE_ZEROES / FLUSH
pipelined `COPY_DEPTH` deep), so failback needs no tool outside this package.

Every function raises `RecoveryError` (or the one-line errors of the layers
below) and never prints: warnings go to the ``warn`` callback.

Example::

    nicsplit failover web --bookmark before-upgrade --json
    qemu-system-x86_64 ... -drive file=nbd://APPLIANCE:PORT/web1-root,format=raw
    nicsplit failback web
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable, Iterable

from nicsplit.core import ctl
from nicsplit.core.cgs import CGCatalog
from nicsplit.core.config import Config, parse_listen
from nicsplit.core.dirtymap import REGION, RegionBitmap
from nicsplit.core.fsutil import atomic_write, fsync_dir
from nicsplit.core.layout import Layout, vdisk_file
from nicsplit.core.procutil import listening_sockets, runs
from nicsplit.recovery.distribution import CatalogMembers, ReplicaLock
from nicsplit.recovery.errors import RecoveryConflict, RecoveryError
from nicsplit.recovery.image import ReplicaServer
from nicsplit.recovery.images import spawn_detached, terminate, url_host
from nicsplit.recovery.nbdclient import NbdClient, NbdError
from nicsplit.recovery.pits import PitError
from nicsplit.recovery.blockindex import BlockIndex
from nicsplit.recovery.reader import PitReader
from nicsplit.recovery.replica import Distributor
from nicsplit.recovery.select import Selector, cg_vdisks, check_cg, require_journal, resolve_pit
from nicsplit.storage import atrest
from nicsplit.storage.image import Image, open_image
from nicsplit.storage.sealing import SealedError

log = logging.getLogger("nicsplit.recovery.failover")

__all__ = ["failover", "resume", "failback", "prepare_server", "serve", "status_fields", "failback_regions",
           "copy_runs", "read_state"]

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
# The copy: 1 MiB requests (COPY_DEPTH of them in flight).
COPY_CHUNK = 1 << 20

Warn = Callable[[str], None]


# -- state -------------------------------------------------------------------------------


def state_path(data: str | Path, cg: str) -> Path:
    return Layout(data).failover_state(cg)


def dirty_dir(data: str | Path, cg: str) -> Path:
    return Layout(data).failover_dir(cg)


def log_path(data: str | Path, cg: str) -> Path:
    """Where the detached failover server's stderr goes."""
    return Layout(data).run / f"failover-{cg}.log"


def read_state(data: str | Path, cg: str) -> dict | None:
    p = state_path(data, cg)
    try:
        st = json.loads(p.read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise RecoveryError(f"{p}: unreadable ({e}); fix or remove it") from None
    if st.get("version") != STATE_VERSION:
        raise RecoveryError(f"{p}: version {st.get('version')!r} not supported")
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


def server_alive(pid: int, cg: str) -> bool:
    """Is ``pid`` still the failover server of ``cg`` (not a zombie, not a reused pid)?"""
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
            applied = json.loads((Layout(data).replica(cg) / "state.json").read_text()).get("applied_seq")
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
    failover_ = None
    try:
        st = json.loads(state_path(data, cg).read_text())
    except (OSError, ValueError):
        st = None
    if isinstance(st, dict):
        failover_ = {"phase": st.get("phase"), "seq": st.get("seq"), "time": st.get("time"),
                     "since": st.get("started"), "pid": st.get("pid"),
                     "alive": server_alive(int(st.get("pid") or 0), cg), "exports": st.get("exports", {})}
    return {"distribution": distribution, "failover": failover_}


# -- regions and the copy ---------------------------------------------------------------------


def failback_regions(data: Path, cg: str, vdisks: Iterable[Any], seq: int, index: Any) -> dict[int, dict[str, Any]]:
    """Per vdisk id: {"runs": [(offset, length)], "dirty", "production", "marked"} —
    the union that failback copies (module docstring, failback step 3)."""
    out: dict[int, dict[str, Any]] = {}
    lay = Layout(data)
    for v in vdisks:
        bm = RegionBitmap(v.size)
        dirty = marked = 0
        p = vdisk_file(dirty_dir(data, cg), v.id, ".dirty")
        if p.exists():
            dirty = bm.merge(p.read_bytes()) * REGION
        uuid = getattr(v, "uuid", "")
        mp = lay.marking_bitmap(uuid)
        if uuid and mp.exists():
            marked = bm.merge(mp.read_bytes()) * REGION
        out[v.id] = {"bitmap": bm, "size": v.size, "dirty": dirty, "production": 0, "marked": marked}
    ix = index
    o0 = ix.ordinal_upto(seq) + 1
    for o in range(o0, len(ix.rec_seq)):
        e = out.get(ix.rec_vdisk[o])
        if e is not None:
            off, n = ix.rec_off[o], ix.rec_len[o]
            if off + n > e["size"]:
                n = max(0, e["size"] - off)
            e["bitmap"].mark(off, n)
            e["production"] += n
    for e in out.values():
        e["runs"] = e.pop("bitmap").runs()
    return out


def copy_runs(client: NbdClient, img: Image, runs_: list[tuple[int, int]], chunk: int = COPY_CHUNK) -> tuple[int, int]:
    """Copy the runs of an image (`sealed.Image`) to the NBD export, zeros as
    WRITE_ZEROES, then flush; (bytes written, bytes zeroed)."""
    written = zeroed = 0
    for off, ln in runs_:
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


def _host_request(cfg: Config, cmd: dict, timeout: float = 30.0) -> dict | None:
    return ctl.request(Layout(cfg.data).host_sock, cmd, timeout)


def fence(cfg: Config, cg: str, on: bool) -> str:
    """Fence (or unfence) production; "host" when the running host did it,
    "catalog" when no host runs (the role is all there is to change)."""
    reply = _host_request(cfg, {"cmd": "fence", "cg": cg, "on": on})
    if reply is not None and not reply.get("ok"):
        why = reply.get("error") or "no reason given"
        if "unknown command" in str(why):
            why += " (this host cannot fence; upgrade or stop it)"
        raise RecoveryError(f"the host refused to {'fence' if on else 'unfence'} {cg}: {why}")
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


def catch_up(cfg: Config, cg: str, index: Any, why: str, warn: Warn) -> None:
    """Make the journal hold every write production acknowledged so far: a
    barrier through the running host and card (what bookmarks use), then wait
    for it to be journaled.  Without a host nothing is in flight; when the
    barrier cannot be had (card down, a vdisk marking) say what that means."""
    reply = _host_request(cfg, {"cmd": "barrier", "cg": cg}, 10)
    if reply is None:
        return
    if not reply.get("ok"):
        warn(f"no barrier through the card for {cg} ({reply.get('error')}); {why} uses what "
             f"is journaled (and the host's marking bitmaps)")
        return
    if not _wait_journal(index, int(reply["seq"]), CATCH_UP_TIMEOUT):
        latest = index.pits.latest(consistent=False).seq if len(index.pits) else 0
        warn(f"the barrier at seq {reply['seq']} of {cg} was not journaled within "
             f"{CATCH_UP_TIMEOUT:.0f} s (journal at seq {latest}); {why} goes on without the rest")


def _vdisk_rows(vds: Iterable[Any]) -> list[dict]:
    return [{"id": v.id, "name": v.name, "size": v.size, "uuid": getattr(v, "uuid", "")} for v in vds]


class StateVdisk:
    """A vdisk as the failover state file records it (id, name, size, uuid)."""

    def __init__(self, row: dict) -> None:
        self.id, self.name, self.size, self.uuid = int(row["id"]), str(row["name"]), int(row["size"]), row.get("uuid", "")
        self.owner, self.extra = None, {}


def _wake_appliance(cfg: Config, cg: str) -> None:
    ctl.request(Layout(cfg.data).appliance_sock, {"cmd": "wake", "cg": cg}, 2.0)


def lock_replica(cfg: Config, cg: str) -> ReplicaLock:
    lock = ReplicaLock(cfg.data, cg)
    _wake_appliance(cfg, cg)  # the distribution thread lets go at once instead of at its next wake
    if not lock.acquire(LOCK_TIMEOUT):
        raise RecoveryError(f"the replica of {cg} stays locked ({lock.path}) after {LOCK_TIMEOUT:.0f} s; "
                            f"is another failover or failback running?")
    return lock


def stop_server(pid: int, cg: str) -> bool:
    """SIGTERM the failover server and wait (SIGKILL after STOP_TIMEOUT); True if it had to be killed."""
    return terminate(pid, lambda: server_alive(pid, cg), STOP_TIMEOUT)


def _spawn_server(cfg: Config, cg: str, lock: ReplicaLock, listen: str | None) -> dict:
    """Start failover-serve detached with the replica lock's descriptor; its ready line."""
    argv = [sys.executable, "-m", "nicsplit", "--data", str(cfg.data), "failover-serve", cg,
            "--lock-fd", str(lock.fileno()), "--detach-stdout"]
    if listen:
        argv += ["--listen", listen]
    Layout(cfg.data).run.mkdir(parents=True, exist_ok=True)
    return spawn_detached(argv, log_path(cfg.data, cg), "failover server", READY_TIMEOUT,
                          pass_fds=(lock.fileno(),))


def _state_body(st: dict) -> dict:
    return {k: v for k, v in st.items() if k != "version"}


def _log_warning(text: str) -> None:
    log.warning("%s", text)


# -- failover ---------------------------------------------------------------------------------


def failover(cfg: Config, cg: str, sel: Selector, *, listen: str | None = None,
             warn: Warn = _log_warning) -> dict[str, Any]:
    """Fail ``cg`` over to its replicas at the PIT ``sel`` names (module
    docstring, failover steps 1-6); what `nicsplit failover --json` prints."""
    t0 = time.monotonic()
    if listen:
        parse_listen(listen)
    vds = cg_vdisks(cfg, cg)  # unknown CG, no catalog, no vdisks: one line
    jd = check_cg(cfg.data, cg)
    st = read_state(cfg.data, cg)
    if st is not None and st.get("phase") == "serving":
        alive = server_alive(int(st.get("pid") or 0), cg)
        raise RecoveryConflict(f"consistency group {cg} is already failed over at seq {st.get('seq')}"
                            + (f" ({' '.join(st.get('exports', {}).values())})" if alive else
                               f"; its server is not running: restart it with 'nicsplit failover {cg} --resume'")
                            + f"; fail back first: nicsplit failback {cg}")
    if st is not None and st.get("phase") in ("syncing", "synced"):
        raise RecoveryConflict(f"a failback of {cg} is in progress; finish it with: nicsplit failback {cg}")
    require_journal(jd, cg)
    index = BlockIndex(jd)
    pit = resolve_pit(index.pits, cfg.data, cg, sel)

    # From here on production changes hands; every failure lifts the fence again.
    write_state(cfg.data, cg, {"cg": cg, "phase": "preparing", "seq": None, "time": None, "started": time.time(),
                               "vdisks": _vdisk_rows(vds)})
    lock: ReplicaLock | None = None
    try:
        fenced_by = fence(cfg, cg, True)
        if sel.latest:
            catch_up(cfg, cg, index, "the latest point in time", warn)
            pit = resolve_pit(index.pits, cfg.data, cg, Selector(latest=True))
        lock = lock_replica(cfg, cg)
        rd = Layout(cfg.data).replica(cg)
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
                                   "listen": listen or "127.0.0.1:0"})
        ready = _spawn_server(cfg, cg, lock, listen)
    except BaseException:
        if lock is not None:
            lock.release()
        try:
            fence(cfg, cg, False)
        except Exception as e:  # the first error is the one to report; say that this one happened too
            warn(f"could not lift the fence of {cg}: {e}")
        remove_state(cfg.data, cg)
        raise
    lock.release()  # the server holds the lock through its inherited descriptor
    st = read_state(cfg.data, cg) or {}
    st.update(phase="serving", pid=ready["pid"], address=ready["address"], exports=ready["exports"])
    write_state(cfg.data, cg, _state_body(st))
    return {"cg": cg, "seq": pit.seq, "time": pit.time_ns / 1e9, "exports": ready["exports"], "pid": ready["pid"],
            "fenced_by": fenced_by, "replica_was_at": before, "ready_seconds": round(time.monotonic() - t0, 4)}


def resume(cfg: Config, cg: str, *, listen: str | None = None) -> dict[str, Any]:
    """Restart the failover server of a failed-over ``cg`` (same PIT, same
    dirty bitmaps); what `nicsplit failover --resume --json` prints."""
    if listen:
        parse_listen(listen)
    cg_vdisks(cfg, cg)  # unknown CG, no catalog, no vdisks: one line
    check_cg(cfg.data, cg)
    st = read_state(cfg.data, cg)
    if st is None or st.get("phase") != "serving":
        raise RecoveryConflict(f"consistency group {cg} is not failed over (nothing to resume)"
                               if st is None else f"the failover of {cg} is in phase {st.get('phase')!r}, not serving")
    if server_alive(int(st.get("pid") or 0), cg):
        raise RecoveryConflict(f"the failover server of {cg} is running (pid {st.get('pid')})")
    lock = lock_replica(cfg, cg)
    try:
        ready = _spawn_server(cfg, cg, lock, listen or st.get("address") or st.get("listen"))
    finally:
        lock.release()
    st.update(pid=ready["pid"], address=ready["address"], exports=ready["exports"])
    write_state(cfg.data, cg, _state_body(st))
    return {"cg": cg, "seq": st["seq"], "time": st["time"], "exports": ready["exports"], "pid": ready["pid"],
            "resumed": True}


# -- the server (in the failover-serve process) ---------------------------------------------------


def prepare_server(cfg: Config, cg: str, listen: str | None) -> tuple[ReplicaServer, tuple[str, int], dict]:
    """The replica server of a CG being failed over, its address and the
    failover state (one-line errors before anything listens)."""
    addr = parse_listen(listen or "127.0.0.1:0")
    st = read_state(cfg.data, cg)
    if st is None or st.get("seq") is None:
        raise RecoveryError(f"consistency group {cg} is not being failed over (run: nicsplit failover {cg} ...)")
    try:
        srv = ReplicaServer(Layout(cfg.data).replica(cg), [StateVdisk(r) for r in st["vdisks"]], int(st["seq"]),
                            dirty_dir=dirty_dir(cfg.data, cg), cg=cg, validate=bool(cfg.host("validate", False)))
    except (PitError, OSError) as e:
        raise RecoveryError(f"failover of {cg}: {e}") from None
    srv.pki_dir = Layout(cfg.data).pki   # NBD over TLS: required beyond loopback
    return srv, addr, st


async def serve(srv: ReplicaServer, listen: tuple[str, int], st: dict, cg: str,
                on_ready: Callable[[dict], None], lock_fd: int | None = None) -> None:
    """Serve until SIGTERM / SIGINT; ``on_ready`` gets the ready line's fields.
    A taken ``listen`` port (a resumed failover) falls back to a free port."""
    try:
        try:
            host, port = await srv.start(*listen)
        except OSError as e:
            if listen[1] == 0:
                raise
            log.warning("failover %s: %s:%d is taken (%s); listening on a free port", cg, listen[0], listen[1], e)
            host, port = await srv.start(listen[0], 0)
        exports = srv.urls(url_host(host), port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        on_ready({"event": "ready", "pid": os.getpid(), "address": f"{host}:{port}", "exports": exports})
        log.info("failover of %s at seq %d serving: %s", cg, st["seq"], " ".join(exports.values()))
        await stop.wait()
        log.info("failover of %s: stopping (in-flight requests finish first)", cg)
    finally:
        await srv.stop()  # fsyncs images and bitmaps
        if lock_fd is not None:
            os.close(lock_fd)


# -- failback ---------------------------------------------------------------------------------


def production_uris(cfg: Config, base: str | None, names: list[str]) -> dict[str, str]:
    """Where the host serves each vdisk: ``base``, else what the host says
    (its status' addresses, else its listening TCP socket), else config."""
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
        raise RecoveryError(f"bad production URI {base!r}: use nbd://HOST:PORT or nbd+unix:///?socket=PATH")
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
        return next((p for p, ino in listening_sockets() if ino in inodes), None)
    except OSError:
        return None


def _sync(cfg: Config, cg: str, st: dict, vds: list[StateVdisk], seq: int, index: BlockIndex,
          production_uri: str | None, warn: Warn) -> tuple[int, int, dict[str, dict]]:
    """Failback step 3: copy the regions that may differ to production."""
    rd = Layout(cfg.data).replica(cg)
    copied = zeroed = 0
    per: dict[str, dict] = {}
    if st.get("phase") != "syncing":
        st["phase"] = "syncing"
        write_state(cfg.data, cg, _state_body(st))
    fence(cfg, cg, False)  # the sync writes go through the splitter: production must take them
    catch_up(cfg, cg, index, "failback", warn)
    regions = failback_regions(cfg.data, cg, vds, seq, index)
    uris = production_uris(cfg, production_uri, [v.name for v in vds])
    for v in vds:
        r = regions[v.id]
        img = open_image(vdisk_file(rd, v.id, ".img"), v.size, atrest.keyring_for_images(rd), writable=False)
        try:
            with NbdClient(uris[v.name]) as c:
                if c.size != v.size:
                    raise NbdError(f"{uris[v.name]}: size {c.size}, but vdisk {v.name} has {v.size}")
                w, z = copy_runs(c, img, r["runs"])
        except (NbdError, OSError, SealedError) as e:
            raise RecoveryError(f"failback of {cg}: copying {v.name} to production failed: {e}; the replica still "
                                f"holds the failover image: run 'nicsplit failback {cg}' again") from None
        finally:
            img.close()
        copied += w
        zeroed += z
        per[v.name] = {"dirty_bytes": r["dirty"], "production_bytes": r["production"],
                       "marked_bytes": r["marked"], "copied_bytes": w, "zeroed_bytes": z,
                       "regions": len(r["runs"])}
    st["phase"] = "synced"
    write_state(cfg.data, cg, _state_body(st))
    return copied, zeroed, per


def _revert(cfg: Config, cg: str, vds: list[StateVdisk], seq: int, index: BlockIndex) -> int:
    """Failback step 4: lay the failover site's writes back to the PIT in the
    replica, so it is at its applied_seq again; distribution then applies
    the sync. Bytes reverted."""
    rd = Layout(cfg.data).replica(cg)
    reverted = 0
    with PitReader(Layout(cfg.data).journal(cg), vds, seq, index=index) as reader:
        for v in vds:
            p = vdisk_file(dirty_dir(cfg.data, cg), v.id, ".dirty")
            if not p.exists():
                continue
            runs_ = RegionBitmap.read(p, v.size).runs()
            img = open_image(vdisk_file(rd, v.id, ".img"), v.size, atrest.keyring_for_images(rd), writable=True)
            try:
                for off, ln in runs_:
                    pos = off
                    while pos < off + ln:
                        n = min(4 << 20, off + ln - pos)
                        img.pwrite(reader.pread(v.id, pos, n), pos)
                        pos += n
                    reverted += ln
                img.fsync()
            finally:
                img.close()
    return reverted


def failback(cfg: Config, cg: str, *, production_uri: str | None = None,
             warn: Warn = _log_warning) -> dict[str, Any]:
    """Return ``cg`` to production with a final sync (module docstring,
    failback steps 1-5); what `nicsplit failback --json` prints (with
    ``"aborted": true`` when the failover never served)."""
    t0 = time.monotonic()
    CGCatalog(cfg.data).get(cg)  # unknown CG: one line
    st = read_state(cfg.data, cg)
    if st is None:
        raise RecoveryConflict(f"consistency group {cg} is not failed over (nothing to fail back)")
    vds = [StateVdisk(r) for r in st["vdisks"]]
    if st.get("phase") == "preparing" or st.get("seq") is None:
        # The failover never served: production holds everything; lift the fence.
        stop_server(int(st.get("pid") or 0), cg)
        fence(cfg, cg, False)
        shutil.rmtree(dirty_dir(cfg.data, cg), ignore_errors=True)
        remove_state(cfg.data, cg)
        _wake_appliance(cfg, cg)
        return {"cg": cg, "seq": None, "aborted": True, "copied_bytes": 0}
    if _host_request(cfg, {"cmd": "ping"}, 5) is None:
        raise RecoveryError(f"failback writes through the host, and no host runs for {cfg.data} "
                            f"(start it: nicsplit up, or nicsplit host serve)")
    seq = int(st["seq"])
    killed = stop_server(int(st.get("pid") or 0), cg)
    lock = lock_replica(cfg, cg)
    try:
        index = BlockIndex(Layout(cfg.data).journal(cg))
        copied = zeroed = 0
        per: dict[str, dict] = {}
        if st.get("phase") != "synced":
            copied, zeroed, per = _sync(cfg, cg, st, vds, seq, index, production_uri, warn)
        else:
            fence(cfg, cg, False)
        reverted = _revert(cfg, cg, vds, seq, index)
        CGCatalog(cfg.data).set_role(cg, "production")
        shutil.rmtree(dirty_dir(cfg.data, cg), ignore_errors=True)
        remove_state(cfg.data, cg)  # distribution resumes
    finally:
        lock.release()
    _wake_appliance(cfg, cg)
    return {"cg": cg, "seq": seq, "copied_bytes": copied, "zeroed_bytes": zeroed, "reverted_bytes": reverted,
            "vdisks": per, "server_killed": killed, "seconds": round(time.monotonic() - t0, 4)}
