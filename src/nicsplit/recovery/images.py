"""Image access: the registry of exported images, and export / serve / close.

An image is every vdisk of a CG at a PIT, served over NBD by an
`ImageServer` (read-only, or writable into a throw-away overlay).

* `export` asks the running appliance first (it serves from the block index
  it keeps current: imagehost.py); without one it starts ``nicsplit image
  serve`` as a detached process (`spawn_detached`: own session, stdin
  closed, stderr to ``DATA/run/image-ID.log``), reads its stdout until the
  JSON ready line (or an error line) and lets it go.
* `serve` runs in that process: it writes ``DATA/run/images/ID.json`` (pid,
  address, exports) once it listens and removes it when it stops; a writable
  image keeps its overlay files in ``DATA/run/images/ID.overlay/`` (unlinked
  as soon as they are open, so nothing leaks even when the server is killed).
* `close` sends SIGTERM, waits, and removes the info file and overlay
  directory (or asks the appliance, for an image it serves).

`prepare` resolves the PIT over the block index's own PIT index (one
read-only journal scan for both), so every bad input — unknown CG, a CG
without vdisks or journal, no such PIT, unknown bookmark, a PIT inside a
merge window — is one line before the server listens.

Example::

    info = export(data, "cg1", Selector(bookmark="before-upgrade"))
    close(data, info["id"])
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Coroutine

import uvloop

from nicsplit.core import config as cfgmod
from nicsplit.core import ctl
from nicsplit.core.layout import Layout
from nicsplit.core.procutil import runs
from nicsplit.recovery.errors import RecoveryError, RecoveryNotFound
from nicsplit.recovery.image import ImageServer
from nicsplit.recovery.pits import Pit
from nicsplit.recovery.blockindex import BlockIndex
from nicsplit.recovery.select import Selector, cg_vdisks, check_cg, require_journal, resolve_pit

log = logging.getLogger("nicsplit.recovery.image")

# How long export waits for the server's ready line.  Ready takes one journal
# scan (~0.3 s per 64 Ki records) plus interpreter start (~0.2 s); 60 s leaves
# room for a journal of tens of GiB on a slow disk.
READY_TIMEOUT = 60.0
# How long close waits after SIGTERM (in-flight requests finish first) before SIGKILL.
CLOSE_TIMEOUT = 30.0
_ID_CHARS = set("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_.")


# -- the registry ------------------------------------------------------------------------


def info_path(data: Path, image_id: str) -> Path:
    return Layout(data).images_run / f"{image_id}.json"


def overlay_path(data: Path, image_id: str) -> Path:
    return Layout(data).images_run / f"{image_id}.overlay"


def check_id(image_id: str) -> str:
    if not image_id or len(image_id) > 64 or not set(image_id) <= _ID_CHARS or image_id.startswith("."):
        raise RecoveryError(f"bad image id {image_id!r}: use 1-64 of A-Z a-z 0-9 - _ .")
    return image_id


def write_info(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _alive(pid: int, image_id: str) -> bool:
    """Is ``pid`` still the server of ``image_id`` (not a zombie, not a reused pid)?"""
    return runs(pid, "serve", image_id)


def _appliance_serves(info: dict) -> bool:
    """An image served by the appliance is alive while that appliance runs."""
    try:
        cmdline = Path(f"/proc/{int(info.get('pid', 0))}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False
    return b"appliance" in cmdline


def list_images(data: Path) -> list[dict]:
    """Every registered image's info, with ``alive``: does its server run?"""
    out = []
    for p in sorted(Layout(data).images_run.glob("*.json")):
        try:
            info = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        info["alive"] = _appliance_serves(info) if info.get("in_appliance") else \
            _alive(int(info.get("pid", 0)), info.get("id", ""))
        out.append(info)
    return out


# -- serve (in the image server's process) ------------------------------------------------


def url_host(host: str) -> str:
    """The host name to put in export URLs of a server listening on ``host``
    (a wildcard address is no address a client can use)."""
    return socket.gethostname() if host in ("0.0.0.0", "::") else host


