"""A damaged journal through the commands (docs/recovery.md §9): `pits`,
`restore`, `image export`, `journal dump / replay` on a real data directory
refuse the unusable PITs with one line naming the damaged segment and the
lost seqs; split from tests/unit/test_journal_damage.py (whose helpers build
and damage the journal) because the commands run as subprocesses."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest

from nicsplit.testing.damage import corrupt, expected, journal_layout, make_journal
from nicsplit.testing.workload import golden_at

from nicsplit.testing.procs import run_cli


@pytest.fixture
def damaged_data(tmp_path: Path, seed: int):
    """A data directory (two vdisks in CG cg1), a sealed journal of a seeded
    workload, one record in a middle segment damaged."""
    from nicsplit.host.datastore import Datastore
    from nicsplit.testing.datadir import init_data

    data = init_data(tmp_path / "data")
    run_cli(data, "cg", "create", "cg1")
    run_cli(data, "vdisk", "create", "alpha", "--size", "256K", "--cg", "cg1")
    run_cli(data, "vdisk", "create", "beta", "--size", "192K", "--cg", "cg1")
    vds = {v.name: v for v in Datastore.open(data / "datastore").list_vdisks()}
    jd = data / "appliance" / "journal" / "cg1"
    w = make_journal(jd, seed, True, nbatches=40, vdisks=[vds["alpha"], vds["beta"]])
    commits, _ = journal_layout(jd)
    seg, off, hit = corrupt(jd, "record-data", random.Random(seed))
    pits, first, resync = expected(w, commits, (seg, off), hit)
    return data, w, vds, pits, first, resync, seg


def _one_line_error(p: subprocess.CompletedProcess, *parts: str) -> str:
    err = p.stderr.strip()
    assert p.returncode == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in err, (part, err)
    return err


def test_cli_on_a_damaged_journal(damaged_data, tmp_path: Path):
    data, w, vds, pits, first, resync, seg = damaged_data
    lost = f"seqs {first}..{resync.last_seq}"
    name = f"{seg:08d}.seg"

    out = json.loads(run_cli(data, "pits", "cg1", "--json", "--all").stdout)
    assert [(p["seq"], p["usable"]) for p in out["pits"]] == [(p.seq, p.usable) for p in pits]
    assert all(name in p["reason"] and lost in p["reason"] for p in out["pits"] if not p["usable"])
    assert all("reason" not in p for p in out["pits"] if p["usable"])
    assert [(d["segment"], d["first_seq"], d["last_seq"]) for d in out["damage"]] == [(name, first, resync.last_seq)]
    text = run_cli(data, "pits", "cg1", "--all")
    assert sum("UNUSABLE" in line for line in text.stdout.splitlines()) == sum(not p.usable for p in pits)
    assert name in text.stderr

    good = [p for p in pits if p.usable and p.consistent][-1]
    bad = [p for p in pits if not p.usable]
    f = tmp_path / "alpha.raw"
    run_cli(data, "restore", "alpha", "--seq", str(good.seq), "--to", str(f))
    assert f.read_bytes() == golden_at(w, good.seq)[vds["alpha"].id]
    for argv in (("restore", "alpha", "--seq", str(bad[-1].seq), "--to", str(f)),
                 ("restore", "beta", "--latest", "--to", str(f)),
                 ("image", "export", "cg1", "--seq", str(bad[0].seq))):
        err = _one_line_error(run_cli(data, *argv, check=False), name, lost)
        assert f"the newest usable point in time is seq {good.seq}" in err
    assert json.loads(run_cli(data, "image", "list", "--json").stdout)["images"] == []

    # an image of a usable PIT serves the exact bytes
    img = json.loads(run_cli(data, "image", "export", "cg1", "--seq", str(good.seq), "--json").stdout)
    try:
        got = subprocess.run(["nbdcopy", img["exports"]["beta"], "-"], capture_output=True, check=True).stdout
        assert got == golden_at(w, good.seq)[vds["beta"].id]
    finally:
        run_cli(data, "image", "close", img["id"])

    # journal dump lists what precedes the damage, then fails with the damage
    p = run_cli(data, "journal", "dump", "cg1", "--json", check=False)
    _one_line_error(p, name)
    assert [r["seq"] for r in json.loads(p.stdout)["records"]] == [s for s, *_ in w.ledger if s < first]
    _one_line_error(run_cli(data, "journal", "replay", "cg1", "--out", str(tmp_path / "r"), check=False),
                    name, f"replay can reach seq {first - 1} at most")
    run_cli(data, "journal", "replay", "cg1", "--out", str(tmp_path / "r"), "--upto", str(first - 1))
    assert (tmp_path / "r" / "alpha.raw").read_bytes() == golden_at(w, first - 1)[vds["alpha"].id]
