"""``nicsplit doctor``: is this machine and data directory fit to run nicsplit?

Each check is a small function of the configuration returning one or more
results ``{"check", "ok", "level", "message", "fix"}``: ``level`` is ``ok``,
``warn`` (works, but look at it) or ``fail`` (something will not work);
``fix`` says what to do, naming the file or setting, when the check is not
ok. A check never raises: a check that cannot run is itself a failure.
Checks are cheap and disturb no running process (a journal is checked by
the read-only scan ``pits`` does: entry heads and CRCs, nothing decoded):

* ``transport``: the transport each vdisk uses (as ``nicsplit up`` would
  choose it, without ``--transport``) and whether a card runs; a choice
  ``up`` would refuse (an unknown name, two card transports) fails here;
* ``cpu``: cores, the card's CPU pinning (``[card] cpus``) and whether its
  ``priority = "realtime"`` is permitted (else the card falls back to nice);
  the card's settings only when a card runs;
* ``shm``: free space for the card's hidden volume (ring + data area), only
  when a card runs;
* ``pki``: the deployment's certificates and their expiry (warn < 30 days);
* ``ports``: the host, appliance and console listen addresses are free, or
  held by our own running process (pid files in ``DATA/run``);
* ``datastore``: the catalog reads and every volume file is there;
* ``journal``: each CG's journal scans without damage;
* ``pidfiles``: no pid file of a process that is gone;
* ``token``: the API token exists with mode 0600;
* ``tools``: the Debian tools recovery uses (optional: warn only).

Example::

    results = run_checks(cfg)
    failed = [r for r in results if r["level"] == "fail"]
"""

from __future__ import annotations

import datetime as dt
import errno
import os
import shutil
import socket
import stat
from pathlib import Path
from typing import Any, Callable, Iterable

from nicsplit.card.hidden import DEFAULT_DATA_SIZE, DEFAULT_ENTRIES, NAME_PREFIX
from nicsplit.core.catalog import open_catalog
from nicsplit.core.cgs import CGCatalog
from nicsplit.card.transports.base import TRANSPORTS
from nicsplit.core.config import Config, ConfigError, parse_listen, parse_size
from nicsplit.core.layout import Layout
from nicsplit.core.procutil import listening_sockets, runs
from nicsplit.journal.format import seg_name
from nicsplit.journal.scan import JournalScanner
from nicsplit.wire.ring import Geometry

__all__ = ["Result", "CHECKS", "run_checks", "result", "EXPIRY_WARN_DAYS", "PROCESSES"]

Result = dict[str, Any]
EXPIRY_WARN_DAYS = 30
# The processes `nicsplit up` runs, by pid file name, and what else it writes there.
PROCESSES = ("up", "host", "card", "appliance", "console")
# (pid file, config section, default listen) of each process that listens.
_LISTENERS = (("host", "host", "127.0.0.1:10809"), ("appliance", "appliance", "127.0.0.1:10810"),
              ("console", "console", "127.0.0.1:10811"))
# The tools recovery calls (restore --format qcow2, --in-place) and the
# real peers of the docs' walk-through; none is needed to protect.
TOOLS = {"qemu-img": "qemu-utils", "nbdcopy": "libnbd-bin", "nbdinfo": "libnbd-bin", "qemu-io": "qemu-utils"}


def result(check: str, level: str, message: str, fix: str = "") -> Result:
    return {"check": check, "ok": level != "fail", "level": level, "message": message, "fix": fix}


# -- transport ---------------------------------------------------------------------------


def _by_transport(cfg: Config) -> tuple[dict[str, list[str]], str | None]:
    """({transport: vdisk names}, the card's transport or None), chosen as
    ``nicsplit up`` chooses them (docs/operations.md "Choosing a
    transport"); ConfigError for a choice it would refuse. No vdisk at all
    still runs a card (as ``up`` does), of the default transport."""
    names = [v.name for v in open_catalog(cfg.datastore_dir).vdisks()] if cfg.layout.catalog.exists() else []
    by: dict[str, list[str]] = {}
    for n in names:
        by.setdefault(cfg.vdisk_transport(n, None, TRANSPORTS), []).append(n)
    card = cfg.card_transport(names, None, TRANSPORTS)
    if card is None and not names:
        card = cfg.default_card_transport(TRANSPORTS)
    return by, card


