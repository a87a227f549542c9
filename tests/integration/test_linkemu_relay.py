"""The link emulator as a process (`python -m nicsplit.testing.linkemu`)
between real TCP peers: the delay it adds (p50/p99 at 0 and 0.5 ms one
way), the throughput at a cap, cut, blackhole, and — between a real TLS 1.3
client and server (the deployment's PKI) — that a duplicated chunk and a
flipped byte are caught by TLS, never delivered as data."""

from __future__ import annotations

import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nicsplit.core import ctl
from nicsplit.core.pki import client_context, init_pki, server_context
from nicsplit.testing.linkemu import LinkEmulator
from nicsplit.testing.procs import wait_for


class Echo:
    """A TCP (or TLS) echo server on a free port; records what TLS says went wrong."""

    def __init__(self, ctx: ssl.SSLContext | None = None) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.ctx = ctx
        self.errors: list[BaseException] = []
        threading.Thread(target=self._accept, daemon=True, name="echo").start()

    @property
    def address(self) -> tuple[str, int]:
        return self.sock.getsockname()[:2]

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        try:
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.ctx is not None:
                c = self.ctx.wrap_socket(c, server_side=True)
            while d := c.recv(1 << 16):
                c.sendall(d)
        except (OSError, ssl.SSLError) as e:
            self.errors.append(e)
        finally:
            c.close()

    def close(self) -> None:
        self.sock.close()


class LinkProcess:
    def __init__(self, tmp: Path, to: tuple[str, int], *args: str) -> None:
        self.control = tmp / "link.sock"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nicsplit.testing.linkemu", "--listen", "127.0.0.1:0", "--to", f"{to[0]}:{to[1]}",
             "--control", str(self.control), *args], stdout=subprocess.PIPE, text=True)
        ready = ctl.ready_message(self.proc.stdout.readline())
        assert ready, "no ready line"
        host, _, port = ready["address"].rpartition(":")
        self.address = (host, int(port))

    def __call__(self, cmd: str, **kw) -> dict:
        reply = ctl.request(self.control, {"cmd": cmd, **kw})
        assert reply and reply["ok"], reply
        return reply["stats"]

    def close(self) -> None:
        self.proc.terminate()
        assert self.proc.wait(30) == 0


@pytest.fixture
def echo():
    e = Echo()
    yield e
    e.close()


