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
import logging
import os
import signal
from pathlib import Path
from typing import Any, Awaitable, Callable

from nicsplit.core import ctl
from nicsplit.core.cgs import CGCatalog, CGError
from nicsplit.card.transports.base import TRANSPORTS
from nicsplit.core.config import Config, ConfigError
from nicsplit.core.dirtymap import DirtyMapError
from nicsplit.host.chain import Chain, ChainError, VdiskView, build_chain
from nicsplit.host.actlog import DEFAULT_EXTENTS as DEFAULT_AL_EXTENTS
from nicsplit.host.context import HostContext
from nicsplit.host.datastore import Datastore
from nicsplit.host.filters.split import BarrierFailed
from nicsplit.host.filters.stats import Histogram
from nicsplit.host.io import EXTENT_DATA
from nicsplit.host.nbdpolicy import ByteBudget, NbdLimits, NbdTls, RateLimitedLog, resolve_tls
from nicsplit.host.session import NBDSession, close_exports
from nicsplit.host.stdio import serve_stdio
from nicsplit.host.plugin import DatastorePlugin, GroupSync
from nicsplit.host.resync import Resyncer
from nicsplit.wire import nbd

log = logging.getLogger(__name__)

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


def _split_pcts(hists: list[Histogram]) -> dict[str, float | None]:
    """p50 / p99 of the time writes took to reach the card (µs), over ``hists``."""
    h = Histogram.merged(hists)
    if not h.total:
        return {"split_p50_us": None, "split_p99_us": None}
    return {"split_p50_us": h.percentile(50) / 1000, "split_p99_us": h.percentile(99) / 1000}


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

    def __init__(self, cfg: Config, datastore: Datastore, *, readonly: bool | None = None,
                 transport: str | None = None, appliance: str | None = None) -> None:
        self.cfg = cfg
        # --transport replaces [splitter] transport for this run ([vdisks.NAME] still wins);
        # --appliance (under `nicsplit up`: where the appliance listens) for the net transport.
        self.transport = transport
        try:
            net = cfg.net_options(appliance)
        except ConfigError as e:
            raise ChainError(f"[splitter] appliance: {e}") from None
        self.datastore = datastore
        self.readonly = bool(cfg.host("readonly", False) if readonly is None else readonly)
        self.validate = bool(cfg.host("validate", False))
        self.max_inflight = int(cfg.host("max_inflight", 128))
        self.exports = ExportCatalog(self)
        self.group_sync = GroupSync(datastore.sync)
        # A read-only host writes nothing: it keeps no activity log and leaves
        # an earlier host's for the next writable start.
        al_extents = 0 if self.readonly else int(cfg.host("al_extents", DEFAULT_AL_EXTENTS))
        # The card link's transport is the one card transport the vdisks use
        # (docs/operations.md "Choosing a transport"): it alone reads the
        # card's lost-writes log. Two of them, or an explicit [card] transport
        # that disagrees, is a start error.
        try:
            names = [v.name for v in datastore.list_vdisks()]
            card_transport = cfg.card_transport(names, transport, TRANSPORTS) or cfg.default_card_transport(TRANSPORTS)
        except ConfigError as e:
            raise ChainError(str(e)) from None
        self.context = HostContext(cfg.data, card=cfg.raw.get("host", {}).get("card"), al_extents=al_extents,
                                   transports={"net": net}, card_transport=card_transport)
        self.al_recovered: dict[str, Any] = {}  # what the start after an unclean stop marked (status)
        self.resyncer = Resyncer(self.context.card, mib_s=float(cfg.host("resync_mib_s", 64)),
                                 parallel=int(cfg.host("resync_parallel", 2)),
                                 latency_us=float(cfg.host("resync_latency_us", 2000)))
        self.auto_resync = bool(cfg.host("resync", True))
        self._chains: dict[str, Chain] = {}
        self.sessions: set[NBDSession] = set()
        self._servers: list[asyncio.AbstractServer] = []
        self.addresses: list[str] = []  # NBD URIs we listen on (status, restore --in-place)
        self.tls_modes: dict[str, str] = {}  # address -> TLS mode (off, on, require)
        self.tls_psk = False  # TLS authenticates by pre-shared key ([host] tls_psk), not certificates
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

    def mark(self, name: str, ranges: Any) -> dict[str, Any]:
        """Mark ``ranges`` ([[offset, length], ...]) of vdisk ``name`` dirty
        so the automatic resync copies them (``nicsplit verify --repair``)."""
        if not isinstance(ranges, list) or not ranges or not all(
                isinstance(r, list) and len(r) == 2 and all(type(x) is int for x in r) for r in ranges):
            raise HostCommandError("mark needs \"ranges\": [[offset, length], ...] (integers)")
        self.datastore.reload_catalog()
        if name not in {v.name for v in self.datastore.list_vdisks()}:
            raise HostCommandError(f"no vdisk {name!r} on this host")
        try:
            sp = self.chain(name).filter("split")
        except ChainError as e:
            raise HostCommandError(str(e)) from None
        if sp is None:
            raise HostCommandError(f"vdisk {name} has no splitter in its chain: it is not protected")
        if self.readonly or sp.cg in self.fenced:
            raise HostCommandError(f"vdisk {name} is read-only here (failed over, or a read-only host): "
                                   "no resync runs")
        try:
            sp.mark_for_resync([(int(o), int(n)) for o, n in ranges], "verify --repair: blocks differ from the journal")
        except ChainError as e:
            raise HostCommandError(str(e)) from None
        return {"vdisk": name, "state": sp.state, "dirty_bytes": sp.dmap.dirty_bytes()}

    def join(self, name: str, cg: str) -> dict[str, Any]:
        """Vdisk ``name`` joined ``cg`` in the catalog (``nicsplit cg add``):
        protect it from now on, and copy what it holds (initial sync)."""
        self.datastore.reload_catalog()
        info = next((v for v in self.datastore.list_vdisks() if v.name == name), None)
        if info is None:
            raise HostCommandError(f"no vdisk {name!r} on this host")
        if info.extra.get("cg") != cg:
            raise HostCommandError(f"the catalog does not put vdisk {name} in consistency group {cg}")
        try:
            sp = self.chain(name).filter("split")
        except ChainError as e:
            raise HostCommandError(str(e)) from None
        if sp is None:
            raise HostCommandError(f"vdisk {name} has no splitter in its chain: it cannot join a CG "
                                   "(add \"split\" to its filters)")
        if self.readonly or cg in self.fenced:
            raise HostCommandError(f"consistency group {cg} is read-only here (failed over, or a read-only host)")
        try:
            self.check_transports(self.datastore.list_vdisks())
        except ChainError as e:
            raise HostCommandError(str(e)) from None
        try:
            sp.join(cg, lambda: allocated_ranges(self.datastore.vdisk(name)))
        except (ChainError, CGError) as e:
            raise HostCommandError(str(e)) from None
        return {"vdisk": name, "cg": cg, "state": sp.state, "dirty_bytes": sp.dmap.dirty_bytes()}

    def recover_activity_log(self) -> dict[str, Any]:
        """At start, before any IO: after an unclean stop (the activity log
        has no CLEAN record), mark every extent it names in its vdisk's dirty
        bitmap (durable, the vdisk goes to marking: the CG is in its gap) so
        the automatic resync copies them; then start a fresh log. Chains
        must be built (`check_chains`)."""
        al = self.context.activity_log
        if al is None:
            return {}
        rec = al.recovered
        out: dict[str, Any] = {"clean": rec.clean, "extents": len(rec.keys), "marked_bytes": 0, "vdisks": {}}
        if not rec.clean:
            by_id = {v.id: v for v in self.datastore.list_vdisks()}
            per: dict[str, list[tuple[int, int]]] = {}
            if rec.unknown:  # nothing readable: every allocated range of every protected vdisk
                log.error("activity log %s is unreadable (%d bytes): resyncing every protected vdisk in full",
                          al.path, rec.tail)
                for v in by_id.values():
                    per[v.name] = allocated_ranges(self.datastore.vdisk(v.name))
            for vid, off, n in rec.ranges():
                v = by_id.get(vid)
                if v is None or off >= v.size:
                    continue  # a vdisk deleted since (ids are never reused)
                per.setdefault(v.name, []).append((off, min(n, v.size - off)))
            for name, ranges in per.items():
                sp = self.chain(name).filter("split")
                if sp is None or sp.seq is None or not ranges:
                    continue  # not protected: nothing of it is journaled
                why = (f"host stopped uncleanly: {len(ranges)} extent(s) of the activity log "
                       f"({sum(n for _, n in ranges) / 2**20:.1f} MiB) resync")
                sp.mark_for_resync(ranges, why)  # durable before the log is reset below
                out["vdisks"][name] = sum(n for _, n in ranges)
                out["marked_bytes"] += out["vdisks"][name]
            log.warning("activity log %s: unclean stop: %d extent(s), %.1f MiB marked for resync in %d vdisk(s)",
                        al.path, len(rec.keys), out["marked_bytes"] / 2**20, len(out["vdisks"]))
        al.begin()
        self.al_recovered = out
        return out

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
                extra={**info.extra, "transport": self.transport_of(info.name)},
                context=self.context,
            )
            plugin = DatastorePlugin(self.datastore.vdisk(name), self.group_sync)
            try:
                ch = build_chain(view, self.cfg.vdisk_filters(name), plugin, validate=self.validate)
            except DirtyMapError as e:  # its bitmap names the file; the vdisk's name says which one
                raise ChainError(f"vdisk {name} ({info.size} bytes): {e}") from None
            sp = ch.filter("split")
            # Initial sync when the vdisk joined its CG holding data (not in
            # read-only mode, nor for a CG failed over to the appliance).
            if sp is not None and not self.readonly and view.extra.get("cg") not in self.fenced:
                sp.establish(lambda: allocated_ranges(self.datastore.vdisk(name)))
            self._chains[name] = ch
        return ch

    def transport_of(self, name: str) -> str:
        """Vdisk ``name``'s transport (docs/operations.md "Choosing a
        transport"); ChainError (one line) for an unknown one."""
        try:
            return self.cfg.vdisk_transport(name, self.transport, TRANSPORTS)
        except ConfigError as e:
            raise ChainError(f"vdisk {name}: {e}") from None

    def check_transports(self, vdisks: list[Any]) -> None:
        """Every vdisk of a CG uses one transport: two shippers of one CG
        (the card and the host) would interleave its sequence at the
        appliance, which keeps only increasing seqs per CG."""
        per: dict[str, dict[str, list[str]]] = {}
        for v in vdisks:
            cg = v.extra.get("cg")
            if cg:
                per.setdefault(cg, {}).setdefault(self.transport_of(v.name), []).append(v.name)
        for cg, by in per.items():
            if len(by) > 1:
                raise ChainError(f"consistency group {cg} mixes transports ("
                                 + "; ".join(f"{t}: {', '.join(sorted(n))}" for t, n in sorted(by.items()))
                                 + "): all vdisks of a CG must use the same one")

    def check_chains(self) -> None:
        """Build every vdisk's chain now so a bad configuration fails at start."""
        vdisks = self.datastore.list_vdisks()
        self.check_transports(vdisks)
        for v in vdisks:
            self.chain(v.name)

    def statistics(self) -> dict[str, Any]:
        out: dict[str, Any] = {"vdisks": {}, "sessions": len(self.sessions), "exports": self.exports.statistics(),
                               "refused": self.refusals.total, "nbd_bytes": self.budget.statistics(),
                               "throttles": sum(x.throttles for x in self.sessions)}
        for name, ch in self._chains.items():
            out["vdisks"][name] = ctl.jsonable(ch.statistics())
        out["group_sync"] = {"requests": self.group_sync.requests, "syncs": self.group_sync.syncs}
        for kind, link in self.context.links.items():
            t = link.get() if link.attached else None
            if t is not None:  # the transport's counters (ring: reservations, copies, full, ...; net: batches, acks)
                out["card_transport" if link is self.context.card else f"{kind}_transport"] = ctl.jsonable(t.statistics())
        al = self.context.activity_log
        if al is not None:
            out["activity_log"] = {**al.statistics(), "recovered": self.al_recovered}
        return out

    def status(self) -> dict[str, Any]:
        """Protection state per vdisk (from its splitter) for `nicsplit status`."""
        self.datastore.reload_catalog()
        vdisks = []
        hists: dict[str, list[Histogram]] = {}  # CG -> its vdisks' split histograms
        for v in self.datastore.list_vdisks():
            try:
                ch = self.chain(v.name)
            except Exception as e:  # a vdisk whose chain cannot build is reported, not hidden
                vdisks.append({"name": v.name, "cg": v.extra.get("cg"), "state": "error", "reason": str(e)})
                continue
            sp = ch.filter("split")
            st = sp.statistics() if sp is not None else {"state": "unprotected"}
            if sp is not None and sp.cg:
                hists.setdefault(sp.cg, []).append(sp.hist)
            vdisks.append({"name": v.name, "cg": v.extra.get("cg"), **st})
        link = self.context.card
        return {
            "pid": os.getpid(),
            "addresses": self.addresses,
            "tls": self.tls_modes,
            "tls_psk": self.tls_psk,
            "fenced": sorted(self.fenced),
            "vdisks": vdisks,
            # The last CG sequence number handed out: the journal has caught
            # up with production once its latest PIT reaches it.
            # gap: vdisks of the CG marking or resyncing (its records carry WFlag.GAP).
            # split_p50_us / split_p99_us: the CG's vdisks' split histograms together (None before a write).
            "cgs": {name: {"last_seq": seq, "gap": sorted(self.context.gap(name).vdisks), **_split_pcts(hists.get(name, []))}
                    for name, seq in self.context.cg_last_seqs().items()},
            # after an unclean stop: the activity log's extents marked at start
            "activity_log": self.al_recovered,
            "card": {"attached": link.attached, "losses": link.losses, "last_error": link.last_error, "tracked": link.tracked,
                     # late writes still in flight without a verdict, and late ones the card refused
                     "unconfirmed": link.unconfirmed, "late_refused": link.late_refused,
                     # waits for an ack that went async, and the time spun for acks not there at once
                     "async_waits": link.async_waits, "spin_us": link.spin_ns_total // 1000},
            # every transport in use: vdisks on it, and its link (net: the appliance link)
            "transports": {kind: {"vdisks": sorted(v["name"] for v in vdisks if v.get("transport") == kind),
                                  "attached": lk.attached, "losses": lk.losses, "last_error": lk.last_error}
                           for kind, lk in self.context.links.items()},
        }

    def tls_for(self, host: str | None, setting: str | None = None, psk: str | None = None) -> NbdTls:
        """The TLS of a listener on ``host`` (None = Unix socket): ``setting``
        (--tls) or ``[host] tls``, with the key file ``psk`` (--tls-psk) or
        ``[host] tls_psk`` if any; see `nicsplit.host.nbdpolicy.resolve_tls`.
        Relative paths are under the data directory."""
        pki_dir = Path(str(self.cfg.host("pki", "") or self.cfg.layout.pki))
        if not pki_dir.is_absolute():
            pki_dir = self.cfg.data / pki_dir
        psk = psk or str(self.cfg.host("tls_psk", "") or "") or None
        return resolve_tls(str(setting or self.cfg.host("tls", "auto")), host, pki_dir,
                           names=tuple(self.cfg.host("tls_names", [])), clients=tuple(self.cfg.host("tls_clients", [])),
                           psk=None if psk is None else self.cfg.data / psk)

    async def start(self, listen: tuple[str, int] | None, socket_path: str | None, tls: str | None = None,
                    tls_psk: str | None = None) -> list[str]:
        loop = asyncio.get_running_loop()
        addrs = []
        # Resolve TLS for every listener before any listens: a bad setting fails the start.
        tcp_tls = self.tls_for(listen[0], tls, tls_psk) if listen is not None else None
        unix_tls = self.tls_for(None, tls, tls_psk) if socket_path else None
        self.tls_psk = any(t is not None and t.psk and t.mode != "off" for t in (tcp_tls, unix_tls))
        self.tls_modes = {}
        if listen is not None:
            srv = await loop.create_server(lambda: NBDSession(self, tcp_tls), listen[0], listen[1], reuse_address=True)
            self._servers.append(srv)
            host, port = srv.sockets[0].getsockname()[:2]
            addrs.append(f"nbd://{host}:{port}")
            self.tls_modes[addrs[-1]] = tcp_tls.mode
        if socket_path:
            Path(socket_path).unlink(missing_ok=True)
            srv = await loop.create_unix_server(lambda: NBDSession(self, unix_tls), socket_path)
            self._servers.append(srv)
            addrs.append(f"nbd+unix:///?socket={socket_path}")
            self.tls_modes[addrs[-1]] = unix_tls.mode
        for a, mode in self.tls_modes.items():
            log.info("NBD on %s: TLS %s%s", a, mode, " (pre-shared keys)" if self.tls_psk and mode != "off" else "")
        self.addresses = addrs
        return addrs

    async def housekeeping(self, interval: float = 0.2) -> None:
        """Notice a dead card and the card's lost-writes log even when no
        writes arrive (the splitter notices on its own while writes flow);
        start the resync of marking vdisks once the card is back."""
        while True:
            await asyncio.sleep(interval)
            self.context.card.read_lost()  # a stat and a short read: cheap at this cadence
            for link in list(self.context.links.values()):
                t = link.get()
                if t is None:
                    continue
                if not t.healthy():
                    link.lost(f"{link.kind} transport stopped responding (heartbeat stale or connection closed)")
                    continue
                link.trim()
            if self.auto_resync:
                self.resyncer.poll(self._chains.values())

    async def stop(self) -> None:
        await self.resyncer.stop()
        await close_exports(self._servers, self.sessions, self._chains.values())
        await asyncio.get_running_loop().run_in_executor(None, self.datastore.sync)
        if self.context.activity_log is not None:
            # Every write is done and synced: the next start resyncs nothing.
            await self.context.activity_log.close(clean=True)
        self.context.close()


def control_handler(host: HostServer) -> Callable[[dict], Awaitable[dict]]:
    """The host's control socket (`nicsplit.core.ctl`): ``{"cmd": "stats"}``,
    ``status``, ``ping``; also ``fence`` (failover), ``barrier``
    (bookmarks) and ``mark`` (verify --repair), see HostServer."""

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
        if cmd == "join":
            return {"ok": True, **host.join(str(req.get("vdisk")), str(req.get("cg")))}
        if cmd == "mark":
            return {"ok": True, **host.mark(str(req.get("vdisk")), req.get("ranges"))}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    return handle


async def serve(
    cfg: Config,
    *,
    listen: tuple[str, int] | None,
    socket_path: str | None,
    readonly: bool | None = None,
    ready: Callable[[dict], None] | None = None,
    tls: str | None = None,
    stdio: bool = False,
    tls_psk: str | None = None,
    transport: str | None = None,
    appliance: str | None = None,
) -> None:
    """Run the host until SIGTERM/SIGINT; then finish in-flight IO and sync."""
    ds = Datastore.open(cfg.datastore_dir)
    ds.open_io()
    try:
        host = HostServer(cfg, ds, readonly=readonly, transport=transport, appliance=appliance)
        host.check_chains()
        host.recover_activity_log()
        # What the card could not make durable while no host ran (e.g. it
        # stopped after this host, with the appliance down) marks now.
        host.context.card.read_lost()
        addrs = await host.start(listen, socket_path, tls, tls_psk) if not stdio else ["stdio"]
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
            ready({"event": "ready", "pid": os.getpid(), "addresses": addrs, "tls": host.tls_modes, "tls_psk": host.tls_psk})
        if stdio:   # one session on fds 0/1: the host ends with it (or with a signal)
            session = loop.create_task(serve_stdio(host))
            stopped = loop.create_task(stop.wait())
            await asyncio.wait({session, stopped}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if session.done():
                session.result()
        else:
            await stop.wait()
        log.info("stopping: finishing in-flight IO")
        keeper.cancel()
        control.close()
        await host.stop()
        pid_file.unlink(missing_ok=True)
    finally:
        ds.close()