@dataclass(frozen=True, slots=True)
class Prepared:
    """Everything `serve` needs, resolved before anything listens."""
    cfg: cfgmod.Config
    cg: str
    listen: tuple[str, int]
    vdisks: list[Any]
    journal_dir: Path
    index: BlockIndex
    pit: Pit
    index_seconds: float


def prepare(data: Path, cg: str, sel: Selector, listen: str | None, *,
            progress: Callable[[int, int], None] | None = None) -> Prepared:
    """Check the request and resolve its PIT (one-line errors);
    ``progress(done, total)`` follows the journal scan (bytes)."""
    cfg = cfgmod.load(data)
    addr = cfgmod.parse_listen(listen or "127.0.0.1:0")
    vds = cg_vdisks(cfg, cg)
    jd = check_cg(cfg.data, cg)
    require_journal(jd, cg)
    t_scan = time.monotonic()
    idx = BlockIndex(jd, progress=progress)  # one scan: the PIT list and the block index
    t_index = time.monotonic() - t_scan
    pit = resolve_pit(idx.pits, cfg.data, cg, sel)
    return Prepared(cfg, cg, addr, vds, jd, idx, pit, t_index)


async def serve(p: Prepared, image_id: str, writable: bool, t0: float, on_ready: Callable[[dict], None]) -> None:
    """Serve the image until SIGTERM / SIGINT; ``on_ready(info)`` once it listens."""
    data = p.cfg.data
    Layout(data).images_run.mkdir(parents=True, exist_ok=True)
    ipath = info_path(data, image_id)
    srv = ImageServer(p.journal_dir, p.vdisks, p.pit.seq, writable=writable, index=p.index, image_id=image_id,
                      cg=p.cg, overlay_dir=overlay_path(data, image_id) if writable else None,
                      validate=bool(p.cfg.host("validate", False)))
    srv.pki_dir = Layout(data).pki   # NBD over TLS: required beyond loopback
    try:
        host, port = await srv.start(*p.listen)
        exports = srv.urls(url_host(host), port)
        ready_s = time.monotonic() - t0
        info = {"id": image_id, "cg": p.cg, "seq": p.pit.seq, "time": p.pit.time_ns / 1e9, "writable": writable,
                "pid": os.getpid(), "address": f"{host}:{port}", "exports": exports,
                "started": time.time(), "index_seconds": round(p.index_seconds, 4), "ready_seconds": round(ready_s, 4)}
        write_info(ipath, info)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        on_ready(info)
        log.info("image %s of %s at seq %d ready in %.3f s (index %.3f s): %s", image_id, p.cg, p.pit.seq, ready_s,
                 p.index_seconds, " ".join(exports.values()))
        await stop.wait()
        log.info("image %s: stopping (in-flight requests finish first)", image_id)
    finally:
        await srv.stop()
        ipath.unlink(missing_ok=True)
        shutil.rmtree(overlay_path(data, image_id), ignore_errors=True)


