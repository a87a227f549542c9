"""Issue 11 item 2, the whole stack (`nicsplit up`: real host, card and
appliance): a CG whose name an earlier version let in (`_x`, in cgs.json and
the catalog as that version wrote them) is never shipped, and status says
so, while the good CG beside it is journaled as before."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest

from nicsplit.testing.procs import UpProcess, journal, nbd_connect, run_cli, wait_for
from nicsplit.testing.stack import cg_data

pytestmark = pytest.mark.usefixtures("peers")


def _legacy_cg(data: Path, cg: str, vdisk: str) -> None:
    """Put ``vdisk`` into a CG named ``cg`` the way an earlier version did (no name check)."""
    cgs_path = data / "cgs.json"
    cgs = json.loads(cgs_path.read_text())
    cgs["cgs"][cg] = {"id": cgs["next_id"], "uuid": str(uuid.uuid4()), "created": time.time()}
    cgs["next_id"] += 1
    cgs_path.write_text(json.dumps(cgs))
    cat_path = data / "datastore" / "catalog.json"
    cat = json.loads(cat_path.read_text())
    (v,) = [v for v in cat["vdisks"] if v["name"] == vdisk]
    v["extra"]["cg"] = cg
    cat_path.write_text(json.dumps(cat))


def test_a_bad_cg_name_never_blocks_the_good_cg(tmp_path: Path):
    data = cg_data(tmp_path, 8 << 20, ("a",))
    run_cli(data, "vdisk", "create", "x", "--size", "8M")
    _legacy_cg(data, "_x", "x")
    with UpProcess(data) as up:
        for name, byte in (("x", 0x11), ("a", 0x22), ("x", 0x33), ("a", 0x44)):
            h = nbd_connect(up.uri(name))
            h.pwrite(bytes([byte]) * 65536, 0)
            h.flush()
            h.shutdown()
        wait_for(lambda: len([r for r in journal(data, "cg1") if r["op"] == "write"]) >= 2, 60,
                 "both writes of the good CG journaled", interval=0.2)

        def cgs() -> dict:
            return {c["name"]: c for c in json.loads(run_cli(data, "status", "--json").stdout)["cgs"]}

        wait_for(lambda: cgs()["_x"]["state"] == "refused", 30, "the bad CG shown refused", interval=0.2)
        st = cgs()
        assert "bad CG name" in st["_x"]["refused"]
        assert st["cg1"]["state"] == "protected"
        stats = json.loads(run_cli(data, "card", "stats").stdout)
        assert stats["appliance"]["connected"] is True
        assert list(stats["stages"]["ship"]["refused_cgs"]) == ["_x"]
        assert up.stop() == 0
    assert not (data / "appliance" / "journal" / "_x").exists()
    assert "Traceback" not in up.log()
