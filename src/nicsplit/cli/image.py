"""Image access commands for the ``nicsplit`` CLI (wired in by control/cli.py).

    nicsplit image export CG (--at TIME | --seq N | --bookmark NAME | --latest)
                          [--writable] [--listen HOST:PORT] [--json]
    nicsplit image list [--json]
    nicsplit image close ID [--json]
    nicsplit image serve CG (--at ... | --latest) [--id ID] [--writable] [--listen HOST:PORT]

``export`` starts ``image serve`` as a detached background process (its own
session, stdin closed, stderr to ``DATA/run/image-ID.log``), reads its stdout
until the JSON ready line (or an error line), then lets it go and prints
``{"id", "cg", "seq", "time", "writable", "pid", "exports": {VDISK:
"nbd://HOST:PORT/VDISK"}, "ready_seconds"}`` with ``--json``, a table
otherwise.  ``serve`` writes ``DATA/run/images/ID.json`` (pid, address,
exports) once it listens and removes it when it stops; a writable image keeps
its overlay files in ``DATA/run/images/ID.overlay/`` (unlinked as soon as
they are open, so nothing leaks even when the server is killed).  ``close``
sends SIGTERM, waits, and removes the info file and overlay directory.

``serve`` resolves the PIT itself (`pitcli.resolve_pit` over the block
index's own PIT index: one read-only journal scan for both), so every bad
input — unknown CG, a CG without vdisks or journal, no such PIT, unknown
bookmark, a PIT inside a merge window — is one line: ``serve`` prints it as
``{"event": "error", "error": ...}`` and exits 1, and ``export`` raises it as
`CliError`.  An unknown image id is one line too.

Example::

    nicsplit image export cg1 --bookmark before-upgrade --json
    qemu-img compare nbd://127.0.0.1:40123/vm1-root golden.raw
    nicsplit image close 3f9a12bc
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from nicsplit.cli.pit import _cli_errors, _fmt, _seq

# How long export waits for the server's ready line.  Ready takes one journal
# scan (~0.3 s per 64 Ki records) plus interpreter start (~0.2 s); 60 s leaves
# room for a journal of tens of GiB on a slow disk.
_READY_TIMEOUT = 60.0
# How long close waits after SIGTERM (in-flight requests finish first) before SIGKILL.
_CLOSE_TIMEOUT = 30.0
_ID_CHARS = set("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_.")


def images_dir(data: Path) -> Path:
    return Path(data) / "run" / "images"


def _info_path(data: Path, image_id: str) -> Path:
    return images_dir(data) / f"{image_id}.json"


def _overlay_path(data: Path, image_id: str) -> Path:
    return images_dir(data) / f"{image_id}.overlay"


def _log_path(data: Path, image_id: str) -> Path:
    return Path(data) / "run" / f"image-{image_id}.log"


def _check_id(image_id: str) -> str:
    from nicsplit.cli.main import CliError

    if not image_id or len(image_id) > 64 or not set(image_id) <= _ID_CHARS or image_id.startswith("."):
        raise CliError(f"bad image id {image_id!r}: use 1-64 of A-Z a-z 0-9 - _ .")
    return image_id


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _alive(pid: int, image_id: str) -> bool:
    """Is ``pid`` still the server of ``image_id`` (not a zombie, not a reused pid)?"""
    from nicsplit.core.procutil import runs

    return runs(pid, "serve", image_id)


def _appliance_serves(data: Path, info: dict) -> bool:
    """An image served by the appliance is alive while that appliance runs."""
    try:
        cmdline = Path(f"/proc/{int(info.get('pid', 0))}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False
    return b"appliance" in cmdline


# -- serve (foreground) -----------------------------------------------------------------


def _cg_vdisks(cfg: Any, cg: str) -> list[Any]:
    from nicsplit.core.cgs import CGCatalog
    from nicsplit.cli.main import CliError
    from nicsplit.host.datastore import Datastore

    CGCatalog(cfg.data).get(cg)  # unknown CG: CGError, one line
    if not (cfg.datastore_dir / "catalog.json").exists():
        raise CliError(f"no datastore catalog in {cfg.datastore_dir}: an image needs its vdisks' ids and sizes")
    vds = [v for v in Datastore.open(cfg.datastore_dir).list_vdisks() if v.extra.get("cg") == cg]
    if not vds:
        raise CliError(f"consistency group {cg} has no vdisks")
    return vds


def cmd_serve(args: argparse.Namespace) -> int:
    from nicsplit.cli.main import CliError

    import logging

    from nicsplit.core.config import ConfigError

    t0 = time.monotonic()
    if not getattr(args, "verbose", 0):
        logging.getLogger("nicsplit").setLevel(logging.INFO)  # a server logs its life (to DATA/run/image-ID.log)
    image_id = _check_id(args.id or secrets.token_hex(4))
    try:
        prep = _prepare(args)
    except (CliError, ConfigError) as e:
        print(json.dumps({"event": "error", "error": str(e)}), flush=True)
        raise
    _run(_serve(args, image_id, t0, *prep))
    return 0


@_cli_errors
def _prepare(args: argparse.Namespace) -> tuple:
    """Everything that can fail with a user error, before the server listens."""
    from nicsplit.cli.pit import _check_cg, _index, resolve_pit
    from nicsplit.recovery.blockindex import BlockIndex
    from nicsplit.core import config as cfgmod
    from nicsplit.core.config import parse_listen

    cfg = cfgmod.load(cfgmod.data_dir(args.data))
    listen = parse_listen(args.listen or "127.0.0.1:0")
    vds = _cg_vdisks(cfg, args.cg)
    jd = _check_cg(cfg.data, args.cg)
    if not jd.is_dir():
        _index(jd, args.cg)  # raises the one-line "no journal yet"
    t_scan = time.monotonic()
    idx = BlockIndex(jd)  # one scan: the PIT list and the block index
    t_index = time.monotonic() - t_scan
    pit = resolve_pit(idx.pits, cfg.data, args.cg, at=args.at, seq=args.seq, bookmark=args.bookmark,
                      latest=args.latest)
    return cfg, listen, vds, jd, idx, pit, t_index


async def _serve(args: argparse.Namespace, image_id: str, t0: float, cfg: Any, listen: tuple[str, int],
                 vds: list[Any], jd: Path, idx: Any, pit: Any, t_index: float) -> None:
    import asyncio
    import logging

    from nicsplit.recovery.image import ImageServer

    idir = images_dir(cfg.data)
    idir.mkdir(parents=True, exist_ok=True)
    info_path = _info_path(cfg.data, image_id)
    srv = ImageServer(jd, vds, pit.seq, writable=args.writable, index=idx, image_id=image_id, cg=args.cg,
                      overlay_dir=_overlay_path(cfg.data, image_id) if args.writable else None,
                      validate=bool(cfg.host("validate", False)))
    try:
        host, port = await srv.start(*listen)
        url_host = socket.gethostname() if host in ("0.0.0.0", "::") else host
        exports = srv.urls(url_host, port)
        ready_s = time.monotonic() - t0
        info = {"id": image_id, "cg": args.cg, "seq": pit.seq, "time": pit.time_ns / 1e9, "writable": args.writable,
                "pid": os.getpid(), "address": f"{host}:{port}", "exports": exports,
                "started": time.time(), "index_seconds": round(t_index, 4), "ready_seconds": round(ready_s, 4)}
        _write_json(info_path, info)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print(json.dumps({"event": "ready", **info}), flush=True)
        if args.detach_stdout:
            # The exporter stops reading our stdout now: point it at /dev/null
            # so a later print cannot die of a broken pipe.
            fd = os.open(os.devnull, os.O_WRONLY)
            os.dup2(fd, 1)
            os.close(fd)
        _log_ready(image_id, args.cg, pit.seq, exports, t_index, ready_s)
        await stop.wait()
        logging.getLogger("nicsplit.recovery.image").info("image %s: stopping (in-flight requests finish first)",
                                                           image_id)
    finally:
        await srv.stop()
        info_path.unlink(missing_ok=True)
        shutil.rmtree(_overlay_path(cfg.data, image_id), ignore_errors=True)


def _log_ready(image_id: str, cg: str, seq: int, exports: dict[str, str], t_index: float, ready_s: float) -> None:
    import logging

    log = logging.getLogger("nicsplit.recovery.image")
    log.info("image %s of %s at seq %d ready in %.3f s (index %.3f s): %s", image_id, cg, seq, ready_s, t_index,
             " ".join(exports.values()))


def _run(coro: Any) -> None:
    import asyncio

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(coro)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coro)


# -- export / list / close ---------------------------------------------------------------


def _selector_args(args: argparse.Namespace) -> list[str]:
    if args.at is not None:
        return ["--at", args.at]
    if args.seq is not None:
        return ["--seq", str(args.seq)]
    if args.bookmark is not None:
        return ["--bookmark", args.bookmark]
    return ["--latest"]


def _read_line(proc: subprocess.Popen, deadline: float) -> str | None:
    """One line of the child's stdout before ``deadline`` ("" at EOF, None on timeout)."""
    assert proc.stdout is not None
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                return None
            chunk = os.read(proc.stdout.fileno(), 1)  # byte at a time: never read past the ready line
            if not chunk:
                return buf.decode(errors="replace")
            buf += chunk
            if chunk == b"\n":
                return buf.decode(errors="replace")


