"""``[card] acker_core = "dedicated"`` under `nicsplit up`: the acker polls
its ring without ever sleeping, as on a DPU's core, and nothing else runs on
its CPU — the host, the appliance, the console, the card's pipeline worker
(a restarted one too) and the acker's own control-socket thread, which a
real-time poller that never yields would otherwise starve (the host could
not attach). Real processes, a real client (qemu-io); the CPU sets and
scheduling classes are read back from /proc, the polling from the acker's
own counters, and the journal must hold what the client wrote."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from nicsplit.core.ctl import request
from nicsplit.core.layout import Layout
from nicsplit.testing.procs import UpProcess, cpus_allowed, wait_for
from nicsplit.testing.stack import cg_data, latest_pit_equals_production, wait_caught_up

pytestmark = pytest.mark.usefixtures("peers")

SIZE = 8 << 20


def handoff_stats(data: Path) -> dict:
    got: dict = {}

    def ask() -> bool:
        got.update(((request(Layout(data).card_ctl_sock, {"cmd": "stats"}) or {}).get("stats") or {}))
        return bool(got)

    wait_for(ask, 30, "the card's stats", interval=0.05)
    return got


def qemu_write(uri: str, pattern: int, offset: int, length: str) -> None:
    subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P {pattern:#x} {offset} {length}", uri],
                   check=True, capture_output=True, timeout=120)


def other_threads(pid: int) -> list[int]:
    """The threads of ``pid`` but its main one (the acker's: the control socket's)."""
    return [int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid]


def test_dedicated_acker_polls_and_keeps_its_core_to_itself(tmp_path):
    allowed = os.sched_getaffinity(0)
    data = cg_data(tmp_path, SIZE, ("a",), timeout_us=1000, sections={"card": {"acker_core": "dedicated"}})
    if len(allowed) < 2:  # nothing to dedicate: a clear refusal at start, not a starved card
        with pytest.raises(RuntimeError, match="leaves no CPU for the host"):
            UpProcess(data).start()
        return
    with UpProcess(data) as up:
        card = up.pid_of("card")
        acker = cpus_allowed(card)
        assert acker == {max(allowed)}, acker
        qemu_write(up.uri("a"), 0x5A, 0, "1M")  # the host attached and split these
        wait_caught_up(data)
        latest_pit_equals_production(data, "cg1", "a", up.uri("a"), tmp_path)

        st = handoff_stats(data)
        worker = st["worker_pid"]
        for name, pid in (("host", up.pid_of("host")), ("appliance", up.pid_of("appliance")),
                          ("console", up.pid_of("console")), ("worker", worker)):
            assert not cpus_allowed(pid) & acker, f"the {name} may run on the acker's CPU {acker}"
        helpers = other_threads(card)
        assert helpers, "the acker has no control-socket thread"
        for tid in helpers:
            assert not cpus_allowed(card, tid) & acker
            assert os.sched_getscheduler(tid) == os.SCHED_OTHER

        # Idle, it polls: its empty-poll time grows and it never sleeps on the doorbell.
        h0 = st["endpoint"]["handoff"]
        wait_for(lambda: handoff_stats(data)["endpoint"]["handoff"]["acker_empty_poll_s"]
                 > h0["acker_empty_poll_s"] + 0.3, 30, "0.3 s more of the acker's polling", interval=0.05)
        assert handoff_stats(data)["endpoint"]["handoff"]["acker_sleeps"] == h0["acker_sleeps"]

        # A worker restarted by the never-sleeping acker starts (off its core) and ships.
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: handoff_stats(data)["worker_pid"] != worker, 60, "a new pipeline worker", interval=0.05)
        new = handoff_stats(data)["worker_pid"]
        assert not cpus_allowed(new) & acker
        qemu_write(up.uri("a"), 0xA5, 1 << 20, "1M")
        wait_caught_up(data)
        latest_pit_equals_production(data, "cg1", "a", up.uri("a"), tmp_path)
        assert up.pid_of("card") == card
