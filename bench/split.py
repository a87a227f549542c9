"""The splitter configuration of ``make bench`` (issue 3): the whole system
started by ``nicsplit up`` (appliance + card + host), chain
``["stats", "split"]``, every measured vdisk in one consistency group.

Used by ``bench/run.py``. Nothing here asserts on performance.

Why one vdisk per measured point: a vdisk that enters *marking* (the card
did not acknowledge within ``split_timeout_us``) stays marking until a resync,
which does not exist yet, and from then on its writes skip the card. Reusing
one vdisk would turn every later point into a measurement of marking. So the
data directory holds one pre-filled vdisk per (round, queue depth) point plus
one for the lag run and one for the wire run (CG ``bench``; the lag and wire
vdisks each in a CG of their own, see LAG_CG); every
point starts on a vdisk that is still ``protected``, and reports whether it
ended marking and after how many split writes.

Why pre-fill before ``nicsplit up``: the pre-fill (1 MiB sequential writes,
for thin-provisioning allocation, as for the other configurations) is not
what is being measured, and the host caches a vdisk's chain for its life.
The data directory is first served by a plain ``nicsplit host serve`` whose
chain is ``["stats"]``; then the configuration is switched to
``["stats", "split"]`` and ``nicsplit up`` starts the three processes.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from harness import MiB, Server, fio_cmd, run_fio
from nicsplit.core.ctl import request
from nicsplit.testing.procs import nicsplit_cmd, run_cli

CG = "bench"
LAG_VDISK = "lag"
WIRE_VDISK = "wire"
# The lag and wire runs each get a CG of their own: the card holds a CG's
# writes in sequence order, so marked writes of the point vdisks (which still
# take sequence numbers) must not be able to hold up these runs.
LAG_CG = "lagcg"
WIRE_CG = "wirecg"
# The wire run measures compression and dedup, not the timeout: its vdisk gets
# a generous split timeout so its writes reach the card (see docs/benchmarks.md).
WIRE_TIMEOUT_US = 100_000


def ctl(path: Path, cmd: dict, timeout: float = 5.0) -> dict | None:
    """One request on a nicsplit control socket (what ``nicsplit host stats``
    / ``card stats`` do, without a Python start-up per sample)."""
    return request(path, cmd, timeout)


class SplitSystem(Server):
    """``nicsplit up`` on a fresh data directory; ``uri`` points at the vdisk
    of the current point (``begin_point``)."""

    def __init__(self, key: str, label: str, workdir: Path, size: int, n_points: int,
                 split_timeout_us: float | None = None) -> None:
        super().__init__(key, label, workdir, size)
        self.n_points = n_points
        self.split_timeout_us = split_timeout_us  # None: the filter's default (1000)
        self.points = [f"p{i:02d}" for i in range(n_points)]
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.card_pid = 0
        self.appliance_pid = 0
        self._next = 0
        self.vdisk = ""
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.prefill_info: dict[str, Any] = {}

    # -- lifecycle -----------------------------------------------------------
    @property
    def data(self) -> Path:
        return self.workdir

    def _prepare(self, fio_size: str) -> None:
        from nicsplit.testing.datadir import init_data, vdisk
        from nicsplit.testing.procs import HostProcess

        data = self.data
        init_data(data, validate=False, filters=["stats"])
        for cg in (CG, LAG_CG, WIRE_CG):
            run_cli(data, "cg", "create", cg)
        names = self.points + [LAG_VDISK, WIRE_VDISK]
        for n in names:
            cg = {LAG_VDISK: LAG_CG, WIRE_VDISK: WIRE_CG}.get(n, CG)
            vdisk(data, n, f"{self.size // MiB}M", "--cg", cg)
        # Phase 1: pre-fill every vdisk through a host without the splitter.
        host = HostProcess(data, log_path=data / "prefill-host.log").start()
        t = time.monotonic()
        total = 0
        try:
            for n in names:
                out = self.workdir / f"prefill-{n}.json"
                job = run_fio(fio_cmd(host.uri(n), rw="write", bs="1m", size=fio_size, iodepth=8, out=out, runtime=None), out, 600)
                total += job["write"]["io_bytes"]
        finally:
            host.stop()
        self.prefill_info = {"seconds": round(time.monotonic() - t, 3), "bytes": total, "vdisks": len(names)}
        # Phase 2: the chain under test.
        cfg = data / "nicsplit.toml"
        text = cfg.read_text()
        split = '"split"' if self.split_timeout_us is None else f'{{name = "split", split_timeout_us = {self.split_timeout_us:g}}}'
        text, n = re.subn(r'(?m)^filters = \["stats"\]$', f'filters = ["stats", {split}]', text, count=1)
        if n != 1:
            raise RuntimeError("could not switch the [host] filters line of the bench configuration")
        text += f'\n[vdisks.{WIRE_VDISK}]\nfilters = ["stats", {{name = "split", split_timeout_us = {WIRE_TIMEOUT_US}}}]\n'
        prio = os.environ.get("NICSPLIT_BENCH_CARD_PRIORITY")  # an experiment knob: realtime / high / normal
        if prio:
            text = re.sub(r'(?m)^priority = ".*"$', f'priority = "{prio}"', text, count=1)
        cfg.write_text(text)

    def start(self, fio_size: str = "") -> None:  # type: ignore[override]
        self.workdir.parent.mkdir(parents=True, exist_ok=True)
        if not (self.data / "nicsplit.toml").exists():
            self._prepare(fio_size or f"{self.size // MiB}m")
        self._log = open(self.data / "up.log", "ab")
        cmd = nicsplit_cmd("--data", str(self.data), "up", "--listen", "127.0.0.1:0", "--appliance-listen", "127.0.0.1:0",
                           "--console-listen", "127.0.0.1:0")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 120
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise TimeoutError(f"nicsplit up not ready in 120 s; log:\n{self.log_tail()}") from None
            if line is None:
                raise RuntimeError(f"nicsplit up exited ({self.proc.wait()}); log:\n{self.log_tail()}")
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("event") == "ready":
                break
        self.port = int(next(a for a in msg["addresses"] if a.startswith("nbd://")).rsplit(":", 1)[1])
        procs = msg["processes"]
        self.pid = procs["host"]["pid"]
        self.card_pid = procs["card"]["pid"]
        self.appliance_pid = procs["appliance"]["pid"]
        self.use(self.points[0])  # begin_point() picks it for the first point
        self.info = {"command": " ".join(cmd), "data": str(self.data), "filters": ["stats", "split"],
                     "split_timeout_us": self.split_timeout_us or "default (1000)", "cg": CG, "processes": procs,
                     "wire_vdisk_split_timeout_us": WIRE_TIMEOUT_US, "prefill": self.prefill_info}

    def _read(self) -> None:
        assert self.proc and self.proc.stdout
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def refresh_pids(self) -> None:
        """The supervisor restarts a dead child: follow the pid files."""
        run = self.data / "run"
        for attr, name in (("pid", "host"), ("card_pid", "card"), ("appliance_pid", "appliance")):
            try:
                setattr(self, attr, int((run / f"{name}.pid").read_text().strip()))
            except (OSError, ValueError):
                pass

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.info["stop_error"] = "nicsplit up ignored SIGTERM for 90 s; killed"
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self) -> str:
        parts = []
        for p in [self.data / "up.log", *sorted((self.data / "run").glob("*.log"))]:
            try:
                parts.append(f"== {p.name}\n" + p.read_text(errors="replace")[-3000:])
            except OSError:
                pass
        return "\n".join(parts)

    # -- points ----------------------------------------------------------------
    def use(self, name: str) -> str:
        self.vdisk = name
        self.uri = f"nbd://127.0.0.1:{self.port}/{name}"
        return self.uri

    def begin_point(self) -> str:
        """Switch to the next fresh (protected, pre-filled) vdisk."""
        if self._next >= len(self.points):
            raise RuntimeError("no fresh vdisk left for another point")
        name = self.points[self._next]
        self._next += 1
        self.use(name)
        return name

    def host_stats(self) -> dict | None:
        r = ctl(self.data / "run" / "host.sock", {"cmd": "stats"})
        return None if r is None else r.get("stats")

    def card_stats(self) -> dict | None:
        r = ctl(self.data / "run" / "card-ctl.sock", {"cmd": "stats"})
        return None if r is None else r.get("stats")

    def card_link(self) -> dict[str, Any]:
        """The host's link to the card: attached, losses, last_error."""
        r = ctl(self.data / "run" / "host.sock", {"cmd": "status"})
        return dict(((r or {}).get("status") or {}).get("card") or {})

    def wait_attached(self, timeout: float = 5.0) -> dict[str, Any]:
        """Before a run: wait (bounded) until the host is attached to the card
        again — after a loss it retries every 0.5 s — so a run does not start
        marking only because the previous one lost the link."""
        t0 = time.monotonic()
        link = self.card_link()
        while not link.get("attached") and time.monotonic() - t0 < timeout:
            time.sleep(0.1)
            link = self.card_link()
        link["waited_s"] = round(time.monotonic() - t0, 2)
        return link

    def split_stats(self, vdisk: str | None = None) -> dict[str, Any]:
        st = self.host_stats() or {}
        return dict(((st.get("vdisks") or {}).get(vdisk or self.vdisk) or {}).get("split") or {})

    def status(self) -> dict | None:
        p = run_cli(self.data, "status", "--json", check=False)
        try:
            return json.loads(p.stdout)
        except ValueError:
            return None

    def wait_drained(self, cg_name: str, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until the card has nothing in flight for ``cg_name`` and its
        hold stage stopped moving (writes still held then are stuck)."""
        t0 = time.monotonic()
        last: dict | None = None
        held_prev, still = None, 0
        while time.monotonic() - t0 < timeout:
            last = self.card_stats()
            if last is not None:
                cg = (last.get("cgs") or {}).get(cg_name, {})
                st = last.get("stages") or {}
                held = (st.get("hold") or {}).get("held")
                still = still + 1 if held == held_prev else 0
                held_prev = held
                if (not cg.get("unacked_batches") and not (st.get("ship") or {}).get("unacked")
                        and not (st.get("batch") or {}).get("open_bytes")
                        and not (st.get("merge") or {}).get("open_bytes") and (not held or still >= 10)):
                    return {"drained": not held, "seconds": round(time.monotonic() - t0, 2), "held_at_end": held, "card": last}
            time.sleep(0.2)
        return {"drained": False, "seconds": round(time.monotonic() - t0, 2),
                "held_at_end": held_prev, "card": last}


# -- the lag run and the wire run ----------------------------------------------------


def _pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, int(round(p / 100 * (len(xs) - 1)))))
    return xs[k]


def lag_run(sysm: SplitSystem, workdir: Path, *, seconds: float, size: str, interval: float = 0.5,
            client_cpus: set[int] | None = None) -> dict[str, Any]:
    """QD16 randwrite on a fresh vdisk for ``seconds`` while sampling the
    card's ``rpo_seconds`` of the CG (and the vdisk's split state) every
    ``interval`` seconds over the control sockets."""
    import os

    sysm.refresh_pids()
    link0 = sysm.wait_attached()
    uri = sysm.use(LAG_VDISK)
    out = workdir / "fio-lag.json"
    out.unlink(missing_ok=True)
    cmd = fio_cmd(uri, rw="randwrite", bs="4k", size=size, iodepth=16, out=out, runtime=seconds)
    pre = (lambda: os.sched_setaffinity(0, client_cpus)) if client_cpus else None
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=pre)
    samples: list[dict[str, Any]] = []
    marking_at = None
    while p.poll() is None:
        time.sleep(interval)
        t = round(time.monotonic() - t0, 2)
        card = sysm.card_stats() or {}
        cg = (card.get("cgs") or {}).get(LAG_CG, {})
        sp = sysm.split_stats(LAG_VDISK)
        s = {"t": t, "rpo_seconds": cg.get("rpo_seconds"), "unacked_batches": cg.get("unacked_batches"),
             "last_durable_seq": cg.get("last_durable_seq"), "state": sp.get("state"),
             "split": sp.get("split"), "marked": sp.get("marked")}
        samples.append(s)
        if marking_at is None and s["state"] == "marking":
            marking_at = t
    _, err = p.communicate()
    if p.returncode != 0 or not out.exists():
        raise RuntimeError(f"fio (lag run) failed ({p.returncode}): {(err or '').strip()[-1500:]}")
    text = out.read_text()
    job = json.loads(text[text.index("{"):])["jobs"][0]
    end_split = sysm.split_stats(LAG_VDISK)
    link1 = sysm.card_link()
    drain = sysm.wait_drained(LAG_CG, 60)
    card_end = drain.pop("card") or {}
    status = sysm.status() or {}
    cg_status = next((c for c in status.get("cgs", []) if c.get("name") == LAG_CG), {})
    lag_vd = next((v for v in cg_status.get("vdisks", []) if v.get("name") == LAG_VDISK), {})
    rpos = [s["rpo_seconds"] for s in samples if isinstance(s["rpo_seconds"], (int, float))]
    return {
        "seconds": seconds,
        "interval_s": interval,
        "iops": job["write"]["iops"],
        "io_bytes": job["write"]["io_bytes"],
        "writes": job["write"].get("total_ios"),
        "n_samples": len(rpos),
        "rpo_max_s": max(rpos) if rpos else None,
        "rpo_p99_s": _pct(rpos, 99),
        "rpo_p50_s": _pct(rpos, 50),
        "rpo_end_s": rpos[-1] if rpos else None,
        "marking_at_s": marking_at,
        "split": end_split.get("split"),
        "marked": end_split.get("marked"),
        "state_end": end_split.get("state"),
        "reason": end_split.get("reason"),
        "split_p50_us": end_split.get("split_p50_us"),
        "split_p99_us": end_split.get("split_p99_us"),
        "split_p999_us": end_split.get("split_p999_us"),
        "status_end": {"cg_state": cg_status.get("state"), "cg_rpo_seconds": cg_status.get("rpo_seconds"),
                       "vdisk_state": lag_vd.get("state"), "dirty_bytes": lag_vd.get("dirty_bytes")},
        "drain": drain,
        "cg": LAG_CG,
        "card_link_before": link0,
        "card_link_after": link1,
        "card_link_losses": (link1.get("losses") or 0) - (link0.get("losses") or 0),
        "card_end_cg": (card_end.get("cgs") or {}).get(LAG_CG),
        "samples": samples,
        "command": " ".join(cmd),
    }


WIRE_FIO = ["--buffer_compress_percentage=50", "--dedupe_percentage=30", "--refill_buffers"]


def _get(d: dict, *path: str) -> int:
    for k in path:
        d = (d or {}).get(k) or {}
    return d if isinstance(d, (int, float)) else 0


def wire_run(sysm: SplitSystem, workdir: Path, *, seconds: float, size: str, client_cpus: set[int] | None = None) -> dict[str, Any]:
    """A partly compressible, partly duplicate QD16 workload on its own vdisk;
    card wire counters before and after (once drained)."""
    sysm.refresh_pids()
    link0 = sysm.wait_attached()
    uri = sysm.use(WIRE_VDISK)
    before = sysm.card_stats() or {}
    out = workdir / "fio-wire.json"
    cmd = fio_cmd(uri, rw="randwrite", bs="4k", size=size, iodepth=16, out=out, runtime=seconds)
    cmd[-4:-4] = WIRE_FIO  # before --iodepth ... keeps the command readable
    job = run_fio(cmd, out, timeout=seconds + 120, cpus=client_cpus)
    drain = sysm.wait_drained(WIRE_CG, 60)
    after = drain.pop("card") or {}
    sp = sysm.split_stats(WIRE_VDISK)
    link1 = sysm.card_link()

    def d(*path: str) -> int:
        return _get(after, *path) - _get(before, *path)

    written = job["write"]["io_bytes"]
    wire_out = d("wire", "bytes_out")
    captured = d("payload_bytes_in")
    return {
        "seconds": seconds,
        "fio_options": WIRE_FIO,
        "split_timeout_us": WIRE_TIMEOUT_US,
        "iops": job["write"]["iops"],
        "bytes_written": written,
        "bytes_captured_by_card": captured,
        "wire_bytes_out": wire_out,
        "wire_bytes_in": d("wire", "bytes_in"),
        "ship_bytes_out": d("stages", "ship", "bytes_out"),
        "merge_bytes_in": d("stages", "merge", "bytes_in"),
        "dedup_bytes_saved": d("stages", "dedup", "bytes_saved"),
        "dedup_ref_blocks": d("stages", "dedup", "ref_blocks"),
        "dedup_blocks": d("stages", "dedup", "blocks"),
        "compress_bytes_in": d("stages", "compress", "bytes_in"),
        "compress_bytes_out": d("stages", "compress", "bytes_out"),
        "encrypt_bytes_out": d("stages", "encrypt", "bytes_out"),
        "batches": d("stages", "batch", "batches"),
        "wire_per_written": wire_out / written if written else None,
        "wire_per_captured": wire_out / captured if captured else None,
        "split": sp.get("split"),
        "marked": sp.get("marked"),
        "state_end": sp.get("state"),
        "reason": sp.get("reason"),
        "split_p50_us": sp.get("split_p50_us"),
        "split_p99_us": sp.get("split_p99_us"),
        "split_p999_us": sp.get("split_p999_us"),
        "split_max_us": sp.get("split_max_us"),
        "card_link_before": link0,
        "card_link_losses": (link1.get("losses") or 0) - (link0.get("losses") or 0),
        "hold_held_before": _get(before, "stages", "hold", "held"),
        "hold_held_after": _get(after, "stages", "hold", "held"),
        "drain": drain,
        "command": " ".join(cmd),
    }
