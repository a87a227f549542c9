"""Restore a vdisk at a point in time: to a file, or in place.

`restore_to_file` writes the PIT image of one vdisk to a new temp file in
FILE's directory (raw, sparse: holes and zeroed ranges stay holes), converts
it with ``qemu-img`` for qcow2, fsyncs it and only then puts it under
``FILE``, so an interrupted restore never leaves a half image under the
requested name. FILE is opened as `nicsplit.recovery.target` says: a
symbolic link is never followed, an existing file is replaced only with
``force``, a device is written only with ``device_ok`` (``--to-device``).

`restore_in_place` copies the PIT image back onto the production vdisk
*through the host*, so the splitter captures every restored block: the vdisk
stays protected and later PITs include the restored data. The copy is
nbdcopy from a read-only image server of the PIT (in this process) to the
host's export.

Example::

    src = restore_source(cfg, "vm1-root")
    restore_to_file(cfg, src, Selector(bookmark="before-upgrade"), Path("/tmp/root.raw"))
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from nicsplit.core import ctl
from nicsplit.core.config import Config
from nicsplit.core.fsutil import zero_keep_allocated
from nicsplit.core.layout import Layout
from nicsplit.core.catalog import open_catalog
from nicsplit.recovery.errors import RecoveryError, RecoveryNotFound
from nicsplit.recovery.image import ImageServer
from nicsplit.recovery.blockindex import BlockIndex
from nicsplit.recovery.reader import PitReader
from nicsplit.recovery.select import Selector, barrier, check_cg, open_index, resolve_pit
from nicsplit.recovery.target import DEVICE, check_target, new_temp, open_device, publish, sync_device

# 4 MiB per read/write of a restore: large enough to amortise a system call,
# small enough that the progress line moves every few ms.
CHUNK = 4 << 20

# ``progress(done, total)``: bytes of the operation done so far, of total.
Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class RestoreSource:
    """A vdisk to restore and the journal it is restored from."""
    vdisk: Any  # the catalog's Vdisk
    cg: str
    journal_dir: Path


def restore_source(cfg: Config, vdisk: str) -> RestoreSource:
    """The vdisk named ``vdisk`` with its CG's journal (one-line errors for
    a missing catalog, an unknown vdisk, a vdisk in no CG, an unknown CG)."""
    if not Layout(cfg.data).catalog.exists():
        raise RecoveryError(f"no datastore catalog in {cfg.datastore_dir}: restore needs the vdisk's id and size")
    v = open_catalog(cfg.datastore_dir).get(vdisk)
    if v is None:
        raise RecoveryNotFound(f"no vdisk {vdisk!r} in {cfg.datastore_dir}")
    cg = v.extra.get("cg")
    if not cg:
        raise RecoveryError(f"vdisk {v.name} is in no consistency group: it has no journal to restore from")
    return RestoreSource(v, cg, check_cg(cfg.data, cg))


def write_image(reader: Any, vdisk_id: int, size: int, fd: int, *,
                progress: Progress | None = None, threads: int = 2) -> int:
    """Write the reader's image of one vdisk into ``fd``, which must read as
    zeros over [0, size) already (a new sparse file, or a zeroed device):
    data extents only, so holes and zeroed ranges stay holes; returns the
    data bytes written. Chunks go through `PitReader.copy_to` in two
    threads: pwrite releases the GIL and blocks when the page cache
    throttles dirty pages, so one thread decodes while the other waits on
    the disk (measured: more threads only fight over the GIL on two cores)."""

    def chunk(pos: int) -> int:
        return reader.copy_to(vdisk_id, fd, pos, min(CHUNK, size - pos))

    written = 0
    with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="restore") as pool:
        # map keeps at most a few chunks ahead per thread in flight, in order
        for i, n in enumerate(pool.map(chunk, range(0, size, CHUNK))):
            written += n
            if progress:
                progress(min(size, (i + 1) * CHUNK), size)
    return written


def restore_to_file(cfg: Config, src: RestoreSource, sel: Selector, to: Path, fmt: str = "raw", *,
                    force: bool = False, device_ok: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """Write ``src``'s vdisk at the PIT ``sel`` names to ``to`` (raw or qcow2);
    the result as `nicsplit restore --json` prints it. An existing ``to`` is
    replaced only with ``force``; a device is written only with
    ``device_ok``; a symbolic link is refused. ``progress(done, total)``
    follows the image being written (bytes of the vdisk)."""
    v, cg = src.vdisk, src.cg
    idx = open_index(src.journal_dir, cg)
    pit = resolve_pit(idx, cfg.data, cg, sel)
    out = Path(to)
    kind = check_target(out, force=force, device_ok=device_ok)
    if kind == DEVICE and fmt != "raw":
        raise RecoveryError(f"{out} is a device: --to-device writes the raw image; --format {fmt} writes a file")
    result = {"vdisk": v.name, "cg": cg, "seq": pit.seq, "time": pit.time_ns / 1e9, "file": str(out),
              "format": fmt, "size": v.size}
    if kind == DEVICE:
        fd = open_device(out, v.size)
        try:
            if stat.S_ISBLK(os.fstat(fd).st_mode):
                zero_keep_allocated(fd, 0, v.size)  # copy_to skips holes: they must read as zeros
            with PitReader(src.journal_dir, [v], pit.seq) as r:
                written = write_image(r, v.id, v.size, fd, progress=progress)
            sync_device(fd)
        finally:
            os.close(fd)
        return {**result, "device": True, "data_bytes": written}
    temps: list[Path] = []
    try:
        fd, raw = new_temp(out)
        temps.append(raw)
        try:
            os.ftruncate(fd, v.size)
            with PitReader(src.journal_dir, [v], pit.seq) as r:
                written = write_image(r, v.id, v.size, fd, progress=progress)
            os.fsync(fd)
        finally:
            os.close(fd)
        final = raw
        if fmt == "qcow2":
            qfd, final = new_temp(out)
            os.close(qfd)
            temps.append(final)
            p = subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(final)],
                               capture_output=True, text=True)
            if p.returncode != 0:
                raise RecoveryError(f"qemu-img convert failed ({p.returncode}): {p.stderr.strip()}")
            fd = os.open(final, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        publish(final, out, force=force)
        temps.remove(final)
    except FileNotFoundError as e:
        if e.filename == "qemu-img":
            raise RecoveryError("qemu-img is not installed: --format qcow2 needs it (apt-get install qemu-utils)") \
                from None
        raise
    finally:
        for t in temps:
            if os.path.lexists(t):
                t.unlink()
    return {**result, "data_bytes": written}


def host_uri(addresses: list[str], export: str) -> str:
    """The URI of ``export`` on a host listening on ``addresses`` (unix socket first)."""
    for a in addresses:
        if a.startswith("nbd+unix://"):
            return f"nbd+unix:///{export}?" + a.split("?", 1)[1]
    for a in addresses:
        host, port = a.removeprefix("nbd://").rsplit(":", 1)
        host = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host in ("::", "[::]") else host)
        return f"nbd://{host}:{port}/{export}"
    raise RecoveryError("the host listens nowhere")


def restore_in_place(cfg: Config, src: RestoreSource, sel: Selector, *,
                     progress: Progress | None = None) -> dict[str, Any]:
    """Copy ``src``'s vdisk at the PIT ``sel`` names onto the production
    vdisk through the running host; the result as `--json` prints it
    (``covered_by_seq``: the journal holds the restored data from there).
    ``progress(done, total)`` follows nbdcopy's own percentage (its
    ``--progress=FD`` lines) in bytes of the vdisk."""
    v, cg = src.vdisk, src.cg
    reply = ctl.request(Layout(cfg.data).host_sock, {"cmd": "status"})
    if reply is None or not reply.get("ok"):
        raise RecoveryError("restore --in-place writes through the host so the splitter captures it: "
                            "the host is not running (start it: nicsplit up)")
    st = reply["status"]
    if cg in st.get("fenced", []):
        raise RecoveryError(f"consistency group {cg} is failed over to the appliance: fail back first")
    dest = host_uri(st.get("addresses", []), v.name)
    idx = BlockIndex(src.journal_dir)
    pit = resolve_pit(idx.pits, cfg.data, cg, sel)
    t0 = time.monotonic()

    async def copy() -> tuple[int, str]:
        srv = ImageServer(src.journal_dir, [v], pit.seq, index=idx, cg=cg)
        rfd, wfd = os.pipe()
        loop = asyncio.get_running_loop()
        pending = bytearray()

        def readable() -> None:  # nbdcopy writes "N/100\n" lines to wfd
            try:
                chunk = os.read(rfd, 4096)
            except BlockingIOError:
                return
            if not chunk:
                loop.remove_reader(rfd)
                return
            pending.extend(chunk)
            *lines, rest = bytes(pending).split(b"\n")
            pending[:] = rest
            for line in lines:
                num = line.split(b"/")[0]
                if progress and num.isdigit():
                    progress(min(v.size, v.size * int(num) // 100), v.size)

        os.set_blocking(rfd, False)
        loop.add_reader(rfd, readable)
        try:
            host, port = await srv.start("127.0.0.1", 0)
            url = srv.urls("127.0.0.1", port)[v.name]
            argv = ["nbdcopy", "--flush", f"--progress={wfd}", url, dest]
            proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL,
                                                        stderr=asyncio.subprocess.PIPE, pass_fds=(wfd,))
            os.close(wfd)
            wfd = -1
            _, err = await proc.communicate()
            readable()  # the last line, if the loop has not seen it yet
            return proc.returncode or 0, (err or b"").decode(errors="replace").strip()
        finally:
            loop.remove_reader(rfd)
            os.close(rfd)
            if wfd >= 0:
                os.close(wfd)
            await srv.stop()

    try:
        rc, err = asyncio.run(copy())
    except FileNotFoundError:
        raise RecoveryError("nbdcopy is not installed: restore --in-place needs it (apt-get install libnbd-bin)") \
            from None
    if rc != 0:
        raise RecoveryError(f"nbdcopy failed ({rc}) restoring {v.name}: "
                            f"{err.splitlines()[-1] if err else 'no message'}; "
                            "the vdisk may be partly restored: run the restore again")
    seconds = time.monotonic() - t0
    after = barrier(cfg.data, cg)  # the restored blocks are in the stream before this seq
    return {"vdisk": v.name, "cg": cg, "seq": pit.seq, "time": pit.time_ns / 1e9, "in_place": True,
            "size": v.size, "seconds": round(seconds, 3), "covered_by_seq": after}
