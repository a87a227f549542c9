"""Point-in-time commands for the ``nicsplit`` CLI (wired in by control/cli.py).

    nicsplit pits CG [--json]
    nicsplit bookmark CG NAME [--lock] [--seq N] [--json]
    nicsplit restore VDISK (--at TIME | --seq N | --bookmark NAME | --latest) --to FILE
                     [--format raw|qcow2] [--json]

``add_parsers(sub, common)`` registers them.  Every user-facing failure (an
unknown CG, vdisk or bookmark, a PIT that does not exist, a time outside
retention) raises ``nicsplit.cli.main.CliError``: one line, exit 1.

The commands read the journal read-only (no lock; the appliance may be
appending): PITs come from `nicsplit.recovery.pits`, images from
`nicsplit.recovery.replica.PitReader`.  A restore writes ``FILE.partial``
and renames it to ``FILE`` once complete and fsynced, so an interrupted
restore never leaves a half image under the requested name.

TIME for ``--at``: seconds since the epoch (``1718000000.5``), ISO 8601
(``2024-06-10T08:00:00``, local time unless it has an offset), ``now``, or
relative to now (``-90s``, ``-15m``, ``-2h``, ``-1d``).

Example::

    nicsplit bookmark cg1 before-upgrade --lock
    nicsplit restore vm1-root --bookmark before-upgrade --to /tmp/root.raw
    nicsplit restore vm1-root --at -1h --to /tmp/root.qcow2 --format qcow2
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from nicsplit.core.fsutil import fsync_dir
from nicsplit.recovery.pits import Pit, PitIndex

# 4 MiB per read/write of a restore: large enough to amortise a system call,
# small enough that the progress line moves every few ms.
_CHUNK = 4 << 20
_RELATIVE = re.compile(r"^-(\d+(?:\.\d+)?)([smhd])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _cli_errors(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn PIT / journal / catalog errors into the CLI's one-line CliError."""

    @functools.wraps(fn)
    def wrapper(args: argparse.Namespace) -> int:
        from nicsplit.journal.writer import JournalError
        from nicsplit.recovery.pits import PitError
        from nicsplit.core.cgs import CGError
        from nicsplit.cli.main import CliError
        from nicsplit.host.datastore import DatastoreError

        try:
            return fn(args)
        except (PitError, JournalError, CGError, DatastoreError) as e:
            raise CliError(str(e)) from None

    return wrapper


def parse_time(value: str, now_ns: int | None = None) -> int:
    """``--at`` TIME → ns since the epoch (see the module docstring)."""
    from nicsplit.cli.main import CliError

    now_ns = time.time_ns() if now_ns is None else now_ns
    v = value.strip()
    if v == "now":
        return now_ns
    m = _RELATIVE.match(v)
    if m:
        return now_ns - int(float(m.group(1)) * _UNIT[m.group(2)] * 1e9)
    try:
        return int(float(v) * 1e9)
    except ValueError:
        pass
    try:
        dt = _dt.datetime.fromisoformat(v)
    except ValueError:
        raise CliError(f"bad time {value!r}: use seconds since the epoch, ISO 8601, 'now' or -N[smhd]") from None
    return int(dt.timestamp() * 1e9)  # naive = local time


def _fmt(t_ns: int) -> str:
    return _dt.datetime.fromtimestamp(t_ns / 1e9).isoformat(timespec="milliseconds")


def _journal_dir(data: Path, cg: str) -> Path:
    return Path(data) / "appliance" / "journal" / cg


def _check_cg(data: Path, cg: str) -> Path:
    """The CG's journal directory; CliError for a CG nobody knows."""
    from nicsplit.core.cgs import CGCatalog, CGError
    from nicsplit.cli.main import CliError

    jd = _journal_dir(data, cg)
    if jd.is_dir():
        return jd
    try:
        CGCatalog(data).get(cg)
    except CGError as e:
        raise CliError(str(e)) from None
    return jd  # known CG, nothing journaled yet


def _index(jd: Path, cg: str) -> PitIndex:
    from nicsplit.cli.main import CliError

    if not jd.is_dir():
        raise CliError(f"consistency group {cg} has no journal yet (no point in time)")
    return PitIndex(jd)


