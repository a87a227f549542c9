"""Start real nicsplit / nbdkit processes and wait for them *by condition*.

`HostProcess` runs ``nicsplit host serve`` and waits for its JSON "ready"
line on stdout; `NbdkitProcess` runs nbdkit and waits for its pid file,
which nbdkit writes only once it accepts connections.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Sequence, TypeVar

from nicsplit.core import ctl

LIBNBD_PATH = "/usr/lib/python3/dist-packages"
T = TypeVar("T")


def wait_for(cond: Callable[[], object], timeout: float, what: str, interval: float = 0.01) -> object:
    """Poll ``cond`` until truthy or raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def call_within(timeout: float, what: str, fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)``, which must return within ``timeout`` seconds: a
    deadline on the call returning ("at once", "promptly"), not a speed
    measurement.  The call runs in a thread; past the deadline this fails
    naming ``what``, after giving the call up to a minute more to end, so
    nothing is left using the test's objects (``fn`` should be bounded by its
    own timeout)."""
    done = threading.Event()
    result: list[tuple[bool, object]] = []

    def call() -> None:
        try:
            result.append((True, fn(*args)))
        except BaseException as e:  # handed to the caller below
            result.append((False, e))
        finally:
            done.set()

    threading.Thread(target=call, name=f"call_within: {what}", daemon=True).start()
    if not done.wait(timeout):
        done.wait(60)
        raise AssertionError(f"{what}: no return within {timeout}s")
    ok, value = result[0]
    if not ok:
        raise value  # type: ignore[misc]
    return value  # type: ignore[return-value]


# The real NBD peers the suite drives; a missing one is a failure, never a skip.
PEER_TOOLS = ("nbdkit", "nbdinfo", "nbdcopy", "qemu-io", "qemu-img", "fio", "qemu-system-x86_64", "psktool")


def missing_peer_tools() -> list[str]:
    return [t for t in PEER_TOOLS if shutil.which(t) is None]


def stop_detached_servers(under: Path) -> list[int]:
    """SIGTERM the servers `nicsplit image export` and `nicsplit failover`
    detach on purpose (``image serve``, ``failover-serve``) whose command line
    names a path under ``under``; their pids."""
    stopped = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        detached = (b"image" in cmd and b"serve" in cmd) or b"failover-serve" in cmd
        if detached and any(str(under).encode() in c for c in cmd):
            try:
                os.kill(int(proc.name), signal.SIGTERM)
                stopped.append(int(proc.name))
            except OSError:
                pass
    return stopped


def nicsplit_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "nicsplit", *args]


def run_cli(data: Path, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    p = subprocess.run(
        nicsplit_cmd("--data", str(data), *args), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if check and p.returncode != 0:
        raise AssertionError(f"nicsplit {' '.join(args)} failed ({p.returncode}): {p.stderr.strip()}")
    return p


def outside_address() -> str:
    """An address of this machine that is not loopback (the route to a
    documentation address; nothing is sent)."""
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.connect(("203.0.113.1", 9))
        addr = u.getsockname()[0]
    except OSError:
        addr = ""
    finally:
        u.close()
    # These machines always have one (the package registries are reached
    # through it); without it the beyond-loopback rules go untested: a failure.
    assert addr and not addr.startswith("127."), "this machine has no IPv4 address beyond loopback"
    return addr


class ReadyProcess:
    """A nicsplit command as a child process that prints one JSON
    ``{"event": "ready", ...}`` line on stdout once it serves; `start` waits
    for that line (a condition, never a sleep). Subclasses give the argv."""

    what = "process"

    def __init__(self, data: Path, *args: str, log_path: Path | None = None) -> None:
        self.data = Path(data)
        self.args = list(args)
        self.log_path = log_path or self.data / f"{self.what}.log"
        self.proc: subprocess.Popen | None = None
        self.ready: dict = {}
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._log = None

    def argv(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout: float = 60) -> "ReadyProcess":
        self._lines = queue.Queue()
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv(), stdout=subprocess.PIPE, stderr=self._log,
                                     stdin=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read, args=(self.proc, self._lines), daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise TimeoutError(f"{self.what} did not become ready in {timeout}s; log:\n{self.log()}") from None
            if line is None:
                raise RuntimeError(f"{self.what} exited ({self.proc.wait()}) before ready; log:\n{self.log()}")
            msg = ctl.ready_message(line)
            if msg is not None:
                self.ready = msg
                self.on_ready(msg)
                return self

    def on_ready(self, msg: dict) -> None:
        """Hook: pick what the ready line says (addresses, ports)."""

    def listening_cmd(self, *command: str) -> list[str]:
        """``nicsplit --data DATA *command *args``, on a free local port
        unless the args name --listen."""
        if not any(a.startswith("--listen") for a in self.args):
            self.args += ["--listen", "127.0.0.1:0"]
        return nicsplit_cmd("--data", str(self.data), *command, *self.args)

    @staticmethod
    def _read(proc: subprocess.Popen, lines: queue.Queue) -> None:
        assert proc.stdout
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    @property
    def pid(self) -> int:
        assert self.proc
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-8000:]
        except OSError:
            return ""

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait for a clean exit; returns the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            self._close_log()
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._close_log()

    def kill(self) -> None:
        """kill -9 and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close_log()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None and self.proc is not None:
            # A test failed inside the block: its captured output then holds
            # the processes' logs, so a failure on a CI machine says why.
            print(f"== {self.what} log at the failure ({exc[0].__name__}):\n{self.log()}")
        if self.proc is not None and self.proc.poll() is None:
            rc = self.stop()
            if rc != 0 and exc[0] is None:
                raise AssertionError(f"{self.what} exited {rc} on SIGTERM; log:\n{self.log()}")