def run_async(coro: Coroutine[Any, Any, Any]) -> None:
    """Run a server's coroutine on uvloop."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coro)


# -- export / close -----------------------------------------------------------------------


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


def _last_error(logp: Path) -> str | None:
    try:
        lines = logp.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if line.startswith("nicsplit: error: "):
            return line[len("nicsplit: error: "):]
    return None


def spawn_detached(argv: list[str], logp: Path, what: str, timeout: float, *, pass_fds: tuple[int, ...] = (),
                   drop_log_on_error: bool = False, progress: Callable[[int, int], None] | None = None) -> dict:
    """Start a server detached (own session, stdin closed, stderr to
    ``logp``), read its stdout until the JSON ready line and return it; its
    ``{"event": "error"}`` line, an exit or a timeout is a RecoveryError.
    ``{"event": "progress", "done", "total"}`` lines before it go to ``progress``."""
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
                raise RecoveryError(f"the {what} did not become ready in {timeout:.0f} s (log: {logp})")
            if line == "":
                rc = proc.wait()
                raise RecoveryError(_last_error(logp) or f"the {what} exited ({rc}) before it was ready (log: {logp})")
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if isinstance(msg, dict) and msg.get("event") == "error":
                proc.wait()
                if drop_log_on_error:
                    logp.unlink(missing_ok=True)  # a user error, said in full here: no log to keep
                raise RecoveryError(str(msg.get("error")))
            if isinstance(msg, dict) and msg.get("event") == "progress" and progress is not None:
                progress(int(msg.get("done", 0)), int(msg.get("total", 0)))
                continue
            if isinstance(msg, dict) and msg.get("event") == "ready":
                proc.returncode = 0  # detached: it lives on after we exit (no "still running" warning)
                return msg
    finally:
        if proc.stdout is not None:
            proc.stdout.close()


def _export_in_appliance(data: Path, cg: str, sel: Selector, writable: bool, listen: str | None) -> dict | None:
    """The running appliance serves the image from its own block index
    (imagehost.py); None when no appliance answers (or it has no index for
    the CG): then a standalone server is started."""
    req = {"cmd": "image-export", "cg": cg, "at": sel.at, "seq": sel.seq, "bookmark": sel.bookmark,
           "latest": bool(sel.latest), "writable": writable, "listen": listen}
    reply = ctl.request(Layout(data).appliance_sock, req, timeout=READY_TIMEOUT)
    if reply is None or reply.get("fallback"):
        return None
    if not reply.get("ok"):
        raise RecoveryError(str(reply.get("error")))
    return reply["image"]


def export(data: Path, cg: str, sel: Selector, *, writable: bool = False, listen: str | None = None,
           progress: Callable[[int, int], None] | None = None) -> dict:
    """Export every vdisk of ``cg`` at the PIT ``sel`` names; the server's
    ready info (id, cg, seq, time, writable, pid, exports, ...).
    ``progress(done, total)`` follows a standalone server's journal scan
    (bytes; the appliance serves from the index it keeps, at once)."""
    cfgmod.load(data)  # not a data directory: one line, before any process starts
    if listen:
        cfgmod.parse_listen(listen)
    via = _export_in_appliance(data, cg, sel, writable, listen)
    if via is not None:
        return via
    lay = Layout(data)
    image_id = secrets.token_hex(4)
    lay.run.mkdir(parents=True, exist_ok=True)
    lay.images_run.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "nicsplit", "--data", str(data), "image", "serve", cg, "--id", image_id,
            "--detach-stdout", *sel.argv()]
    if writable:
        argv.append("--writable")
    if listen:
        argv += ["--listen", listen]
    if progress is not None:
        argv.append("--progress-events")
    return spawn_detached(argv, lay.image_log(image_id), "image server", READY_TIMEOUT, drop_log_on_error=True,
                          progress=progress)


def terminate(pid: int, alive: Callable[[], bool], timeout: float) -> bool:
    """SIGTERM a detached server and wait while ``alive()`` (in-flight
    requests finish first); SIGKILL after ``timeout``. True if it was killed."""
    if not alive():
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive() and time.monotonic() < deadline:
        time.sleep(0.02)  # another process's exit: nothing to wait on but polling
    if not alive():
        return False
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    return True


def close(data: Path, image_id: str) -> bool:
    """Stop an exported image and discard its overlay; True if its server
    had to be killed (it did not stop within `CLOSE_TIMEOUT` of SIGTERM)."""
    path = info_path(data, image_id) if set(image_id) <= _ID_CHARS and not image_id.startswith(".") else None
    try:
        info = json.loads(path.read_text()) if path is not None else None
    except FileNotFoundError:
        info = None
    except ValueError:
        info = {"id": image_id, "pid": 0}  # a torn info file: still clean up
    if info is None:
        known = ", ".join(i["id"] for i in list_images(data)) or "none"
        raise RecoveryNotFound(f"unknown image id {image_id!r} (open images: {known})")
    pid = int(info.get("pid", 0))
    killed = False
    if info.get("in_appliance"):
        ctl.request(Layout(data).appliance_sock, {"cmd": "image-close", "id": image_id}, timeout=CLOSE_TIMEOUT)
        pid = 0  # the appliance stopped it (or is gone): never signal the appliance
    if pid:
        killed = terminate(pid, lambda: _alive(pid, image_id), CLOSE_TIMEOUT)
    shutil.rmtree(overlay_path(data, image_id), ignore_errors=True)
    assert path is not None
    path.unlink(missing_ok=True)
    return killed