def resolve_pit(idx: PitIndex, data: Path, cg: str, *, at: str | None = None, seq: int | None = None,
                bookmark: str | None = None, latest: bool = False, now_ns: int | None = None) -> Pit:
    """The PIT a command's selector names; refuses a PIT that needs a damaged
    stretch of the journal, or one inside a merge window."""
    from nicsplit.recovery.bookmarks import get_bookmark
    from nicsplit.cli.main import CliError

    if at is not None:
        pit = idx.pit_at(parse_time(at, now_ns))
    elif seq is not None:
        pit = idx.pit_for_seq(seq)
    elif bookmark is not None:
        b = get_bookmark(data, cg, bookmark)
        pit = idx.pit_for_seq(b.seq)
    elif latest:
        pit = idx.latest()
    else:
        raise CliError("say which point in time: --at TIME, --seq N, --bookmark NAME or --latest")
    idx.check_usable(pit)  # a damaged journal: UnusablePit names the segment and the lost seqs
    if not pit.consistent:
        raise CliError(f"the point in time at seq {pit.seq} is inside a merge window (not crash-consistent); "
                       f"pick a consistent one from 'nicsplit pits {cg}'")
    return pit


# -- commands -------------------------------------------------------------------------


@_cli_errors
def cmd_pits(args: argparse.Namespace) -> int:
    from nicsplit.recovery.bookmarks import list_bookmarks
    from nicsplit.core import config as cfgmod
    from nicsplit.cli.main import CliError

    cfg = cfgmod.load(cfgmod.data_dir(args.data))
    jd = _check_cg(cfg.data, args.cg)
    idx = PitIndex(jd) if jd.is_dir() else None
    pits = idx.list_pits() if idx is not None else []
    damage = idx.damage if idx is not None else []
    marks: dict[int, list[str]] = {}
    for b in list_bookmarks(cfg.data, args.cg):
        marks.setdefault(b.seq, []).append(b.name)
    if not args.all:  # the retention policy's thinning: all recent PITs, then one per hour
        from nicsplit.recovery.retention import Policy, RetentionError, thin

        try:
            policy = Policy.from_config(cfg.raw.get("retention"))
        except RetentionError as e:
            raise CliError(str(e)) from None
        keep = thin([p.time_ns for p in pits], time.time_ns(), policy, [p.seq in marks for p in pits], expired=True)
        pits = [p for p, k in zip(pits, keep) if k]
    rows = [{"seq": p.seq, "time": p.time_ns / 1e9, "consistent": p.consistent, "usable": p.usable,
             "bookmarks": marks.get(p.seq, [])} for p in pits]
    for row in rows:
        if not row["usable"]:
            row["reason"] = f"needs seqs {damage[0].first_seq}..{damage[0].last_seq}, lost to damage: {damage[0].describe()}"
    if args.json:
        print(json.dumps({"pits": rows, "damage": [d.to_json() for d in damage]}))
        return 0
    if not rows:
        print(f"consistency group {args.cg} has no point in time yet")
    for p, row in zip(pits, rows):
        flag = "" if p.consistent else "  (inside a merge window)"
        if not p.usable:
            flag += "  UNUSABLE (journal damaged)"
        names = f"  [{', '.join(row['bookmarks'])}]" if row["bookmarks"] else ""
        print(f"{p.seq:>12}  {_fmt(p.time_ns)}{names}{flag}")
    for d in damage:
        print(f"damaged: {d.describe()}", file=sys.stderr)
    return 0