def cmd_export(args: argparse.Namespace) -> int:
    from nicsplit.core import config as cfgmod
    from nicsplit.core.config import parse_listen

    t0 = time.monotonic()
    data = cfgmod.data_dir(args.data)
    cfgmod.load(data)  # not a data directory: one line, before any process starts
    if args.listen:
        parse_listen(args.listen)
    via = _export_in_appliance(data, args)
    if via is not None:
        return _print_export(args, via, time.monotonic() - t0)
    image_id = secrets.token_hex(4)
    (data / "run").mkdir(parents=True, exist_ok=True)
    images_dir(data).mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "nicsplit", "--data", str(data), "image", "serve", args.cg, "--id", image_id,
            "--detach-stdout", *_selector_args(args)]
    if args.writable:
        argv.append("--writable")
    if args.listen:
        argv += ["--listen", args.listen]
    ready = spawn_detached(argv, _log_path(data, image_id), "image server", _READY_TIMEOUT, drop_log_on_error=True)
    return _print_export(args, ready, time.monotonic() - t0)


def spawn_detached(argv: list[str], logp: Path, what: str, timeout: float, *, pass_fds: tuple[int, ...] = (),
                   drop_log_on_error: bool = False) -> dict:
    """Start a server detached (own session, stdin closed, stderr to
    ``logp``), read its stdout until the JSON ready line and return it; its
    ``{"event": "error"}`` line, an exit or a timeout is a one-line CliError."""
    from nicsplit.cli.main import CliError

    with open(logp, "ab") as logf:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=logf,
                                start_new_session=True, close_fds=True, pass_fds=pass_fds)
    deadline = time.monotonic() + timeout
    try:
        while True:
            line = _read_line(proc, deadline)
            if line is None:
                proc.kill()
                proc.wait()
                raise CliError(f"the {what} did not become ready in {timeout:.0f} s (log: {logp})")
            if line == "":
                rc = proc.wait()
                raise CliError(_last_error(logp) or f"the {what} exited ({rc}) before it was ready (log: {logp})")
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if isinstance(msg, dict) and msg.get("event") == "error":
                proc.wait()
                if drop_log_on_error:
                    logp.unlink(missing_ok=True)  # a user error, said in full here: no log to keep
                raise CliError(str(msg.get("error")))
            if isinstance(msg, dict) and msg.get("event") == "ready":
                proc.returncode = 0  # detached: it lives on after we exit (no "still running" warning)
                return msg
    finally:
        if proc.stdout is not None:
            proc.stdout.close()


