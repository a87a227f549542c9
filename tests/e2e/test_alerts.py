"""Issue 13 acceptance: "An alert fires when the appliance is stopped for
longer than the RPO target, and clears when it returns", and the status JSON
schema on a live deployment with writes.

Real `nicsplit up` (host, card, appliance, console) on free ports, a real
client (qemu-io, paced by its own ``sleep`` command) and a webhook receiver
of the test's own: the console's alert loop must POST "fire" while the
appliance is stopped (SIGSTOP) and "clear" once it runs again (SIGCONT)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from nicsplit.control.schema import check
from nicsplit.testing.datadir import init_data
from nicsplit.testing.procs import UpProcess, run_cli, wait_for

pytestmark = pytest.mark.usefixtures("peers")

RPO_TARGET_S = 2
WRITE = 64 << 10
SIZE = 64 << 20


class Hook:
    """A webhook receiver on a free port: keeps every JSON body it is sent."""

    def __init__(self) -> None:
        events = self.events = []
        lock = self.lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    events.append(body)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, name="webhook", daemon=True)
        self.thread.start()

    def seen(self, event: str, name: str) -> list[dict]:
        with self.lock:
            return [e for e in self.events if e["event"] == event and e["alert"]["name"] == name]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _status(data: Path) -> dict:
    doc = json.loads(run_cli(data, "status", "--json").stdout)
    assert check(doc) == [], check(doc)  # every document on the way conforms
    return doc


def _alerts(doc: dict) -> set[str]:
    return {a["name"] for a in doc["alerts"]}


def _status_when(data: Path, cond) -> dict | None:
    doc = _status(data)
    return doc if cond(_alerts(doc)) else None


def _writer(uri: str, seed: int, seconds: float, interval_ms: int = 200) -> subprocess.Popen:
    """qemu-io writing a 64 KiB block every ``interval_ms`` for about ``seconds``."""
    cmds: list[str] = []
    for i in range(int(seconds * 1000 / interval_ms)):
        off = ((seed + i * 7919) % (SIZE // WRITE)) * WRITE
        cmds += ["-c", f"write -P {(seed + i) % 250 + 1} {off} {WRITE}", "-c", f"sleep {interval_ms}"]
    return subprocess.Popen(["qemu-io", "-f", "raw", *cmds, uri], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_rpo_alert_fires_while_the_appliance_is_stopped_and_clears_when_it_returns(tmp_path, rng):
    hook = Hook()
    try:
        data = init_data(tmp_path / "data", sections={"alerts": {"rpo_target": f"{RPO_TARGET_S}s", "webhook": hook.url,
                                                                   "interval": "1s"}})
        run_cli(data, "cg", "create", "cg1")
        run_cli(data, "vdisk", "create", "a", "--size", str(SIZE), "--cg", "cg1")
        with UpProcess(data) as up:
            seed = rng.randrange(1 << 16)
            first = subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P 7 0 {4 * WRITE}", up.uri("a")],
                                   capture_output=True, text=True, timeout=60)
            assert first.returncode == 0, first.stderr
            wait_for(lambda: (_status(data)["cgs"][0]["throughput"]["out_bytes_total"] or 0) > 0, 30,
                     "the first writes shipped")
            assert not _alerts(_status(data)) & {"rpo_above_target", "appliance_down"}

            writer = _writer(up.uri("a"), seed, seconds=25)
            appliance = up.pid_of("appliance")
            try:
                wait_for(lambda: (_status(data)["cgs"][0]["throughput"]["in_bytes_total"] or 0) > 4 * WRITE, 30,
                         "the writer's first writes at the card")
                os.kill(appliance, signal.SIGSTOP)
                stopped = time.monotonic()
                try:
                    doc = wait_for(lambda: _status_when(data, lambda a: "rpo_above_target" in a), 60,
                                   "status to show rpo_above_target", interval=0.5)
                    cg = doc["cgs"][0]
                    print(f"\nappliance stopped {time.monotonic() - stopped:.1f}s: rpo {cg['rpo_seconds']:.1f}s / "
                          f"{cg['rpo_bytes']} bytes; alerts {sorted(_alerts(doc))}")
                    assert cg["rpo_seconds"] > RPO_TARGET_S and cg["rpo_bytes"] > 0, cg
                    # A stopped appliance does not answer its control socket: down, as far as anyone can tell.
                    assert "appliance_down" in _alerts(doc) and not doc["processes"]["appliance"]["answering"], doc
                    fired = wait_for(lambda: hook.seen("fire", "rpo_above_target"), 30, "the webhook's fire", interval=0.2)
                    assert fired[0]["alert"]["cg"] == "cg1" and fired[0]["alert"]["since"] <= fired[0]["time"], fired
                    assert not hook.seen("clear", "rpo_above_target")
                finally:
                    os.kill(appliance, signal.SIGCONT)
                resumed = time.monotonic()
                wait_for(lambda: _status_when(data, lambda a: not a & {"rpo_above_target", "appliance_down"}), 60,
                         "the alerts to clear", interval=0.5)
                wait_for(lambda: hook.seen("clear", "rpo_above_target"), 30, "the webhook's clear", interval=0.2)
                if hook.seen("fire", "appliance_down"):
                    wait_for(lambda: hook.seen("clear", "appliance_down"), 30, "appliance_down cleared", interval=0.2)
                print(f"cleared in status and at the webhook {time.monotonic() - resumed:.1f}s after SIGCONT; "
                      f"webhook events: {[(e['event'], e['alert']['name'], e['alert']['severity']) for e in hook.events]}")
            finally:
                if writer.poll() is None:
                    writer.wait(60)
            assert writer.returncode == 0, writer.stderr.read().decode() if writer.stderr else ""

            # A live document after writes: every per-CG measure has a value.
            run_cli(data, "bookmark", "cg1", "after-outage")
            doc = _status(data)
            cg = doc["cgs"][0]
            tp = cg["throughput"]
            assert tp["in_bytes_total"] >= 4 * WRITE and tp["out_bytes_total"] > 0, tp
            assert tp["in_bytes_per_s"] is not None and tp["out_bytes_per_s"] is not None, tp
            assert cg["compression_ratio"] > 1 and cg["dedup_ratio"] >= 1, cg  # patterned blocks compress
            assert cg["split_latency_us"]["p50"] > 0 and cg["split_latency_us"]["p99"] >= cg["split_latency_us"]["p50"]
            assert cg["vdisks"][0]["split_latency_us"]["p50"] > 0, cg["vdisks"][0]
            assert cg["journal_bytes"] > 0 and cg["protection_window"]["base_seq"] == 0, cg
            assert cg["last_bookmark"]["name"] == "after-outage" and cg["last_bookmark"]["seq"] > 0, cg
            assert cg["state"] == "protected" and cg["rpo_bytes"] == 0, cg
            assert 0 <= doc["card"]["hidden_volume_fill"] <= 1 and 0 <= doc["card"]["overflow_fill"] <= 1, doc["card"]
            assert doc["alerts"] == [], doc["alerts"]
            text = run_cli(data, "status").stdout
            assert "after-outage" in text and "alerts: none" in text, text
    finally:
        hook.close()
