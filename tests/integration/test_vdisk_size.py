"""Issue 11: a vdisk size nothing can hold is refused at `vdisk create`, and a
host that meets one (a catalog an earlier version wrote) names the file."""

from __future__ import annotations

import json
import os

from nicsplit.core.catalog import MAX_VDISK_SIZE
from nicsplit.testing.datadir import init_data
from nicsplit.testing.procs import run_cli


def _one_line_error(data, *args: str) -> str:
    p = run_cli(data, *args, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    return lines[0]


def _fs_holds(directory, size: int) -> bool:
    fd = os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, size)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def test_vdisk_create_refuses_sizes_nothing_can_hold(tmp_path):
    data = init_data(tmp_path / "d")
    line = _one_line_error(data, "vdisk", "create", "big", "--size", "9000000T")
    assert line == ("nicsplit: error: invalid vdisk size 9895604649984000000 (9e+06 TiB): "
                    "the largest vdisk is 64 TiB"), line
    line = _one_line_error(data, "vdisk", "create", "big", "--size", f"{(MAX_VDISK_SIZE >> 40) + 1}T")
    assert "the largest vdisk is 64 TiB" in line
    # Below the maximum, the filesystem decides (ext4 holds 16 TiB in one file, xfs more).
    p = run_cli(data, "vdisk", "create", "mid", "--size", "20T", check=False)
    if _fs_holds(data / "datastore", 20 << 40):
        assert p.returncode == 0, p.stderr
    else:
        assert p.returncode == 1 and p.stderr.strip() == (
            f"nicsplit: error: invalid vdisk size {20 << 40} (20 TiB): the filesystem of {data / 'datastore'} "
            "cannot hold a file that large (File too large); replica images and restores are files of the vdisk's size")
        assert json.loads(run_cli(data, "vdisk", "list", "--json").stdout)["vdisks"] == []
    assert not [n for n in os.listdir(data / "datastore") if n.startswith(".size-probe")]
    run_cli(data, "vdisk", "create", "fine", "--size", "1T")


def test_host_start_error_names_the_vdisk_and_its_file(tmp_path):
    data = init_data(tmp_path / "d")
    run_cli(data, "vdisk", "create", "big", "--size", "1M")
    cat_path = data / "datastore" / "catalog.json"
    cat = json.loads(cat_path.read_text())
    cat["vdisks"][0]["size"] = 9000000 << 40  # what an earlier version let `vdisk create` write
    cat_path.write_text(json.dumps(cat))
    uuid = cat["vdisks"][0]["uuid"]
    line = _one_line_error(data, "host", "serve", "--listen", "127.0.0.1:0")
    # With the sparse bitmap the memory fits; the file cannot be that large (EFBIG).
    assert line.startswith(f"nicsplit: error: vdisk big ({9000000 << 40} bytes): "
                           f"{data}/host/marking/{uuid}.bitmap: "), line
    assert "dirty bitmap" in line, line