def _hook(what: str, command: str, cg: str, timeout: float) -> None:
    """Run a quiesce / thaw hook through the shell; CliError unless it exits 0."""
    from nicsplit.cli.main import CliError

    env = {**os.environ, "NICSPLIT_CG": cg, "NICSPLIT_HOOK": what}
    try:
        p = subprocess.run(command, shell=True, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise CliError(f"{what} hook did not finish within {timeout:g} s: {command}") from None
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()
        raise CliError(f"{what} hook failed (exit {p.returncode}): {command}" + (f": {tail[-1]}" if tail else ""))


def _barrier(data: Path, cg: str) -> int | None:
    """Ask the running host for a barrier in the CG's stream, acknowledged by
    the card; its seq, or None when no host runs."""
    from nicsplit.core import ctl
    from nicsplit.cli.main import CliError

    reply = ctl.request(Path(data) / "run" / "host.sock", {"cmd": "barrier", "cg": cg}, timeout=10.0)
    if reply is None:
        return None
    if not reply.get("ok"):
        raise CliError(f"cannot bookmark {cg}: {reply.get('error')}")
    return int(reply["seq"])


def _wait_for_pit(idx: PitIndex, seq: int, timeout: float) -> Pit:
    """The first consistent PIT at or after ``seq``, once journaled."""
    from nicsplit.cli.main import CliError

    deadline = time.monotonic() + timeout
    pause = 0.002
    while True:
        idx.refresh()
        pit = idx.first_at_or_after(seq)
        if pit is not None:
            return pit
        if time.monotonic() >= deadline:
            raise CliError(f"seq {seq} was not journaled within {timeout:g} s (is the card shipping? "
                           f"see 'nicsplit status')")
        time.sleep(pause)  # polling the journal files: the appliance has no push channel to us
        pause = min(pause * 2, 0.05)


@_cli_errors
def cmd_bookmark(args: argparse.Namespace) -> int:
    """Bookmark the first PIT after a barrier the card acknowledged: it covers
    every write acknowledged to a client before the command started; with
    ``--quiesce``/``--thaw`` the application flushed and paused around it."""
    from nicsplit.recovery.bookmarks import add_bookmark, lock_bookmark
    from nicsplit.core import config as cfgmod
    from nicsplit.cli.main import CliError

    cfg = cfgmod.load(cfgmod.data_dir(args.data))
    jd = _check_cg(cfg.data, args.cg)
    if args.unlock or (args.lock and args.existing):
        b = lock_bookmark(cfg.data, args.cg, args.name, not args.unlock)
        pit = None
    else:
        if args.seq is not None:
            pit = _index(jd, args.cg).pit_for_seq(args.seq)
        else:
            if args.quiesce:
                _hook("quiesce", args.quiesce, args.cg, args.hook_timeout)
            try:
                seq = _barrier(cfg.data, args.cg)
            finally:
                if args.quiesce and args.thaw:
                    _hook("thaw", args.thaw, args.cg, args.hook_timeout)
            if seq is None:
                if args.quiesce:
                    raise CliError("the host is not running: a quiesced bookmark needs it (for the barrier)")
                print(f"note: the host is not running; bookmarking the latest journaled point in time of {args.cg}",
                      file=sys.stderr)
                pit = _index(jd, args.cg).latest()
            else:
                pit = _wait_for_pit(_index_when_ready(jd, args.cg, args.timeout), seq, args.timeout)
        b = add_bookmark(cfg.data, args.cg, args.name, pit.seq, locked=args.lock, time_ns=pit.time_ns)
    if args.json:
        print(json.dumps({"name": b.name, "seq": b.seq, "time": b.time_ns / 1e9, "locked": b.locked}))
    else:
        print(f"bookmark {b.name} of {args.cg} at seq {b.seq} ({_fmt(b.time_ns)}){' locked' if b.locked else ''}")
    return 0


def _index_when_ready(jd: Path, cg: str, timeout: float) -> PitIndex:
    """The CG's PIT index; a CG whose first batch is still on its way has no
    journal directory yet, so wait for it (bounded)."""
    deadline = time.monotonic() + timeout
    while not jd.is_dir() and time.monotonic() < deadline:
        time.sleep(0.01)  # polling the file system, see _wait_for_pit
    return _index(jd, cg)


class _Progress:
    """A progress line on stderr when it is a terminal; silent otherwise."""

    def __init__(self, what: str, total: int) -> None:
        self.what, self.total = what, total
        self.on = sys.stderr.isatty()
        self._last = 0.0
        self._t0 = time.monotonic()

    def update(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if not self.on or (not force and now - self._last < 0.1):
            return
        self._last = now
        pct = 100 * done / self.total if self.total else 100
        rate = done / max(now - self._t0, 1e-9) / (1 << 20)
        sys.stderr.write(f"\r{self.what}: {pct:5.1f}% ({done >> 20}/{self.total >> 20} MiB, {rate:.0f} MiB/s)")
        sys.stderr.flush()

    def done(self) -> None:
        if self.on:
            self.update(self.total, force=True)
            sys.stderr.write("\n")


def restore_to_file(reader: Any, vdisk_id: int, size: int, path: Path, *, progress: _Progress | None = None,
                    threads: int = 2) -> int:
    """Write the reader's image of one vdisk to a new sparse raw file at
    ``path`` (data extents only; holes and zeroed ranges stay holes), fsync
    it; returns the data bytes written. Chunks go through `PitReader.copy_to`
    in two threads: pwrite releases the GIL and blocks when the page cache
    throttles dirty pages, so one thread decodes while the other waits on
    the disk (measured: more threads only fight over the GIL on two cores)."""
    import concurrent.futures

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)

    def chunk(pos: int) -> int:
        return reader.copy_to(vdisk_id, fd, pos, min(_CHUNK, size - pos))

    written = 0
    try:
        os.ftruncate(fd, size)
        with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="restore") as pool:
            # map keeps at most a few chunks ahead per thread in flight, in order
            for i, n in enumerate(pool.map(chunk, range(0, size, _CHUNK))):
                written += n
                if progress:
                    progress.update(min(size, (i + 1) * _CHUNK))
        os.fsync(fd)
    finally:
        os.close(fd)
    return written


