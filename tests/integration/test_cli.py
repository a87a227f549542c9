"""The CLI contract: --data/NICSPLIT_DATA, JSON shapes, one-line errors."""

from __future__ import annotations

import argparse
import json
import os
import subprocess

import pytest

from nicsplit.cli.common import USER_ERRORS, CliError, seq
from nicsplit.recovery.errors import RecoveryError
from nicsplit.recovery.images import check_id
from nicsplit.recovery.select import Selector, parse_time, resolve_pit
from nicsplit.testing.procs import nicsplit_cmd, run_cli


def test_init_create_list_delete(tmp_path):
    data = tmp_path / "d"
    run_cli(data, "init")
    assert (data / "nicsplit.toml").exists()
    assert "already" in run_cli(data, "init").stdout
    run_cli(data, "vdisk", "create", "web1-root", "--size", "10G", "--owner", "vm:web1")
    run_cli(data, "vdisk", "create", "db-data", "--size", "512M", "--owner", "container:db")
    run_cli(data, "vdisk", "create", "scratch", "--size", "1M")
    listing = json.loads(run_cli(data, "vdisk", "list", "--json").stdout)
    by_name = {v["name"]: v for v in listing["vdisks"]}
    assert set(by_name) == {"web1-root", "db-data", "scratch"}
    assert by_name["web1-root"]["size"] == 10 << 30 and by_name["web1-root"]["owner"] == "vm:web1"
    assert by_name["db-data"]["owner"] == "container:db"
    assert by_name["scratch"]["owner"] is None
    assert len({v["uuid"] for v in listing["vdisks"]}) == 3
    run_cli(data, "vdisk", "delete", "scratch")
    listing = json.loads(run_cli(data, "vdisk", "list", "--json").stdout)
    assert [v["name"] for v in listing["vdisks"]] == ["web1-root", "db-data"] or {v["name"] for v in listing["vdisks"]} == {"web1-root", "db-data"}


def test_env_var_selects_data_dir(tmp_path):
    data = tmp_path / "envdata"
    env = dict(os.environ, NICSPLIT_DATA=str(data))
    subprocess.run(nicsplit_cmd("init"), env=env, check=True, capture_output=True)
    subprocess.run(nicsplit_cmd("vdisk", "create", "x", "--size", "1M"), env=env, check=True, capture_output=True)
    out = subprocess.run(nicsplit_cmd("vdisk", "list", "--json"), env=env, check=True, capture_output=True, text=True).stdout
    assert [v["name"] for v in json.loads(out)["vdisks"]] == ["x"]


def _fails(data, *args) -> str:
    p = run_cli(data, *args, check=False)
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    return lines[0]


def test_errors_are_one_line(tmp_path):
    data = tmp_path / "d"
    assert "nicsplit init" in _fails(data, "vdisk", "list")
    run_cli(data, "init")
    run_cli(data, "vdisk", "create", "a", "--size", "1M")
    assert "exists" in _fails(data, "vdisk", "create", "a", "--size", "1M")
    assert "size" in _fails(data, "vdisk", "create", "b", "--size", "lots")
    assert "owner" in _fails(data, "vdisk", "create", "b", "--size", "1M", "--owner", "pod:x")
    assert "b" in _fails(data, "vdisk", "delete", "b")
    assert "name" in _fails(data, "vdisk", "create", "bad/name", "--size", "1M").lower()
    assert "listen" in _fails(data, "host", "serve", "--listen", "nowhere")
    assert "no running host" in _fails(data, "host", "stats")


def test_one_seq_parser():
    """journal dump/replay took seq 0, pits/restore/bookmark did not: one
    parser now, and 0 (no record, no PIT has it) is refused everywhere."""
    assert seq("1") == 1 and seq("123") == 123
    for bad in ("0", "-1", "x", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="bad sequence number"):
            seq(bad)


def test_library_raises_domain_errors_not_cli_errors(tmp_path):
    for call in (lambda: parse_time("yesterday-ish"), lambda: check_id("../x"),
                 lambda: resolve_pit(None, tmp_path, "cg1", Selector())):
        with pytest.raises(RecoveryError) as ei:
            call()
        assert not isinstance(ei.value, CliError) and isinstance(ei.value, USER_ERRORS)
        assert "\n" not in str(ei.value)


def test_seq_zero_is_a_usage_error(tmp_path):
    data = tmp_path / "d"
    run_cli(data, "init")
    for argv in (("journal", "dump", "cg1", "--from", "0"), ("restore", "v", "--seq", "0")):
        p = run_cli(data, *argv, check=False)
        assert p.returncode == 2 and "Traceback" not in p.stderr
        assert p.stderr.strip().splitlines()[-1].endswith("bad sequence number '0'")


def test_card_run_refuses_a_transport_without_a_card_half(tmp_path):
    """`card run --transport net` says net has no card half (not "unknown");
    a name that is no transport at all is unknown, with the known ones."""
    data = tmp_path / "data"
    run_cli(data, "init")
    p = run_cli(data, "card", "run", "--transport", "net", check=False)
    assert p.returncode != 0 and "has no card half" in p.stderr and "unknown" not in p.stderr, p.stderr
    p = run_cli(data, "card", "run", "--transport", "bogus", check=False)
    assert p.returncode != 0 and "unknown transport" in p.stderr and "nvme-pi" in p.stderr, p.stderr
