"""`nicsplit up` keeps the host's threads off the card acker's CPU(s) when
the machine has more than one (nicsplit.core.placement): a host thread on
the real-time acker's core makes every QD1 write a doorbell wake-up
(docs/benchmarks.md, "QD1: where the microseconds go"). Real processes;
the sets are read back from /proc."""

from __future__ import annotations

import os

import pytest

from nicsplit.testing.procs import UpProcess, cpus_allowed, nbd_connect
from nicsplit.testing.stack import cg_data

pytestmark = pytest.mark.usefixtures("peers")


def test_host_threads_keep_off_the_acker_cpu(tmp_path, rng):
    data = cg_data(tmp_path, 8 << 20, ("a",))
    allowed = os.sched_getaffinity(0)
    with UpProcess(data) as up:
        h = nbd_connect(up.uri("a"))  # the host has started its serving threads
        h.pwrite(rng.randbytes(4096), 0)
        h.flush()
        acker = cpus_allowed(up.pid_of("card"))
        host = up.pid_of("host")
        threads = [int(t) for t in os.listdir(f"/proc/{host}/task")]
        if len(allowed) > 1:
            assert acker == {max(allowed)}, acker
            for tid in threads:
                got = cpus_allowed(host, tid)
                assert got and not got & acker, f"host thread {tid} may run on {got}, the acker is on {acker}"
                assert got == allowed - acker
            # The appliance is not pinned by default.
            assert cpus_allowed(up.pid_of("appliance")) == allowed
        else:  # one CPU: nothing to keep apart, nobody pinned away from it
            assert cpus_allowed(host) == allowed
        h.shutdown()


def test_placement_keys_host_everywhere_appliance_off_the_acker(tmp_path):
    """`[host] cpus = []` leaves the host unpinned; `[appliance] cpus = "auto"`
    keeps the appliance off the acker's CPU (and the appliance starts with it)."""
    data = cg_data(tmp_path, 8 << 20, ("a",), sections={"appliance": {"cpus": "auto"}}, cpus=[])
    allowed = os.sched_getaffinity(0)
    with UpProcess(data) as up:
        acker = cpus_allowed(up.pid_of("card"))
        assert cpus_allowed(up.pid_of("host")) == allowed
        want = allowed - acker if len(allowed) > 1 else allowed
        assert cpus_allowed(up.pid_of("appliance")) == want
