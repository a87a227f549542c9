"""Start real nicsplit / nbdkit processes and wait for them *by condition*.

`HostProcess` runs ``nicsplit host serve`` and waits for its JSON "ready"
line on stdout; `NbdkitProcess` runs nbdkit and waits for its pid file,
which nbdkit writes only once it accepts connections.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

LIBNBD_PATH = "/usr/lib/python3/dist-packages"


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


def nicsplit_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "nicsplit", *args]


def run_cli(data: Path, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    p = subprocess.run(
        nicsplit_cmd("--data", str(data), *args), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if check and p.returncode != 0:
        raise AssertionError(f"nicsplit {' '.join(args)} failed ({p.returncode}): {p.stderr.strip()}")
    return p


class HostProcess:
    """``nicsplit host serve`` as a child process."""

    def __init__(self, data: Path, *args: str, log_path: Path | None = None) -> None:
        self.data = Path(data)
        self.args = list(args)
        self.log_path = log_path or self.data / "host.log"
        self.proc: subprocess.Popen | None = None
        self.addresses: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()

    def start(self, timeout: float = 30) -> "HostProcess":
        if not any(a.startswith("--listen") for a in self.args):
            self.args += ["--listen", "127.0.0.1:0"]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            nicsplit_cmd("--data", str(self.data), "host", "serve", *self.args),
            stdout=subprocess.PIPE,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise TimeoutError(f"host did not become ready in {timeout}s; log:\n{self.log()}") from None
            if line is None:
                raise RuntimeError(f"host exited ({self.proc.wait()}) before ready; log:\n{self.log()}")
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("event") == "ready":
                self.addresses = msg["addresses"]
                return self

    def _read(self) -> None:
        assert self.proc and self.proc.stdout
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    @property
    def pid(self) -> int:
        assert self.proc
        return self.proc.pid

    @property
    def port(self) -> int:
        tcp = next(a for a in self.addresses if a.startswith("nbd://"))
        return int(tcp.rsplit(":", 1)[1])

    def uri(self, export: str) -> str:
        return f"nbd://127.0.0.1:{self.port}/{export}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-8000:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait for a clean exit; returns the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "HostProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()


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
    import errno as errno_mod

    e = getattr(exc, "errno", None)
    if isinstance(e, str):
        return getattr(errno_mod, e, -1)
    return e or 0


class UpProcess:
    """``nicsplit up`` (appliance + card + host) as a child process, on free
    ports; ready when its JSON ready line names every process."""

    def __init__(self, data: Path, *args: str) -> None:
        self.data = Path(data)
        self.args = list(args)
        self.proc: subprocess.Popen | None = None
        self.ready: dict = {}
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.log_path = self.data / "up.log"

    def start(self, timeout: float = 60) -> "UpProcess":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            nicsplit_cmd("--data", str(self.data), "up", "--listen", "127.0.0.1:0", "--appliance-listen", "127.0.0.1:0", *self.args),
            stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL, text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise TimeoutError(f"nicsplit up not ready in {timeout}s; log:\n{self.log()}") from None
            if line is None:
                raise RuntimeError(f"nicsplit up exited ({self.proc.wait()}); log:\n{self.log()}")
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("event") == "ready":
                self.ready = msg
                return self

    def _read(self) -> None:
        assert self.proc and self.proc.stdout
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def pid_of(self, name: str) -> int:
        """Current pid of a child (it may have been restarted)."""
        return int((self.data / "run" / f"{name}.pid").read_text())

    @property
    def port(self) -> int:
        return int(self.ready["addresses"][0].rsplit(":", 1)[1])

    def uri(self, export: str) -> str:
        return f"nbd://127.0.0.1:{self.port}/{export}"

    def log(self) -> str:
        parts = []
        for p in [self.log_path, *sorted((self.data / "run").glob("*.log"))]:
            try:
                parts.append(f"== {p.name}\n" + p.read_text(errors="replace")[-4000:])
            except OSError:
                pass
        return "\n".join(parts)

    def stop(self, timeout: float = 60) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "UpProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            rc = self.stop()
            if rc != 0 and exc[0] is None:
                raise AssertionError(f"nicsplit up exited {rc} on SIGTERM; log:\n{self.log()}")


def journal(data: Path, cg: str) -> list[dict]:
    """``nicsplit journal dump CG --json`` records (empty before the first batch)."""
    p = run_cli(data, "journal", "dump", cg, "--json", check=False)
    if p.returncode != 0:
        if "no journal" in p.stderr:
            return []
        raise AssertionError(p.stderr)
    return json.loads(p.stdout)["records"]
