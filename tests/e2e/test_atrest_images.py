"""At-rest encryption of the replica (docs/recovery.md §13) with the whole
system running: what production wrote is nowhere in clear under the
appliance's directory, the replica still equals production, and a key
rotation is followed by the appliance re-sealing the replica and its undo log
under the new key, after which only the journal segments keep the old key."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest


from nicsplit.testing.procs import UpProcess, nbd_connect, run_cli, wait_for
from nicsplit.testing.stack import cg_data, one_line_error, replica_in_clear, wait_caught_up

pytestmark = pytest.mark.usefixtures("peers")

SIZE = 8 << 20


def _keys(data: Path) -> dict[int, dict]:
    out = json.loads(run_cli(data, "appliance", "keys", "--json").stdout)
    return {k["id"]: k for k in out["keys"]}


def _markers_in_clear(root: Path, markers: list[bytes]) -> list[str]:
    """Files under ``root`` holding any of the marker blocks byte for byte."""
    hits = []
    for p in sorted(root.rglob("*")):
        if p.is_file():
            blob = p.read_bytes()
            hits += [f"{p.relative_to(root)}" for m in markers if m in blob]
    return hits


def test_replica_sealed_at_rest_and_resealed_after_rotation(tmp_path: Path, rng: random.Random):
    data = cg_data(tmp_path, SIZE, ("a",))
    markers = [rng.randbytes(4096) for _ in range(16)]
    with UpProcess(data) as up:
        h = nbd_connect(up.uri("a"))
        for i, m in enumerate(markers):
            h.pwrite(m, (i * 37 % (SIZE // 4096)) * 4096)
        h.flush()
        h.shutdown()
        wait_caught_up(data)
        leaked = _markers_in_clear(data / "appliance", markers)
        assert leaked == [], f"written blocks in clear at rest: {leaked}"
        before = _keys(data)
        assert before[1]["active"] and before[1]["image_blocks"] >= len(markers), before

        rotated = json.loads(run_cli(data, "appliance", "rotate-key", "--json").stdout)
        assert rotated == {"key_id": 2, "previous": 1}
        h = nbd_connect(up.uri("a"))  # more writes: the next distribution cycle re-seals
        h.pwrite(rng.randbytes(65536), 1 << 20)
        h.flush()
        h.shutdown()

        def resealed() -> bool:
            k = _keys(data)
            return k[1]["image_blocks"] == 0 and k[2]["image_blocks"] > 0

        wait_for(resealed, 60, "the appliance to re-seal the replica under key 2", interval=0.2)
        wait_caught_up(data)
        after = _keys(data)
        assert after[2]["active"] and after[1]["segments"] > 0, after  # journal segments keep key 1
        err = one_line_error(data, "appliance", "retire-key", "1")
        assert "key 1 still encrypts" in err, err
        p = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(replica_in_clear(data, "a", tmp_path)),
                            up.uri("a")], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stdout + p.stderr  # the re-sealed replica still equals production
        assert _markers_in_clear(data / "appliance", markers) == []