def connect(addr) -> socket.socket:
    s = socket.create_connection(addr, timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def rtts_ms(addr, n: int = 400) -> list[float]:
    out = []
    with connect(addr) as s:
        for _ in range(n):
            t = time.perf_counter()
            s.sendall(b"p" * 64)
            got = 0
            while got < 64:
                got += len(s.recv(64))
            out.append((time.perf_counter() - t) * 1e3)
    return sorted(out)


def pct(xs: list[float], p: float) -> float:
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def test_delay_and_rate_are_accurate(tmp_path, echo):
    link = LinkProcess(tmp_path, echo.address)
    try:
        direct = rtts_ms(echo.address)
        res = {}
        for delay in (0.0, 0.5):
            link("set", delay_ms=delay)
            via = rtts_ms(link.address)
            # Added one-way latency: half the round trip's increase over the direct path, at the
            # 10th percentile: a loaded box only adds to a round trip (the median of the 0 ms relay
            # swung to 0.33 ms in a CI run and hid part of the 0.5 ms), the delay is in every one.
            res[delay] = ((pct(via, .1) - pct(direct, .1)) / 2, (pct(via, .99) - pct(direct, .5)) / 2)
        print(f"added one-way latency p10/p99: 0 ms: {res[0.0][0]:.3f}/{res[0.0][1]:.3f} ms; "
              f"0.5 ms: {res[0.5][0]:.3f}/{res[0.5][1]:.3f} ms")
        # The configured delay is added (above the relay's own cost), not rounded to a millisecond.
        assert 0.45 <= res[0.5][0] - res[0.0][0] <= 0.65, res
        link("set", delay_ms=0, rate_mbit=40)
        n, chunk = 48, 1 << 18
        with connect(link.address) as s:
            got = [0]

            def drain():
                while got[0] < n * chunk:
                    got[0] += len(s.recv(1 << 20))

            t0 = time.perf_counter()
            reader = threading.Thread(target=drain)
            reader.start()
            for _ in range(n):
                s.sendall(b"r" * chunk)
            reader.join(60)
            mbit = n * chunk * 8 / (time.perf_counter() - t0) / 1e6
        print(f"throughput at a 40 Mbit/s cap: {mbit:.1f} Mbit/s")
        assert 0.85 * 40 <= mbit <= 1.05 * 40
    finally:
        link.close()


def test_cut_resets_and_refuses_until_healed_blackhole_keeps_tcp_up(tmp_path, echo):
    link = LinkProcess(tmp_path, echo.address)
    try:
        s = connect(link.address)
        s.sendall(b"hello")
        assert s.recv(5) == b"hello"
        link("cut")
        with pytest.raises(ConnectionError):  # reset, not a polite FIN
            s.sendall(b"x")
            s.recv(1) or s.sendall(b"y" * 65536)
        with pytest.raises(ConnectionError):
            with connect(link.address) as t:
                t.sendall(b"z")
                if not t.recv(1):
                    raise ConnectionResetError("closed")
        st = link("heal")
        assert st["refused"] >= 1 and not st["cut"]
        with connect(link.address) as t:
            t.sendall(b"again")
            assert t.recv(5) == b"again"
            link("blackhole")
            t.sendall(b"lost")
            t.settimeout(0.5)
            with pytest.raises(socket.timeout):  # TCP is up; nothing comes back
                t.recv(1)
            st = link("stats")
            assert st["connections"] == 1 and st["directions"]["c2s"]["dropped_bytes"] >= 4
            link("heal")
            t.settimeout(10)
            t.sendall(b"back")
            assert t.recv(4) == b"back"  # the blackholed bytes are gone for good
    finally:
        link.close()


def test_signals_cut_and_heal_and_bad_requests(tmp_path, echo):
    link = LinkProcess(tmp_path, echo.address)
    try:
        link.proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: link("stats")["cut"], 10, "SIGUSR1 to cut the link")
        link.proc.send_signal(signal.SIGUSR2)
        wait_for(lambda: not link("stats")["cut"], 10, "SIGUSR2 to heal it")
        reply = ctl.request(link.control, {"cmd": "bogus"})
        assert reply == {"ok": False, "error": "unknown command 'bogus'"}
        reply = ctl.request(link.control, {"cmd": "set", "delay_ms": -1})
        assert not reply["ok"] and "out of range" in reply["error"]
    finally:
        link.close()


@pytest.mark.parametrize("fault", ["duplicate", "flip"])
def test_tls_detects_a_duplicated_chunk_and_a_flipped_byte(tmp_path, fault, seed):
    pki = tmp_path / "pki"
    init_pki(pki)
    srv = Echo(server_context(pki, "appliance"))
    try:
        with LinkEmulator(("127.0.0.1", 0), srv.address, seed=seed) as link:
            raw = connect(link.address)
            with client_context(pki, "card").wrap_socket(raw, server_hostname="127.0.0.1") as s:
                s.sendall(b"before")
                assert s.recv(6) == b"before"
                getattr(link, fault)("c2s")
                s.sendall(b"after" * 100)
                wait_for(lambda: srv.errors, 10, "the TLS server to notice")
                st = link.stats()["directions"]["c2s"]
                assert st["duplicated"] == 1 if fault == "duplicate" else len(st["flipped"]) == 1
        (err,) = srv.errors
        print(f"{fault}: {err!r}")
        assert isinstance(err, ssl.SSLError), err  # a record that fails authentication, never data
    finally:
        srv.close()


def test_command_line_errors_are_one_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "nicsplit.testing.linkemu", "--listen", "nonsense", "--to", "127.0.0.1:1"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "is not HOST:PORT" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "-m", "nicsplit.testing.linkemu", "--listen", "127.0.0.1:0", "--to",
                        "127.0.0.1:1", "--jitter-ms", "-2"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "out of range" in p.stderr, p.stderr
