"""A host the supervisor restarts keeps its NBD address (found by the fault
soak, seed 20261202 case 2: with ``up --listen 127.0.0.1:0`` the restarted
host picked a new free port, so every client reconnecting to the address
``up`` printed found nothing: service lost until an operator looked up the
new port). Real processes and libnbd."""

from __future__ import annotations

import os
import signal

import pytest

from nicsplit.testing.procs import UpProcess, nbd_connect, wait_for
from nicsplit.testing.stack import cg_data

pytestmark = pytest.mark.usefixtures("peers")


def test_killed_host_comes_back_on_the_same_port(tmp_path, rng):
    data = cg_data(tmp_path, 8 << 20, ("a",))
    block = rng.randbytes(4096)
    with UpProcess(data) as up:
        h = nbd_connect(up.uri("a"))
        h.pwrite(block, 4096)
        h.flush()
        h.shutdown()
        for _ in range(2):  # the second restart too: the address must not drift
            pid = up.pid_of("host")
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: up.pid_of("host") != pid, 60, "the supervisor restarting the host", interval=0.05)

            def reconnects():
                try:
                    return nbd_connect(up.uri("a"))
                except Exception:  # not listening yet
                    return None

            h = wait_for(reconnects, 60, f"the host listening again on {up.uri('a')}", interval=0.1)
            assert h.pread(4096, 4096) == block
            h.shutdown()
