"""Shared pieces of the benchmarks: the servers under test, fio, CPU clocks.

Used by ``bench/run.py`` (the ``make bench`` table) and
``bench/profile_host.py`` (py-spy under load). Nothing here asserts on
performance; it measures and returns numbers.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nicsplit.testing.procs import wait_for

MiB = 1 << 20
GiB = 1 << 30
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- process CPU --------------------------------------------------------------


def cpu_times(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    # The command name (field 2) may hold spaces and parentheses: split after
    # the last ')'. Fields after it start at field 3 (state), so utime
    # (field 14) and stime (field 15) are at indexes 11 and 12.
    rest = stat[stat.rindex(")") + 2 :].split()
    return int(rest[11]) / CLK_TCK, int(rest[12]) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    return sum(cpu_times(pid))


def kernel_threads_cpu() -> dict[int, int]:
    """Clock ticks (utime + stime) of every kernel thread (kthreadd's
    children: kworkers writing back the page cache, ksoftirqd, ...) by pid;
    `kernel_threads_cpu_s` takes the difference of two readings."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone
        if rest[1] == "2" or d == "2":  # ppid 2: a kernel thread
            out[int(d)] = int(rest[11]) + int(rest[12])
    return out


def kernel_threads_cpu_s(before: dict[int, int], after: dict[int, int]) -> float:
    """Seconds of CPU kernel threads used between two `kernel_threads_cpu`
    readings: CPU no process is charged for. Under a write load most of it is
    the writeback of files written without a sync (the host's datastore),
    which a process that syncs (the appliance) pays in its own time instead.
    A thread that exited in between took its time with it (an undercount);
    one that started counts whole."""
    return sum(t - before.get(pid, 0) for pid, t in after.items()) / CLK_TCK


def runq_wait_s(pid: int, *, children: bool = False) -> float:
    """Seconds the threads of a process spent runnable but waiting for a CPU
    (``/proc/PID/task/TID/schedstat``, second field), with its descendants'
    when ``children``: on a shared machine, how much a process was held up
    by the others. 0 for a process that is gone."""
    return _runq_wait_ns(pid, children) / 1e9


def _runq_wait_ns(pid: int, children: bool) -> int:
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[1])
            if children:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    total += sum(_runq_wait_ns(int(k), True) for k in f.read().split())
        except (OSError, IndexError, ValueError):
            continue  # the thread ended
    return total


def git_state(root: Path) -> str:
    """Short commit, plus '+dirty' when tracked or new files differ."""
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            return ""
    rev = git("rev-parse", "--short", "HEAD") or "?"
    return rev + ("+dirty" if git("status", "--porcelain", "--", "src") else "")


def machine_ticks() -> tuple[int, int, int]:
    """(busy, steal, total) clock ticks of all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    return user + nice + system + irq + softirq, steal, sum(v[:8])


def pin_process(pid: int, cpus: set[int]) -> None:
    """Set the CPU affinity of every thread of a process (threads it starts
    later inherit it from their creator)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (ProcessLookupError, OSError):
            pass


class CpuLatencyHold:
    """Hold the PM QoS CPU latency request at 0 µs while open: the cpuidle
    driver then polls instead of halting the (virtual) CPU, so a wake-up does
    not pay a halt exit. Reverts when the file is closed (or the process
    ends). Needs root; returns False from open() when not possible."""

    PATH = "/dev/cpu_dma_latency"

    def __init__(self) -> None:
        self.fd: int | None = None

    def open(self) -> bool:
        try:
            fd = os.open(self.PATH, os.O_WRONLY)
        except OSError:
            return False
        os.write(fd, (0).to_bytes(4, "little", signed=True))
        self.fd = fd
        return True

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def __enter__(self) -> "CpuLatencyHold":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


IDLE_POLL_HELP = ("hold /dev/cpu_dma_latency at 0 during the run so idle CPUs poll instead of halting "
                  "(auto: when writable, i.e. as root); see docs/benchmarks.md")


def add_idle_poll(ap) -> None:
    """The ``--idle-poll auto|on|off`` option of the latency benchmarks."""
    ap.add_argument("--idle-poll", choices=("auto", "on", "off"), default="auto", help=IDLE_POLL_HELP)


