"""The PIT commands (`pits`, `bookmark`, `restore`) on a real data directory
made by ``nicsplit init`` (a subprocess), run in-process through their
parsers; the oracle is the D1/D3 workload's ledger. Split from
tests/unit/test_pits.py."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from nicsplit.testing.workload import Workload


@pytest.fixture
def cli_data(tmp_path: Path):
    """A data directory with two vdisks in CG cg1 and a journal for them."""
    from nicsplit.testing.datadir import init_data
    from nicsplit.testing.procs import run_cli

    data = init_data(tmp_path / "data")
    run_cli(data, "vdisk", "create", "alpha", "--size", "256K")
    run_cli(data, "vdisk", "create", "beta", "--size", "192K")
    run_cli(data, "cg", "create", "cg1")
    run_cli(data, "cg", "add", "cg1", "alpha")
    run_cli(data, "cg", "add", "cg1", "beta")
    from nicsplit.host.datastore import Datastore

    vds = {v.name: v for v in Datastore.open(data / "datastore").list_vdisks()}
    w = Workload.generate(7, nbatches=20, vdisks=[vds["alpha"], vds["beta"]])
    w.write_journal(data / "appliance" / "journal" / "cg1")
    return data, w, vds


def _parser():
    from nicsplit.cli.pit import add_parsers

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data", default=argparse.SUPPRESS)
    p = argparse.ArgumentParser(prog="nicsplit", parents=[common])
    add_parsers(p.add_subparsers(dest="command", required=True), common)
    return p


def _run(data: Path, *argv: str) -> int:
    args = _parser().parse_args(["--data", str(data), *argv])
    return args.func(args)


def test_cli_pits_bookmark_restore(cli_data, capsys, tmp_path: Path):
    from nicsplit.cli.common import USER_ERRORS as CliError  # every one-line error main() maps

    data, w, vds = cli_data
    assert _run(data, "pits", "cg1", "--json", "--all") == 0
    pits = json.loads(capsys.readouterr().out)["pits"]
    exp = w.expected_pits()
    assert [(p["seq"], p["consistent"], p["bookmarks"]) for p in pits] == [(p.seq, p.consistent, []) for p in exp]
    assert pits[0]["time"] == pytest.approx(exp[0].time_ns / 1e9)
    # Without --all, retention's thinning: the workload's PITs are days old and
    # all in one clock hour, so only the newest is offered (it is still there
    # until the next trim).
    assert _run(data, "pits", "cg1", "--json") == 0
    assert [p["seq"] for p in json.loads(capsys.readouterr().out)["pits"]] == [exp[-1].seq]

    good = [p for p in exp if p.consistent]
    mid = good[len(good) // 2]
    assert _run(data, "bookmark", "cg1", "mid", "--seq", str(mid.seq), "--json", "--lock") == 0
    assert json.loads(capsys.readouterr().out) == {"name": "mid", "seq": mid.seq, "time": mid.time_ns / 1e9,
                                                   "locked": True, "consistency": "crash"}
    assert _run(data, "bookmark", "cg1", "last", "--json") == 0
    assert json.loads(capsys.readouterr().out)["seq"] == good[-1].seq
    _run(data, "pits", "cg1", "--json")
    marks = {p["seq"]: p["bookmarks"] for p in json.loads(capsys.readouterr().out)["pits"] if p["bookmarks"]}
    assert mid.seq != good[-1].seq and marks == {mid.seq: ["mid"], good[-1].seq: ["last"]}
    _run(data, "pits", "cg1")
    assert "[mid]" in capsys.readouterr().out

    goldens = {s: {k: bytes(v) for k, v in g.items()} for s, g in w.goldens()}
    out = tmp_path / "alpha.raw"
    assert _run(data, "restore", "alpha", "--bookmark", "mid", "--to", str(out), "--json") == 0
    res = json.loads(capsys.readouterr().out)
    assert (res["seq"], res["vdisk"], res["format"]) == (mid.seq, "alpha", "raw")
    assert out.read_bytes() == goldens[mid.seq][vds["alpha"].id]
    assert not list(tmp_path.glob("*.partial"))
    _run(data, "restore", "beta", "--latest", "--to", str(out), "--force")  # replacing needs --force
    assert out.read_bytes() == goldens[good[-1].seq][vds["beta"].id]
    _run(data, "restore", "beta", "--seq", str(good[0].seq), "--to", str(out), "--force")
    assert out.read_bytes() == goldens[good[0].seq][vds["beta"].id]
    _run(data, "restore", "alpha", "--at", f"{(mid.time_ns + 500_000) / 1e9:.6f}", "--to", str(out),
         "--force")  # PITs are >= 1 ms apart
    assert out.read_bytes() == goldens[mid.seq][vds["alpha"].id]

    errors = [
        (("pits", "nope"), "unknown consistency group 'nope'"),
        (("bookmark", "cg1", "mid"), "already exists"),
        (("bookmark", "cg1", "x", "--seq", str(exp[-1].seq + 5)), "no point in time at seq"),
        (("restore", "gamma", "--latest", "--to", str(out)), "no vdisk 'gamma'"),
        (("restore", "alpha", "--bookmark", "zz", "--to", str(out)), "unknown bookmark 'zz'"),
        (("restore", "alpha", "--seq", str(exp[-1].seq + 5), "--to", str(out)), "no point in time at seq"),
        (("restore", "alpha", "--at", "1000", "--to", str(out)), "before the oldest point in time"),
        (("restore", "alpha", "--at", "yesterday-ish", "--to", str(out)), "bad time"),
        (("restore", "alpha", "--latest", "--to", str(tmp_path)), "is a directory"),
    ]
    bad = [p for p in exp if not p.consistent]
    if bad:
        errors.append((("restore", "alpha", "--seq", str(bad[0].seq), "--to", str(out)), "inside a merge window"))
    for argv, msg in errors:
        with pytest.raises(CliError, match=msg) as ei:
            _run(data, *argv)
        assert "\n" not in str(ei.value)


def test_cli_restore_qcow2(cli_data, capsys, tmp_path: Path):
    import subprocess

    data, w, vds = cli_data
    out = tmp_path / "alpha.qcow2"
    _run(data, "restore", "alpha", "--latest", "--to", str(out), "--format", "qcow2", "--json")
    assert json.loads(capsys.readouterr().out)["format"] == "qcow2"
    raw = tmp_path / "alpha.raw"
    _run(data, "restore", "alpha", "--latest", "--to", str(raw))
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(out)], capture_output=True,
                                     text=True, check=True).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == vds["alpha"].size
    subprocess.run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", str(out), str(raw)], check=True)
