"""A start as slow as a big journal's recovery: the appliance prints
``{"event": "starting"}`` progress lines while it recovers, and `nicsplit up`
waits on (each line gives it the ready timeout again), naming the step in
its log. Before, the supervisor gave every child 30 s in all, and an
appliance recovering a journal of ~30 s refused to start. The slowness is
the ``appliance.recover-journal`` failpoint's delay, on a real journal."""

from __future__ import annotations

import time

import pytest

from nicsplit.appliance import startup
from nicsplit.core import failpoints as fp
from nicsplit.testing.ledger import block
from nicsplit.testing.procs import UpProcess, journal, nbd_connect, wait_for
from nicsplit.testing.stack import cg_data

pytestmark = pytest.mark.usefixtures("peers")

SIZE = 8 << 20


def test_a_slow_journal_recovery_reports_progress_and_up_waits(tmp_path, monkeypatch):
    data = cg_data(tmp_path, SIZE, ("a",))
    with UpProcess(data) as up:
        h = nbd_connect(up.uri("a"))
        for i in range(4):
            h.pwrite(block(i), i * 4096)
        wait_for(lambda: len(journal(data, "cg1")) >= 4, 60, "the writes journaled", interval=0.1)
        h.shutdown()
    delay_s = startup.STARTING_EVERY_S + 2  # at least one progress line before the journal is open
    monkeypatch.setenv(fp.ENV, f"appliance.recover-journal=1*delay({int(delay_s * 1000)})")
    t0 = time.monotonic()
    with UpProcess(data) as up:
        took = time.monotonic() - t0
        log = up.log()
        assert took >= delay_s, took
        assert "appliance still starting" in log and "recovering journal cg1" in log, log
        h = nbd_connect(up.uri("a"))
        assert h.pread(4096, 3 * 4096) == block(3)  # and it serves what it had
        h.shutdown()
    print(f"up started in {took:.1f} s with a {delay_s:.0f} s journal recovery")
