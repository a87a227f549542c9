"""Issue 11 item 2: the CLI refuses every name the appliance would refuse,
with one clear line, and writes nothing."""

from __future__ import annotations

import json

import pytest

from nicsplit.testing.datadir import init_data
from nicsplit.testing.procs import run_cli

BAD = ["_x", ".", "..", ".hidden", "--", "cg.json"]


def _refused(data, *args: str) -> str:
    p = run_cli(data, *args, check=False)
    assert p.returncode == 1, (args, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    return lines[0]


@pytest.fixture
def data(tmp_path):
    return init_data(tmp_path / "d")


def test_cli_refuses_bad_cg_and_vdisk_names(data):
    for name in BAD:
        line = _refused(data, "cg", "create", "--", name)
        assert line == (f"nicsplit: error: bad consistency group name {name!r}: use 1-64 of A-Z a-z 0-9 . _ -, "
                        "starting with a letter or digit, not ending in .json or .lock")
        line = _refused(data, "vdisk", "create", "--size", "1M", "--", name)
        assert line.startswith(f"nicsplit: error: bad vdisk name {name!r}: use 1-64 of"), line
    assert json.loads(run_cli(data, "cg", "list", "--json").stdout)["cgs"] == []
    assert json.loads(run_cli(data, "vdisk", "list", "--json").stdout)["vdisks"] == []
    # good names still go through
    run_cli(data, "cg", "create", "db-1")
    run_cli(data, "vdisk", "create", "--size", "1M", "--cg", "db-1", "--", "x--")
    assert [v["cg"] for v in json.loads(run_cli(data, "vdisk", "list", "--json").stdout)["vdisks"]] == ["db-1"]


def test_config_section_with_a_bad_vdisk_name_is_refused(tmp_path):
    data = init_data(tmp_path / "d")
    cfg = data / "nicsplit.toml"
    cfg.write_text(cfg.read_text() + '\n[vdisks."_x"]\nfilters = ["stats"]\n')
    line = _refused(data, "vdisk", "list")
    assert line.startswith(f"nicsplit: error: {cfg}: [vdisks._x]: bad vdisk name '_x'"), line