@_cli_errors
def cmd_restore(args: argparse.Namespace) -> int:
    from nicsplit.recovery.reader import PitReader
    from nicsplit.core import config as cfgmod
    from nicsplit.cli.main import CliError
    from nicsplit.host.datastore import Datastore

    cfg = cfgmod.load(cfgmod.data_dir(args.data))
    if not (cfg.datastore_dir / "catalog.json").exists():
        raise CliError(f"no datastore catalog in {cfg.datastore_dir}: restore needs the vdisk's id and size")
    ds = Datastore.open(cfg.datastore_dir)
    v = ds.get_vdisk(args.vdisk)
    cg = v.extra.get("cg")
    if not cg:
        raise CliError(f"vdisk {v.name} is in no consistency group: it has no journal to restore from")
    jd = _check_cg(cfg.data, cg)
    if args.in_place:
        return _restore_in_place(cfg, v, cg, jd, args)
    if args.to is None:
        raise CliError("say where to: --to FILE, or --in-place onto the production vdisk")
    idx = _index(jd, cg)
    pit = resolve_pit(idx, cfg.data, cg, at=args.at, seq=args.seq, bookmark=args.bookmark, latest=args.latest)
    fmt = args.format
    out = Path(args.to)
    if out.is_dir():
        raise CliError(f"{out} is a directory; give a file name")
    if not out.parent.is_dir():
        raise CliError(f"no directory {out.parent} for {out.name}")
    partial = out.with_name(out.name + ".partial")
    raw = partial if fmt == "raw" else out.with_name(out.name + ".raw.partial")
    progress = _Progress(f"restore {v.name} @ seq {pit.seq}", v.size)
    try:
        with PitReader(jd, [v], pit.seq) as r:
            written = restore_to_file(r, v.id, v.size, raw, progress=progress)
        progress.done()
        if fmt == "qcow2":
            p = subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(partial)],
                               capture_output=True, text=True)
            if p.returncode != 0:
                raise CliError(f"qemu-img convert failed ({p.returncode}): {p.stderr.strip()}")
            fd = os.open(partial, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.rename(partial, out)
        fsync_dir(out.parent)
    except FileNotFoundError as e:
        if e.filename == "qemu-img":
            raise CliError("qemu-img is not installed: --format qcow2 needs it (apt-get install qemu-utils)") from None
        raise
    finally:
        for p_ in {raw, partial}:
            if p_.exists():
                p_.unlink()
    if args.json:
        print(json.dumps({"vdisk": v.name, "cg": cg, "seq": pit.seq, "time": pit.time_ns / 1e9, "file": str(out),
                          "format": fmt, "size": v.size, "data_bytes": written}))
    else:
        print(f"restored {v.name} at seq {pit.seq} ({_fmt(pit.time_ns)}) to {out} ({fmt}, {v.size} bytes)")
    return 0


def _host_uri(addresses: list[str], export: str) -> str:
    """The URI of ``export`` on a host listening on ``addresses`` (unix socket first)."""
    for a in addresses:
        if a.startswith("nbd+unix://"):
            return f"nbd+unix:///{export}?" + a.split("?", 1)[1]
    for a in addresses:
        host, port = a.removeprefix("nbd://").rsplit(":", 1)
        host = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host in ("::", "[::]") else host)
        return f"nbd://{host}:{port}/{export}"
    raise ValueError("the host listens nowhere")


