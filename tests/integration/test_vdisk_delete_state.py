"""Issue 11: `vdisk delete` of a CG member removes its dirty bitmap and
marking state (DATA/host/marking/UUID.*), and only its own."""

from __future__ import annotations

import json
from pathlib import Path

from nicsplit.testing.datadir import init_data
from nicsplit.testing.procs import HostProcess, run_cli


def test_delete_removes_the_members_bitmap_and_state(tmp_path: Path):
    data = init_data(tmp_path / "d")
    run_cli(data, "cg", "create", "db")
    for name in ("a", "b"):
        run_cli(data, "vdisk", "create", name, "--size", "1M", "--cg", "db")
    with HostProcess(data):  # the splitter creates each member's bitmap and state file
        pass
    uuids = {v["name"]: v["uuid"] for v in json.loads(run_cli(data, "vdisk", "list", "--json").stdout)["vdisks"]}
    marking = data / "host" / "marking"
    for name in ("a", "b"):
        assert (marking / f"{uuids[name]}.bitmap").exists() and (marking / f"{uuids[name]}.state.json").exists()
    run_cli(data, "vdisk", "delete", "a")
    assert sorted(p.name for p in marking.iterdir()) == sorted([f"{uuids['b']}.bitmap", f"{uuids['b']}.state.json"])
