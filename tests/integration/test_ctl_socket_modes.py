"""Issue 11: host.sock and appliance.sock are 0600 even under umask 000
(real processes)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from nicsplit.testing.appliance import ApplianceProcess
from nicsplit.testing.datadir import init_data
from nicsplit.testing.procs import HostProcess, run_cli


def test_control_sockets_are_0600_whatever_the_umask(tmp_path: Path):
    data = init_data(tmp_path / "d")
    run_cli(data, "vdisk", "create", "a", "--size", "1M")
    old = os.umask(0)  # the children inherit it
    try:
        host, app = HostProcess(data), ApplianceProcess(data)
        host.start()
        app.start()
    finally:
        os.umask(old)
    try:
        for name in ("host.sock", "appliance.sock"):
            assert stat.S_IMODE(os.stat(data / "run" / name).st_mode) == 0o600, name
    finally:
        assert app.stop() == 0
        assert host.stop() == 0
