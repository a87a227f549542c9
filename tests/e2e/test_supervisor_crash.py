"""`nicsplit up` killed with -9 leaves no orphans, and the next `up` starts
(issue 11 item 9: host, card and appliance ran on holding their ports; the
next `up` failed with "journal … in use" without naming a pid and
overwrote appliance.pid). Real processes throughout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nicsplit.core.procutil import runs
from nicsplit.testing.procs import UpProcess, nbd_connect, run_cli, wait_for
from nicsplit.testing.stack import cg_data

pytestmark = pytest.mark.usefixtures("peers")

SIZE = 8 << 20
CHILDREN = ("appliance", "card", "host")


def _kill_survivors(pids: list[int]) -> None:
    """Clean up after a failure: SIGKILL the children we started that live on."""
    for pid in pids:
        if runs(pid, "nicsplit"):
            os.kill(pid, signal.SIGKILL)


def test_children_die_with_a_killed_supervisor_and_up_starts_again(tmp_path: Path, rng):
    data = cg_data(tmp_path, SIZE, ("a",))
    block = rng.randbytes(4096)
    up = UpProcess(data).start()
    pids = [up.ready["processes"][n]["pid"] for n in CHILDREN]
    try:
        assert all(runs(p, "nicsplit") for p in pids)
        h = nbd_connect(up.uri("a"))
        h.pwrite(block, 0)
        h.flush()
        h.shutdown()
        up.kill()  # kill -9 of the supervisor alone; the children are not signalled by anyone
        wait_for(lambda: not any(runs(p, "nicsplit") for p in pids), 60,
                 f"the children {pids} exiting after their supervisor died")
    finally:
        up.kill()
        _kill_survivors(pids)
    assert (data / "run" / "up.pid").exists()  # left by the killed supervisor: stale
    with UpProcess(data) as again:
        assert [again.ready["processes"][n]["pid"] for n in CHILDREN] != pids
        assert again.pid_of("appliance") == again.ready["processes"]["appliance"]["pid"]
        assert int((data / "run" / "up.pid").read_text()) == again.proc.pid
        h = nbd_connect(again.uri("a"))
        assert h.pread(4096, 0) == block
        h.shutdown()


def test_up_names_a_live_process_and_removes_stale_pid_files(tmp_path: Path):
    data = cg_data(tmp_path, SIZE, ("a",))
    run = data / "run"
    run.mkdir(exist_ok=True)
    # a process whose command line says nicsplit, as an orphaned appliance's does; it waits on stdin
    stand_in = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()", "nicsplit", "appliance"],
                                stdin=subprocess.PIPE)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    try:
        (run / "appliance.pid").write_text(str(stand_in.pid))
        (run / "card.pid").write_text(str(gone.pid))  # its process is gone
        (run / "up.pid").write_text("not a pid")
        p = run_cli(data, "up", "--listen", "127.0.0.1:0", "--appliance-listen", "127.0.0.1:0", "--console-listen", "127.0.0.1:0", check=False,
                    timeout=60)
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
        err = p.stderr.strip().splitlines()[-1]  # one error line (after the log line about stale files)
        assert err.startswith("nicsplit: error: processes of an earlier nicsplit up"), err
        assert f"appliance (pid {stand_in.pid}" in err and f"kill {stand_in.pid}" in err, err
        assert (run / "appliance.pid").read_text() == str(stand_in.pid)  # not overwritten
        assert not (run / "card.pid").exists() and not (run / "up.pid").exists()
    finally:
        stand_in.stdin.close()
        stand_in.wait(30)