def idle_poll_hold(mode: str) -> CpuLatencyHold:
    """A `CpuLatencyHold` opened for ``--idle-poll`` ``mode`` (``held`` says
    whether it applies). Without it a QD1 comparison measures the halting
    regime, where the path that keeps a CPU busier looks faster (the halt
    exit is on the other path's round trip: docs/benchmarks.md).
    SystemExit when ``on`` cannot be held."""
    hold = CpuLatencyHold()
    if mode != "off" and not hold.open() and mode == "on":
        raise SystemExit(f"--idle-poll on: cannot write {hold.PATH} (needs root)")
    return hold


def cpuidle_info() -> dict[str, str]:
    base = Path("/sys/devices/system/cpu/cpuidle")
    info = {}
    for k in ("current_driver", "current_governor_ro", "current_governor"):
        try:
            info[k] = (base / k).read_text().strip()
        except OSError:
            pass
    return info


def free_port() -> int:
    """A TCP port nothing listens on right now (bind port 0, read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loadavg() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


# -- servers under test ---------------------------------------------------------


@dataclass
class Server:
    """One configuration under test: a name, a start() and an NBD URI."""

    key: str
    label: str
    workdir: Path
    size: int
    uri: str = ""
    pid: int = 0
    error: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def alive(self) -> bool:
        raise NotImplementedError


class NbdkitServer(Server):
    """nbdkit's file plugin (C) on a plain file: the reference server."""

    proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        img = self.workdir / "nbdkit.img"
        with open(img, "wb") as f:
            f.truncate(self.size)
        pidfile = self.workdir / "nbdkit.pid"
        pidfile.unlink(missing_ok=True)
        port = free_port()
        self._log = open(self.workdir / "nbdkit.log", "ab")
        cmd = ["nbdkit", "-f", "-p", str(port), "-i", "127.0.0.1", "-P", str(pidfile), "file", str(img)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log)
        try:
            wait_for(
                lambda: (self.proc.poll() is not None) or (pidfile.exists() and pidfile.read_text().strip()),
                30,
                "nbdkit pid file",
            )
        except TimeoutError:
            self.stop()
            raise
        if self.proc.poll() is not None:
            raise RuntimeError(f"nbdkit exited ({self.proc.returncode}): {(self.workdir / 'nbdkit.log').read_text()[-2000:]}")
        self.pid = int(pidfile.read_text().strip())
        self.uri = f"nbd://127.0.0.1:{port}/"
        self.info = {"command": " ".join(cmd), "version": _first_line(["nbdkit", "--version"])}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class NicsplitServer(Server):
    """``nicsplit host serve`` on a fresh data directory with one vdisk."""

    filters: list[Any] = []
    host: Any = None

    def __init__(self, key: str, label: str, workdir: Path, size: int, filters: list[Any]) -> None:
        super().__init__(key, label, workdir, size)
        self.filters = filters

    def start(self) -> None:
        from nicsplit.testing.datadir import init_data, vdisk
        from nicsplit.testing.procs import HostProcess

        data = self.workdir
        if not (data / "nicsplit.toml").exists():
            init_data(data, validate=False, filters=self.filters)
            vdisk(data, "bench", f"{self.size // MiB}M")
        self.host = HostProcess(data).start()
        self.pid = self.host.pid
        self.uri = self.host.uri("bench")
        self.info = {"filters": self.filters, "data": str(data)}

    def stop(self) -> None:
        if self.host is not None:
            try:
                status = self.host.stop()
                if status not in (0, None):
                    self.info["exit_status"] = status
            except Exception as e:  # a benchmark reports, it does not raise on teardown
                self.info["stop_error"] = repr(e)
                self.host.kill()

    def alive(self) -> bool:
        return self.host is not None and self.host.proc is not None and self.host.proc.poll() is None

    def log_tail(self) -> str:
        return self.host.log() if self.host is not None else ""


