"""Issue 11, item 1: acked writes were lost with no trace when `nicsplit up`
stopped while the appliance was down. The supervisor stops the host first;
the card then could not make the writes durable and said "the host marks
them", but no host was left to mark. Now the card writes them to its
lost-writes log, and the next host start reads what was added while no host
ran, marks those regions and resyncs them: the latest PIT equals production.
Real processes (`nicsplit up` twice), a real client (libnbd), qemu-img."""

from __future__ import annotations

import json
import os
import signal

import pytest

from nicsplit.core.layout import Layout
from nicsplit.testing.ledger import BS, block
from nicsplit.testing.procs import UpProcess, journal, nbd_connect, run_cli, wait_for
from nicsplit.testing.stack import cg_data, latest_pit_equals_production

pytestmark = pytest.mark.usefixtures("peers")


def vdisk_states(data) -> dict[str, str]:
    (cg,) = json.loads(run_cli(data, "status", "--json").stdout)["cgs"]
    return {v["name"]: v["state"] for v in cg["vdisks"]}


@pytest.mark.timeout(300)
def test_writes_acked_while_the_appliance_is_down_survive_a_stop(tmp_path):
    data = cg_data(tmp_path, names=("a",), timeout_us=1000)
    with UpProcess(data) as up:
        h = nbd_connect(up.uri("a"))
        for i in range(8):
            h.pwrite(block(i), i * BS)
        wait_for(lambda: len(journal(data, "cg1")) >= 8, 60, "the first writes journaled", interval=0.1)
        appliance = up.pid_of("appliance")
        card = up.pid_of("card")
        os.kill(appliance, signal.SIGSTOP)
        try:
            for i in range(8, 24):  # acked to the client; the appliance never sees them before the stop
                h.pwrite(block(i), i * BS)
            h.shutdown()
            # `up` stops the host, then the card (which gives up draining), then the appliance.
            up.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: not os.path.exists(f"/proc/{card}"), 120, "the card to stop", interval=0.2)
        finally:
            os.kill(appliance, signal.SIGCONT)
        assert up.proc.wait(120) == 0
    lost = [json.loads(x) for x in Layout(data).card_lost_log.read_text().splitlines()]
    assert {x["offset"] for x in lost} >= {i * BS for i in range(8, 24)}, lost
    with UpProcess(data) as up:
        wait_for(lambda: set(vdisk_states(data).values()) == {"protected"}, 120,
                 "a resynced and protected again by itself", interval=0.2)
        latest_pit_equals_production(data, "cg1", "a", up.uri("a"), tmp_path)
        # A third start does not mark again what the second one resynced.
    with UpProcess(data) as up:
        host = run_cli(data, "status", "--json").stdout
        assert set(vdisk_states(data).values()) == {"protected"}, host