def _export_in_appliance(data: Path, args: argparse.Namespace) -> dict | None:
    """The running appliance serves the image from its own block index
    (imagehost.py); None when no appliance answers (or it has no index for
    the CG): then a standalone server is started."""
    from nicsplit.core import ctl
    from nicsplit.cli.main import CliError

    req = {"cmd": "image-export", "cg": args.cg, "at": args.at, "seq": args.seq, "bookmark": args.bookmark,
           "latest": bool(args.latest), "writable": bool(args.writable), "listen": args.listen}
    reply = ctl.request(data / "run" / "appliance.sock", req, timeout=_READY_TIMEOUT)
    if reply is None or reply.get("fallback"):
        return None
    if not reply.get("ok"):
        raise CliError(str(reply.get("error")))
    return reply["image"]


def _print_export(args: argparse.Namespace, ready: dict, total: float) -> int:
    out = {k: ready[k] for k in ("id", "cg", "seq", "time", "writable", "pid", "exports")}
    out["ready_seconds"] = round(total, 4)
    out["server_ready_seconds"] = ready.get("ready_seconds")
    out["in_appliance"] = bool(ready.get("in_appliance"))
    if args.json:
        print(json.dumps(out))
        return 0
    mode = "writable (throw-away overlay)" if out["writable"] else "read-only"
    print(f"image {out['id']}: {out['cg']} at seq {out['seq']} ({_fmt(int(out['time'] * 1e9))}), {mode}, "
          f"pid {out['pid']}, ready in {total:.2f} s")
    width = max(len(n) for n in out["exports"])
    for name, url in out["exports"].items():
        print(f"  {name:<{width}}  {url}")
    print(f"close with: nicsplit image close {out['id']}")
    return 0


def _last_error(logp: Path) -> str | None:
    try:
        lines = logp.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if line.startswith("nicsplit: error: "):
            return line[len("nicsplit: error: "):]
    return None


def _images(data: Path) -> list[dict]:
    out = []
    for p in sorted(images_dir(data).glob("*.json")):
        try:
            info = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        info["alive"] = _appliance_serves(data, info) if info.get("in_appliance") else \
            _alive(int(info.get("pid", 0)), info.get("id", ""))
        out.append(info)
    return out