def _first_line(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
    except Exception:
        return "?"


# -- fio -----------------------------------------------------------------------


class FioError(RuntimeError):
    pass


def fio_cmd(uri: str, *, rw: str, bs: str, size: str, iodepth: int, out: Path, runtime: float | None) -> list[str]:
    cmd = ["fio", "--name=j", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}", f"--size={size}"]
    if runtime is not None:
        cmd += ["--time_based=1", f"--runtime={runtime:g}"]
    cmd += [f"--iodepth={iodepth}", "--lat_percentiles=1", "--output-format=json", f"--output={out}"]
    return cmd


def run_fio(cmd: list[str], out: Path, timeout: float, cpus: set[int] | None = None) -> dict[str, Any]:
    out.unlink(missing_ok=True)
    pre = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, preexec_fn=pre)
    if p.returncode != 0 or not out.exists():
        raise FioError(f"fio failed ({p.returncode}): {(p.stderr or p.stdout).strip()[-2000:]}")
    text = out.read_text()
    # fio may print notes before the JSON document in the output file.
    doc = json.loads(text[text.index("{") :])
    job = doc["jobs"][0]
    if job.get("error"):
        raise FioError(f"fio job error {job['error']}: {(p.stderr or '').strip()[-2000:]}")
    return job


def prefill(server: Server, workdir: Path, size: str) -> dict[str, Any]:
    """One sequential 1 MiB write pass over the whole export, so thin
    provisioning / filesystem block allocation is done before measuring."""
    out = workdir / f"prefill-{server.key}.json"
    t = time.monotonic()
    job = run_fio(fio_cmd(server.uri, rw="write", bs="1m", size=size, iodepth=8, out=out, runtime=None), out, 600)
    return {"seconds": round(time.monotonic() - t, 3), "bytes": job["write"]["io_bytes"]}


def measure(server: Server, workdir: Path, *, qd: int, runtime: float, size: str, client_cpus: set[int] | None = None) -> dict[str, Any]:
    """One fio 4 KiB randwrite run plus the server's CPU time over it."""
    out = workdir / f"fio-{server.key}-qd{qd}.json"
    cmd = fio_cmd(server.uri, rw="randwrite", bs="4k", size=size, iodepth=qd, out=out, runtime=runtime)
    load_before = loadavg()
    u0, s0 = cpu_times(server.pid)
    m0 = machine_ticks()
    t0 = time.monotonic()
    job = run_fio(cmd, out, timeout=runtime + 120, cpus=client_cpus)
    wall = time.monotonic() - t0
    u1, s1 = cpu_times(server.pid)
    cpu0, cpu1 = u0 + s0, u1 + s1
    m1 = machine_ticks()
    busy_cores = (m1[0] - m0[0]) / CLK_TCK / wall
    fio_cores = ((job.get("usr_cpu") or 0) + (job.get("sys_cpu") or 0)) / 100 * (job.get("elapsed") or wall) / wall
    w = job["write"]
    pct = w["lat_ns"].get("percentile", {})
    gib = w["io_bytes"] / GiB
    return {
        "iops": w["iops"],
        "p50_us": pct.get("50.000000", 0) / 1000,
        "p99_us": pct.get("99.000000", 0) / 1000,
        "p999_us": pct.get("99.900000", 0) / 1000,
        "mean_us": w["lat_ns"]["mean"] / 1000,
        "io_bytes": w["io_bytes"],
        "server_cpu_s": round(cpu1 - cpu0, 3),
        "server_cpu_s_per_gib": (cpu1 - cpu0) / gib if gib else None,
        "server_user_s": round(u1 - u0, 3),
        "server_sys_s": round(s1 - s0, 3),
        "fio_usr_cpu_pct": job.get("usr_cpu"),
        "fio_sys_cpu_pct": job.get("sys_cpu"),
        "wall_s": round(wall, 3),
        # Whole-machine context: CPUs busy during the point, the part of it
        # that was neither the server nor fio, and hypervisor steal time.
        "machine_busy_cores": round(busy_cores, 3),
        "other_busy_cores": round(busy_cores - (cpu1 - cpu0) / wall - fio_cores, 3),
        "steal_pct": round((m1[1] - m0[1]) / max(1, m1[2] - m0[2]) * 100, 2),
        "loadavg_before": load_before,
        "command": " ".join(cmd),
    }


def have_tools(*names: str) -> list[str]:
    return [n for n in names if shutil.which(n) is None]


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None without matplotlib."""
    try:
        import matplotlib  # optional: a bench without it writes no plot

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def percentile(xs: list[float], p: float) -> float | None:
    """The p-th percentile (nearest rank at or above) of ``xs``; None if empty."""
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]