def _restore_in_place(cfg: Any, v: Any, cg: str, jd: Path, args: argparse.Namespace) -> int:
    """Copy the PIT image back onto the production vdisk *through the host*,
    so the splitter captures every restored block: the vdisk stays protected
    and later PITs include the restored data. The copy is nbdcopy from a
    read-only image server of the PIT (in this process) to the host's export."""
    import asyncio

    from nicsplit.recovery.image import ImageServer
    from nicsplit.recovery.blockindex import BlockIndex
    from nicsplit.core import ctl
    from nicsplit.cli.main import CliError

    if args.to is not None or args.format != "raw":
        raise CliError("--in-place writes onto the production vdisk: it takes no --to or --format")
    reply = ctl.request(cfg.run_dir / "host.sock", {"cmd": "status"})
    if reply is None or not reply.get("ok"):
        raise CliError("restore --in-place writes through the host so the splitter captures it: "
                       "the host is not running (start it: nicsplit up)")
    st = reply["status"]
    if cg in st.get("fenced", []):
        raise CliError(f"consistency group {cg} is failed over to the appliance: fail back first")
    try:
        dest = _host_uri(st.get("addresses", []), v.name)
    except ValueError as e:
        raise CliError(str(e)) from None
    idx = BlockIndex(jd)
    pit = resolve_pit(idx.pits, cfg.data, cg, at=args.at, seq=args.seq, bookmark=args.bookmark, latest=args.latest)
    t0 = time.monotonic()

    async def copy() -> tuple[int, str]:
        srv = ImageServer(jd, [v], pit.seq, index=idx, cg=cg)
        try:
            host, port = await srv.start("127.0.0.1", 0)
            src = srv.urls("127.0.0.1", port)[v.name]
            argv = ["nbdcopy", "--flush", *(["--progress"] if sys.stderr.isatty() else []), src, dest]
            proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL,
                                                        stderr=None if sys.stderr.isatty() else asyncio.subprocess.PIPE)
            _, err = await proc.communicate()
            return proc.returncode or 0, (err or b"").decode(errors="replace").strip()
        finally:
            await srv.stop()

    try:
        rc, err = asyncio.run(copy())
    except FileNotFoundError:
        raise CliError("nbdcopy is not installed: restore --in-place needs it (apt-get install libnbd-bin)") from None
    if rc != 0:
        raise CliError(f"nbdcopy failed ({rc}) restoring {v.name}: {err.splitlines()[-1] if err else 'no message'}; "
                       "the vdisk may be partly restored: run the restore again")
    seconds = time.monotonic() - t0
    after = _barrier(cfg.data, cg)  # the restored blocks are in the stream before this seq
    out = {"vdisk": v.name, "cg": cg, "seq": pit.seq, "time": pit.time_ns / 1e9, "in_place": True,
           "size": v.size, "seconds": round(seconds, 3), "covered_by_seq": after}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"restored {v.name} in place to seq {pit.seq} ({_fmt(pit.time_ns)}) in {seconds:.2f} s; "
              f"still protected: the journal holds the restored data from seq {after}")
    return 0


# -- parsers ---------------------------------------------------------------------------


def _seq(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"bad sequence number {value!r}")
    return int(value)


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``pits``, ``bookmark`` and ``restore`` on the ``nicsplit``
    subparsers object ``sub``."""
    s = sub.add_parser("pits", parents=[common], help="list a consistency group's points in time")
    s.add_argument("cg")
    s.add_argument("--all", action="store_true",
                   help="every PIT the journal holds, also those retention's hourly thinning does not offer")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_pits)

    s = sub.add_parser("bookmark", parents=[common], help="name a point in time of a consistency group")
    s.add_argument("cg")
    s.add_argument("name")
    s.add_argument("--lock", action="store_true", help="keep it whatever the retention policy says")
    s.add_argument("--unlock", action="store_true", help="let retention trim an existing bookmark again")
    s.add_argument("--existing", action="store_true", help="with --lock: lock an existing bookmark")
    s.add_argument("--seq", type=_seq, metavar="N",
                   help="the point in time at seq N (default: a barrier through the running host and card)")
    s.add_argument("--quiesce", metavar="CMD", help="shell command run before the barrier (e.g. fsfreeze -f)")
    s.add_argument("--thaw", metavar="CMD", help="shell command run after the barrier, also when it failed")
    s.add_argument("--hook-timeout", type=float, default=60.0, metavar="S")
    s.add_argument("--timeout", type=float, default=30.0, metavar="S",
                   help="how long to wait for the barrier to be journaled")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_bookmark)

    s = sub.add_parser("restore", parents=[common], help="write a vdisk's image at a point in time to a file")
    s.add_argument("vdisk")
    when = s.add_mutually_exclusive_group(required=True)
    when.add_argument("--at", metavar="TIME", help="the latest point in time at or before TIME")
    when.add_argument("--seq", type=_seq, metavar="N", help="the point in time at seq N")
    when.add_argument("--bookmark", metavar="NAME")
    when.add_argument("--latest", action="store_true")
    s.add_argument("--to", metavar="FILE")
    s.add_argument("--in-place", action="store_true",
                   help="write the image back onto the production vdisk through the host (stays protected)")
    s.add_argument("--format", choices=("raw", "qcow2"), default="raw")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_restore)
