"""Issue 11: a bad NBD handshake logs one line (no traceback), and the logs of
the processes `nicsplit up` supervises rotate by size."""

from __future__ import annotations

import socket
from pathlib import Path

from nicsplit.testing.datadir import init_data
from nicsplit.testing.procs import HostProcess, UpProcess, nbd_connect, run_cli, wait_for

GARBAGE = b"GET / HTTP/1.1\r\n\r\n"


def _bad_handshakes(port: int, n: int) -> None:
    for _ in range(n):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.recv(18)  # the server's greeting
            s.sendall(GARBAGE)
            while s.recv(4096):  # the server closes on us
                pass


def _logs(path: Path) -> list[Path]:
    return sorted(path.parent.glob(path.name + "*"))


def test_bad_handshakes_log_one_line_each_and_the_log_rotates(tmp_path: Path):
    data = init_data(tmp_path / "d")
    run_cli(data, "vdisk", "create", "a", "--size", "1M")
    log = tmp_path / "logs" / "host.log"
    with HostProcess(data, "--log-file", str(log), "--log-max", "4K", "--log-keep", "3") as host:
        _bad_handshakes(host.port, 100)
        wait_for(lambda: sum(p.read_text().count("closing connection") for p in _logs(log)) >= 100, 20,
                 "100 refusals logged")
        h = nbd_connect(host.uri("a"))  # the host serves on
        assert h.get_size() == 1 << 20
        h.shutdown()
    files = _logs(log)
    assert files[0].name == "host.log" and 2 <= len(files) <= 4, files  # rotated; at most keep = 3 old files
    text = "".join(p.read_text() for p in files)
    assert "Traceback" not in text and "Fatal error" not in text, text[-3000:]
    assert text.count("closing connection: unknown client flags") == 100
    assert all(p.stat().st_size <= 4096 for p in files)


def test_up_gives_each_process_a_rotated_log(tmp_path: Path):
    data = init_data(tmp_path / "d", sections={"logs": {"max_size": "4K", "keep": 2}})
    with UpProcess(data) as up:
        _bad_handshakes(up.port, 60)
        host_log = data / "run" / "host.log"
        wait_for(lambda: (data / "run" / "host.log.2").exists(), 20, "the host's log to rotate twice")
        assert not (data / "run" / "host.log.3").exists()  # keep = 2
        assert all(p.stat().st_size <= 4096 for p in _logs(host_log))
        for name in ("appliance", "card"):
            assert (data / "run" / f"{name}.log").stat().st_size > 0
        assert up.stop() == 0
    assert "Traceback" not in "".join(p.read_text() for p in _logs(data / "run" / "host.log"))