def cmd_list(args: argparse.Namespace) -> int:
    from nicsplit.core import config as cfgmod

    data = cfgmod.load(cfgmod.data_dir(args.data)).data
    images = _images(data)
    if args.json:
        print(json.dumps({"images": [{k: i.get(k) for k in ("id", "cg", "seq", "time", "writable", "pid", "alive",
                                                            "exports", "started")} for i in images]}))
        return 0
    if not images:
        print("no images (open one with: nicsplit image export CG --latest)")
        return 0
    for i in images:
        state = "" if i["alive"] else "  (server gone: nicsplit image close " + i["id"] + ")"
        mode = "rw" if i.get("writable") else "ro"
        print(f"{i['id']:<10} {i['cg']:<16} seq {i['seq']:<10} {mode}  pid {i['pid']}{state}")
        for name, url in i.get("exports", {}).items():
            print(f"    {name:<20} {url}")
    return 0


def cmd_close(args: argparse.Namespace) -> int:
    from nicsplit.core import config as cfgmod
    from nicsplit.cli.main import CliError

    data = cfgmod.load(cfgmod.data_dir(args.data)).data
    image_id = args.id
    path = _info_path(data, image_id) if set(image_id) <= _ID_CHARS and not image_id.startswith(".") else None
    try:
        info = json.loads(path.read_text()) if path is not None else None
    except FileNotFoundError:
        info = None
    except ValueError:
        info = {"id": image_id, "pid": 0}  # a torn info file: still clean up
    if info is None:
        known = ", ".join(i["id"] for i in _images(data)) or "none"
        raise CliError(f"unknown image id {image_id!r} (open images: {known})")
    pid = int(info.get("pid", 0))
    killed = False
    if info.get("in_appliance"):
        from nicsplit.core import ctl

        ctl.request(data / "run" / "appliance.sock", {"cmd": "image-close", "id": image_id}, timeout=_CLOSE_TIMEOUT)
        pid = 0  # the appliance stopped it (or is gone): never signal the appliance
    if pid and _alive(pid, image_id):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + _CLOSE_TIMEOUT
        while _alive(pid, image_id) and time.monotonic() < deadline:
            time.sleep(0.02)
        if _alive(pid, image_id):
            os.kill(pid, signal.SIGKILL)
            killed = True
            deadline = time.monotonic() + 5
            while _alive(pid, image_id) and time.monotonic() < deadline:
                time.sleep(0.02)
    shutil.rmtree(_overlay_path(data, image_id), ignore_errors=True)
    assert path is not None
    path.unlink(missing_ok=True)
    if args.json:
        print(json.dumps({"id": image_id, "closed": True, "killed": killed}))
    else:
        print(f"closed image {image_id}{' (killed after ' + str(int(_CLOSE_TIMEOUT)) + ' s)' if killed else ''}")
    return 0


# -- parsers ---------------------------------------------------------------------------


def _when(s: argparse.ArgumentParser) -> None:
    when = s.add_mutually_exclusive_group(required=True)
    when.add_argument("--at", metavar="TIME", help="the latest point in time at or before TIME")
    when.add_argument("--seq", type=_seq, metavar="N", help="the point in time at seq N")
    when.add_argument("--bookmark", metavar="NAME")
    when.add_argument("--latest", action="store_true")


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``image export|list|close|serve`` on the ``nicsplit``
    subparsers object ``sub``."""
    ip = sub.add_parser("image", parents=[common], help="expose a consistency group at a point in time over NBD")
    isub = ip.add_subparsers(dest="sub", metavar="SUBCOMMAND", required=True)

    s = isub.add_parser("export", parents=[common], help="export every vdisk of a CG at a point in time (background)")
    s.add_argument("cg")
    _when(s)
    s.add_argument("--writable", action="store_true", help="accept writes into a throw-away overlay")
    s.add_argument("--listen", metavar="HOST:PORT", help="default 127.0.0.1:0 (a free port)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_export)

    s = isub.add_parser("list", parents=[common], help="list exported images")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_list)

    s = isub.add_parser("close", parents=[common], help="stop an exported image and discard its overlay")
    s.add_argument("id")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_close)

    s = isub.add_parser("serve", parents=[common], help="serve an image in the foreground (export runs this)")
    s.add_argument("cg")
    _when(s)
    s.add_argument("--id", metavar="ID", help="image id (default: random)")
    s.add_argument("--writable", action="store_true")
    s.add_argument("--listen", metavar="HOST:PORT", help="default 127.0.0.1:0 (a free port)")
    s.add_argument("--detach-stdout", action="store_true", help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_serve)