def _no_card(cfg: Config) -> str | None:
    """Why no card runs in this deployment, or None when one does (or the
    choice is broken: `check_transport` reports that, the card checks run)."""
    try:
        by, card = _by_transport(cfg)
    except Exception:  # ConfigError, an unreadable catalog: reported by their own checks
        return None
    return None if card is not None else f"no card runs: every vdisk uses {', '.join(sorted(by))}"


def check_transport(cfg: Config) -> list[Result]:
    try:
        by, card = _by_transport(cfg)
    except ConfigError as e:
        return [result("transport", "fail", f"nicsplit up would refuse to start: {e}",
                       f"fix [splitter] transport or the [vdisks.NAME] transport tables in {cfg.layout.config}")]
    parts = [f"{t}: {', '.join(sorted(n))}" for t, n in sorted(by.items())] or ["no vdisk yet"]
    runs_card = f"the card runs {card}" if card is not None else "no card runs (the host ships itself)"
    return [result("transport", "ok", f"{'; '.join(parts)}; {runs_card}")]


# -- cpu ---------------------------------------------------------------------------------


def _rt_permitted() -> tuple[bool, str]:
    """Can a process of ours switch to SCHED_FIFO? Tried in a forked child
    (the only sure test: capabilities, RLIMIT_RTPRIO and cgroups all decide)."""
    if not hasattr(os, "SCHED_FIFO"):
        return False, "this platform has no SCHED_FIFO"
    pid = os.fork()
    if pid == 0:  # the child: try, report by exit status, never return
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) == 0:
        return True, "permitted"
    return False, "not permitted (needs CAP_SYS_NICE or an RLIMIT_RTPRIO >= 1)"


def check_cpu(cfg: Config, rt_permitted: Callable[[], tuple[bool, str]] = _rt_permitted) -> list[Result]:
    card = cfg.raw.get("card", {}) if isinstance(cfg.raw.get("card", {}), dict) else {}
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    out = []
    cpus = card.get("cpus")
    if len(allowed) < 2:
        out.append(result("cpu", "warn", f"{len(allowed)} CPU available: the card's acker shares it with the host",
                          "give the machine (or this cgroup) at least 2 CPUs"))
    else:
        out.append(result("cpu", "ok", f"{len(allowed)} CPUs available ({', '.join(map(str, allowed))})"))
    why = _no_card(cfg)
    if why is not None:  # the card's pinning and priority would not apply
        return out + [result("cpu.pinning", "ok", f"{why}: no card to pin")]
    if cpus is None:
        out.append(result("cpu.pinning", "ok", f"the card's acker pins to the last core ({allowed[-1]})"))
    elif not isinstance(cpus, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in cpus):
        out.append(result("cpu.pinning", "fail", f"[card] cpus = {cpus!r} is not a list of CPU numbers",
                          f"set [card] cpus = [{allowed[-1]}] (or []) in {cfg.layout.config}"))
    else:
        bad = [c for c in cpus if c not in allowed]
        if bad:
            out.append(result("cpu.pinning", "fail", f"[card] cpus names CPU(s) {bad} this process may not use "
                              f"(allowed: {allowed})", f"set [card] cpus in {cfg.layout.config} to CPUs of {allowed}"))
        else:
            out.append(result("cpu.pinning", "ok", f"the card's acker pins to {cpus or 'no CPU in particular'}"))
    prio = card.get("priority", "realtime")
    if prio == "realtime":
        ok, why = rt_permitted()
        if ok:
            out.append(result("cpu.priority", "ok", "realtime scheduling (SCHED_FIFO) for the card's acker: permitted"))
        else:
            out.append(result("cpu.priority", "warn", f"[card] priority = \"realtime\": {why}; the card falls back to "
                              "nice -10 and a late wake-up may cost a split timeout",
                              "run the card with CAP_SYS_NICE (or ulimit -r 1), or set [card] priority = \"high\" in "
                              f"{cfg.layout.config}"))
    elif prio not in ("high", "normal"):
        out.append(result("cpu.priority", "fail", f"[card] priority = {prio!r}: use realtime, high or normal",
                          f"fix [card] priority in {cfg.layout.config}"))
    else:
        out.append(result("cpu.priority", "ok", f"[card] priority = {prio!r}"))
    return out


