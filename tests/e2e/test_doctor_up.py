"""`nicsplit doctor` while `nicsplit up` runs: the ports the configuration
names are held by our own processes (found through their pid files and
/proc), which is fine; the card's hidden volume is in place; the CG's
journal scans clean. After `up` stops, a pid file left behind is reported
stale, naming it."""

from __future__ import annotations

import json
import socket

import pytest

from nicsplit.testing.procs import UpProcess, nbd_connect, run_cli
from nicsplit.testing.stack import cg_data

pytestmark = pytest.mark.usefixtures("peers")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.mark.timeout(300)
def test_doctor_sees_our_own_processes_on_the_configured_ports(tmp_path):
    data = cg_data(tmp_path, 4 << 20, names=("a",))
    ports = dict(zip(("host", "appliance", "console"), _free_ports(3)))
    cfg = data / "nicsplit.toml"
    text = cfg.read_text()
    text = text.replace('listen = "127.0.0.1:10809"', f'listen = "127.0.0.1:{ports["host"]}"')
    text = text.replace('listen = "127.0.0.1:10810"', f'listen = "127.0.0.1:{ports["appliance"]}"')
    text = text.replace('listen = "127.0.0.1:10811"', f'listen = "127.0.0.1:{ports["console"]}"')
    cfg.write_text(text)
    args = ("--listen", f"127.0.0.1:{ports['host']}", "--appliance-listen", f"127.0.0.1:{ports['appliance']}",
            "--console-listen", f"127.0.0.1:{ports['console']}")
    with UpProcess(data, *args) as up:
        h = nbd_connect(up.uri("a"))
        h.pwrite(b"\x11" * 4096, 0)
        run_cli(data, "bookmark", "cg1", "b")
        h.shutdown()
        p = run_cli(data, "doctor", "--json", check=False)
        doc = json.loads(p.stdout)
        assert p.returncode == 0, doc
        by = {}
        for r in doc["results"]:
            by.setdefault(r["check"], []).append(r)
        for name in ("host", "appliance", "console"):
            assert any(f"held by our running {name} (pid " in r["message"] for r in by["ports"]), by["ports"]
        assert by["shm"][0]["level"] == "ok" and "the running card" in by["shm"][0]["message"], by["shm"]
        assert [r["level"] for r in by["journal"]] == ["ok"] and by["journal"][0]["message"].startswith("cg1: ")
        assert by["pidfiles"][0]["level"] == "ok"
        card_pid = up.pid_of("card")
    # up is gone; a pid file left behind (as after a kill -9 of up) is stale
    stale = data / "run" / "card.pid"
    stale.write_text(str(card_pid))
    doc = json.loads(run_cli(data, "doctor", "--json", check=False).stdout)
    (pf,) = [r for r in doc["results"] if r["check"] == "pidfiles"]
    assert pf["level"] == "warn" and str(stale) in pf["fix"], pf