class HostProcess(ReadyProcess):
    """``nicsplit host serve`` (on a free port unless --listen is given)."""

    what = "host"

    def argv(self) -> list[str]:
        return self.listening_cmd("host", "serve")

    def on_ready(self, msg: dict) -> None:
        self.addresses = msg["addresses"]

    @property
    def port(self) -> int:
        tcp = next(a for a in self.addresses if a.startswith("nbd://"))
        return int(tcp.rsplit(":", 1)[1])

    def uri(self, export: str) -> str:
        return f"nbd://127.0.0.1:{self.port}/{export}"


class NbdkitProcess:
    """nbdkit serving on a Unix socket; ready when its pid file appears."""

    def __init__(self, workdir: Path, plugin_args: Sequence[str], *, readonly: bool = False) -> None:
        self.dir = Path(workdir)
        self.sock = self.dir / "nbdkit.sock"
        self.pidfile = self.dir / "nbdkit.pid"
        self.plugin_args = list(plugin_args)
        self.readonly = readonly
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> "NbdkitProcess":
        self.pidfile.unlink(missing_ok=True)
        cmd = ["nbdkit", "-f", "-U", str(self.sock), "-P", str(self.pidfile)]
        if self.readonly:
            cmd.append("-r")
        self.proc = subprocess.Popen(cmd + self.plugin_args, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for(lambda: self.pidfile.exists() and self.pidfile.read_text().strip(), timeout, "nbdkit pid file")
        return self

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "NbdkitProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def import_libnbd():
    """libnbd's Python binding comes from Debian (python3-libnbd)."""
    if LIBNBD_PATH not in sys.path:
        sys.path.append(LIBNBD_PATH)
    import nbd  # noqa: PLC0415

    return nbd


def env_with_libnbd() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), LIBNBD_PATH]))
    return env


def libnbd_errno(exc: BaseException) -> int:
    """libnbd's Python binding reports ``Error.errno`` as a name
    (``"EINVAL"``); turn it into the number (0 when it has none)."""
    e = getattr(exc, "errno", None)
    if isinstance(e, str):
        return getattr(errno, e, -1)
    return e or 0


class UpProcess(ReadyProcess):
    """``nicsplit up`` (appliance + card + host) on free ports."""

    what = "up"

    def argv(self) -> list[str]:
        return nicsplit_cmd("--data", str(self.data), "up", "--listen", "127.0.0.1:0",
                            "--appliance-listen", "127.0.0.1:0", "--console-listen", "127.0.0.1:0", *self.args)

    def pid_of(self, name: str) -> int:
        """Current pid of a child (it may have been restarted)."""
        return int((self.data / "run" / f"{name}.pid").read_text())

    @property
    def port(self) -> int:
        return int(self.ready["addresses"][0].rsplit(":", 1)[1])

    def uri(self, export: str) -> str:
        return f"nbd://127.0.0.1:{self.port}/{export}"

    def log(self) -> str:
        parts = [super().log()]
        for p in sorted((self.data / "run").glob("*.log")):
            if p.name.endswith("-overflow.log"):  # the card's overflow log is data, not text
                continue
            try:
                parts.append(f"== {p.name}\n" + p.read_text(errors="replace")[-4000:])
            except OSError:
                pass
        return "\n".join(parts)


def recv_exact(s: "socket.socket", n: int) -> bytes:
    """Exactly ``n`` bytes from a raw socket (tests that speak NBD by hand)."""
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def cpus_allowed(pid: int, tid: int | None = None) -> set[int]:
    """Cpus_allowed_list of a process (or one of its threads) from /proc."""
    status = Path(f"/proc/{pid}" + (f"/task/{tid}" if tid else "") + "/status").read_text()
    line = next(x for x in status.splitlines() if x.startswith("Cpus_allowed_list:"))
    out: set[int] = set()
    for part in line.split(":", 1)[1].strip().split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def nbd_connect(uri: str):
    """A libnbd handle connected to ``uri`` (default strictness)."""
    h = import_libnbd().NBD()
    h.connect_uri(uri)
    return h


def journal(data: Path, cg: str) -> list[dict]:
    """``nicsplit journal dump CG --json`` records (empty before the first batch)."""
    p = run_cli(data, "journal", "dump", cg, "--json", check=False)
    if p.returncode != 0:
        if "no journal" in p.stderr:
            return []
        raise AssertionError(p.stderr)
    return json.loads(p.stdout)["records"]