# -- /dev/shm ----------------------------------------------------------------------------


def check_shm(cfg: Config) -> list[Result]:
    why = _no_card(cfg)
    if why is not None:
        return [result("shm", "ok", f"{why}: no hidden volume needed")]
    card = cfg.raw.get("card", {}) if isinstance(cfg.raw.get("card", {}), dict) else {}
    opts = card.get("transport_options", {}) or {}
    shm = Path(opts.get("shm_dir", "/dev/shm"))
    try:
        data = parse_size(opts.get("data_size", DEFAULT_DATA_SIZE), "transport_options.data_size")
        need = Geometry(int(opts.get("sq_entries", DEFAULT_ENTRIES)), int(opts.get("cq_entries", DEFAULT_ENTRIES)),
                        data).total_size
    except Exception as e:  # a bad geometry is what the card would refuse too
        return [result("shm", "fail", f"the card's ring settings are wrong: {e}",
                       f"fix [card] transport_options in {cfg.layout.config}")]
    try:
        st = os.statvfs(shm)
    except OSError as e:
        return [result("shm", "fail", f"{shm}: {e.strerror}", f"mount a tmpfs at {shm} (or set transport_options.shm_dir)")]
    free = st.f_bavail * st.f_frsize
    card_pid = _live_pid(cfg.layout, "card")
    mine = [p for p in shm.glob(NAME_PREFIX + "*")] if card_pid else []
    if card_pid and mine:
        return [result("shm", "ok", f"the running card (pid {card_pid}) holds its hidden volume in {shm}; "
                       f"{free >> 20} MiB free")]
    msg = f"{shm}: {free >> 20} MiB free, the card's hidden volume needs {need >> 20} MiB"
    if free < need:
        return [result("shm", "fail", msg, f"free space in {shm} (or grow it: mount -o remount,size=... {shm}), or "
                       f"lower [card] transport_options.data_size in {cfg.layout.config}")]
    if free < 2 * need:
        return [result("shm", "warn", msg + " (less than twice that)", f"free space in {shm}")]
    return [result("shm", "ok", msg)]


# -- certificates ------------------------------------------------------------------------


def check_pki(cfg: Config, now: dt.datetime | None = None) -> list[Result]:
    from cryptography import x509  # only doctor and pki read certificates: keep it off every other command

    pki = cfg.layout.pki
    crts = sorted(pki.glob("*.crt")) if pki.is_dir() else []
    if not crts:
        return [result("pki", "fail", f"no certificates in {pki}", "run 'nicsplit init' (or 'nicsplit pki init')")]
    now = now or dt.datetime.now(dt.timezone.utc)
    out = []
    for crt in crts:
        try:
            cert = x509.load_pem_x509_certificate(crt.read_bytes())
        except (OSError, ValueError) as e:
            out.append(result("pki", "fail", f"{crt}: unreadable certificate ({e})",
                              f"delete {crt} and its key, then run 'nicsplit pki init' to issue it again"))
            continue
        end = cert.not_valid_after_utc
        days = (end - now).total_seconds() / 86400
        if days < 0:
            out.append(result("pki", "fail", f"{crt.name} expired on {end:%Y-%m-%d}",
                              f"delete {crt} and its key, then run 'nicsplit pki init' to issue it again"))
        elif days < EXPIRY_WARN_DAYS:
            out.append(result("pki", "warn", f"{crt.name} expires in {days:.0f} days ({end:%Y-%m-%d})",
                              f"renew it: delete {crt} and its key, then run 'nicsplit pki init'"))
        else:
            out.append(result("pki", "ok", f"{crt.name} valid until {end:%Y-%m-%d}"))
    return out


# -- ports -------------------------------------------------------------------------------


def _live_pid(lay: Layout, name: str) -> int | None:
    try:
        raw = lay.pid(name).read_text().strip()
    except OSError:
        return None
    pid = int(raw) if raw.isdigit() else 0
    return pid if pid and runs(pid, "nicsplit") else None


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on TCP ``port`` (any address)."""
    return {ino for p, ino in listening_sockets() if p == port}


def _holds(pid: int, inodes: set[str]) -> bool:
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1] in inodes:
                return True
    except OSError:
        return False
    return False


def check_ports(cfg: Config) -> list[Result]:
    out = []
    for name, section, default in _LISTENERS:
        table = cfg.raw.get(section, {})
        listen = (table.get("listen") if isinstance(table, dict) else None) or default
        try:
            host, port = parse_listen(listen)
        except Exception as e:  # ConfigError: the process would refuse to start
            out.append(result("ports", "fail", f"[{section}] listen = {listen!r}: {e}",
                              f"fix [{section}] listen in {cfg.layout.config}"))
            continue
        if port == 0:
            out.append(result("ports", "ok", f"{name}: [{section}] listen {listen} (a free port at start)"))
            continue
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            with socket.socket(fam, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((host, port))
            out.append(result("ports", "ok", f"{name}: {listen} is free"))
            continue
        except OSError as e:
            err = e
        pid = _live_pid(cfg.layout, name)
        if err.errno == errno.EADDRINUSE and pid and _holds(pid, _listening_inodes(port)):
            out.append(result("ports", "ok", f"{name}: {listen} is held by our running {name} (pid {pid})"))
        elif err.errno == errno.EADDRINUSE:
            out.append(result("ports", "fail", f"{name}: {listen} is in use by another program",
                              f"stop it (ss -ltnp 'sport = :{port}' shows it) or change [{section}] listen in "
                              f"{cfg.layout.config}"))
        else:
            out.append(result("ports", "fail", f"{name}: cannot listen on {listen}: {err.strerror}",
                              f"change [{section}] listen in {cfg.layout.config}"))
    return out


# -- datastore and journals --------------------------------------------------------------


def check_datastore(cfg: Config) -> list[Result]:
    lay = cfg.layout
    if not lay.catalog.exists():
        return [result("datastore", "fail", f"no datastore catalog ({lay.catalog})", "run 'nicsplit init'")]
    try:
        vdisks = open_catalog(cfg.datastore_dir).vdisks()
    except Exception as e:  # any reason the host could not start either
        return [result("datastore", "fail", f"{lay.catalog}: {e}",
                       f"restore {lay.catalog} from a backup (the host cannot serve without it)")]
    nums = sorted(int(p.name[4:-4]) for p in cfg.datastore_dir.glob("vol-*.dsk") if p.name[4:-4].isdigit())
    missing = sorted(set(range(max(nums, default=-1) + 1)) - set(nums))
    vols = [f"vol-{n:04d}.dsk" for n in nums]
    if missing:
        names = ", ".join(str(cfg.datastore_dir / f"vol-{n:04d}.dsk") for n in missing)
        return [result("datastore", "fail", f"volume files missing: {names}",
                       f"restore {names} from a backup: the vdisks' data lives there (the host refuses to start)")]
    if vdisks and not vols:
        return [result("datastore", "fail", f"{cfg.datastore_dir}: {len(vdisks)} vdisk(s) but no volume file",
                       f"restore {cfg.datastore_dir}/vol-0000.dsk")]
    return [result("datastore", "ok", f"catalog readable: {len(vdisks)} vdisk(s) in {len(vols)} volume file(s)")]


def check_journals(cfg: Config) -> list[Result]:
    try:
        cgs = [c.name for c in CGCatalog(cfg.data).list()]
    except Exception as e:  # CGError: cgs.json unreadable
        return [result("journal", "fail", f"{cfg.layout.cgs}: {e}", f"restore {cfg.layout.cgs} from a backup")]
    out = []
    for cg in cgs:
        jd = cfg.layout.journal(cg)
        if not jd.is_dir():
            out.append(result("journal", "ok", f"{cg}: no journal yet"))
            continue
        sc = JournalScanner(jd)
        try:
            batches = sum(1 for _ in sc.scan())
        except Exception as e:  # a scanner that cannot go on: say where
            out.append(result("journal", "fail", f"{cg}: {jd}: {e}", f"see docs/journal.md (damage) for {jd}"))
            continue
        if sc.damage:
            d = sc.damage[0]
            out.append(result("journal", "fail", f"{cg}: {len(sc.damage)} damaged stretch(es): {d.describe()}",
                              f"{jd / seg_name(d.segment)} is damaged: points in time needing seqs "
                              f"{d.first_seq}..{d.last_seq} are unusable; restore the file from a backup, or let "
                              "retention fold it away, and pick later points in time (docs/journal.md)"))
        elif sc.stalled:
            out.append(result("journal", "fail", f"{cg}: {sc.stalled}", f"see docs/journal.md about {jd}"))
        else:
            out.append(result("journal", "ok", f"{cg}: {batches} batch(es), up to seq {sc.last_seq}"))
    return out


# -- pid files, token, tools ---------------------------------------------------------------


def check_pidfiles(cfg: Config) -> list[Result]:
    run = cfg.layout.run
    stale = []
    for f in sorted(run.glob("*.pid")) if run.is_dir() else []:
        try:
            raw = f.read_text().strip()
        except OSError:
            continue
        if not (raw.isdigit() and runs(int(raw), "nicsplit")):
            stale.append(f)
    if stale:
        return [result("pidfiles", "warn", f"stale pid file(s) of processes that are gone: "
                       f"{', '.join(str(f) for f in stale)}", f"remove them: rm {' '.join(str(f) for f in stale)} "
                       "('nicsplit up' also does at its start)")]
    return [result("pidfiles", "ok", "no stale pid file")]


def check_token(cfg: Config) -> list[Result]:
    tok = cfg.layout.api_token
    try:
        st = os.lstat(tok)
    except FileNotFoundError:
        return [result("token", "fail", f"no API token ({tok})", "run 'nicsplit init' (it creates it)")]
    if not stat.S_ISREG(st.st_mode):
        return [result("token", "fail", f"{tok} is not a regular file", f"remove {tok} and run 'nicsplit init'")]
    mode = stat.S_IMODE(st.st_mode)
    if mode != 0o600:
        return [result("token", "fail", f"{tok} has mode {mode:04o}: whoever reads it drives every recovery "
                       "operation", f"chmod 600 {tok}")]
    if len(tok.read_text().strip()) < 32:
        return [result("token", "fail", f"{tok}: the token is too short", f"delete {tok} and run 'nicsplit init'")]
    return [result("token", "ok", f"{tok} present, mode 0600")]


def check_tools(cfg: Config, which: Callable[[str], str | None] = shutil.which) -> list[Result]:
    missing = [t for t in TOOLS if which(t) is None]
    if missing:
        pkgs = sorted({TOOLS[t] for t in missing})
        return [result("tools", "warn", f"not installed: {', '.join(missing)} (restore --format qcow2 and "
                       "--in-place, and the walk-through, use them)", f"apt-get install {' '.join(pkgs)}")]
    return [result("tools", "ok", f"{', '.join(TOOLS)} installed")]


CHECKS: tuple[Callable[[Config], list[Result]], ...] = (
    check_transport, check_cpu, check_shm, check_pki, check_ports, check_datastore, check_journals, check_pidfiles, check_token,
    check_tools,
)


def run_checks(cfg: Config, checks: Iterable[Callable[[Config], list[Result]]] = CHECKS) -> list[Result]:
    """Every check's results, in order; a check that raises is a failure."""
    out: list[Result] = []
    for check in checks:
        name = check.__name__.removeprefix("check_")
        try:
            out.extend(check(cfg))
        except Exception as e:  # a broken check must not hide the others
            out.append(result(name, "fail", f"the check itself failed: {type(e).__name__}: {e}",
                              "report this as a bug, with the output of 'nicsplit doctor --json'"))
    return out
