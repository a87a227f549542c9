"""`restore --to` and `journal replay --out` never write through a symbolic
link or onto a device by accident, and never overwrite a file without
--force (issue 11 item 5: `restore --to /dev/null` replaced /dev/null with a
regular file; a symlink planted in a world-writable directory redirected
root's restore onto any file). The real CLI, as subprocesses, on a data
directory made by ``nicsplit init`` with a journal written from the ledger
workload."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from nicsplit.testing.datadir import init_data
from nicsplit.testing.procs import run_cli
from nicsplit.testing.workload import Workload


@pytest.fixture
def rdata(tmp_path: Path):
    """A data directory with vdisk alpha in CG cg1, a journal for it, and
    the latest consistent image of alpha (the oracle)."""
    from nicsplit.host.datastore import Datastore

    data = init_data(tmp_path / "data")
    run_cli(data, "vdisk", "create", "alpha", "--size", "256K")
    run_cli(data, "cg", "create", "cg1")
    run_cli(data, "cg", "add", "cg1", "alpha")
    alpha = {v.name: v for v in Datastore.open(data / "datastore").list_vdisks()}["alpha"]
    w = Workload.generate(11, nbatches=10, vdisks=[alpha])
    w.write_journal(data / "appliance" / "journal" / "cg1")
    good = {p.seq for p in w.expected_pits() if p.consistent}
    latest = [g for s, g in w.goldens() if s in good][-1][alpha.id]
    return data, bytes(latest)


def _alpha(data: Path):
    from nicsplit.host.datastore import Datastore

    return {v.name: v for v in Datastore.open(data / "datastore").list_vdisks()}["alpha"]


def _refused(p: subprocess.CompletedProcess, *parts: str) -> None:
    err = p.stderr.strip()
    assert p.returncode == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in err, (part, err)


def _no_temps(d: Path) -> None:
    assert not [p.name for p in d.iterdir() if p.name.endswith(".partial")]


def _mknull(path: Path) -> None:
    """A character device like /dev/null (1,3) at ``path``. The tests run as
    root (CAP_MKNOD); where they cannot, this fails rather than skips."""
    os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))


def test_restore_refuses_a_symlink(rdata, tmp_path: Path):
    data, _ = rdata
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    drop = tmp_path / "drop"  # the world-writable directory an attacker plants in
    drop.mkdir(mode=0o1777)
    link = drop / "root.raw"
    link.symlink_to(victim)
    for extra in ((), ("--force",), ("--format", "qcow2"), ("--to-device",)):
        _refused(run_cli(data, "restore", "alpha", "--latest", "--to", str(link), *extra, check=False),
                 str(link), "symbolic link", "refusing")
        assert victim.read_bytes() == b"precious" and link.is_symlink()
    # a planted link under the old fixed temp name is never opened either
    (drop / "new.raw.partial").symlink_to(victim)
    run_cli(data, "restore", "alpha", "--latest", "--to", str(drop / "new.raw"))
    assert victim.read_bytes() == b"precious" and (drop / "new.raw.partial").is_symlink()
    assert (drop / "new.raw").read_bytes() == rdata[1]


def test_restore_refuses_dev_null_and_devices(rdata, tmp_path: Path):
    data, latest = rdata
    before = os.stat("/dev/null")
    _refused(run_cli(data, "restore", "alpha", "--latest", "--to", "/dev/null", check=False),
             "/dev/null", "character device", "--to-device")
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and (after.st_ino, after.st_rdev) == (before.st_ino, before.st_rdev)
    # --force does not make a device a file
    _refused(run_cli(data, "restore", "alpha", "--latest", "--to", "/dev/null", "--force", check=False),
             "character device")
    # explicitly allowed: the image is written onto the device, which stays a device
    run_cli(data, "restore", "alpha", "--latest", "--to", "/dev/null", "--to-device")
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and (after.st_ino, after.st_rdev) == (before.st_ino, before.st_rdev)
    _refused(run_cli(data, "restore", "alpha", "--latest", "--to", "/dev/null", "--to-device",
                     "--format", "qcow2", check=False), "is a device", "raw image")
    node = tmp_path / "null"
    _mknull(node)
    _refused(run_cli(data, "restore", "alpha", "--latest", "--to", str(node), check=False), "character device")
    assert stat.S_ISCHR(os.lstat(node).st_mode)
    run_cli(data, "restore", "alpha", "--latest", "--to", str(node), "--to-device")
    assert stat.S_ISCHR(os.lstat(node).st_mode)
    _no_temps(tmp_path)


def test_restore_existing_file_needs_force(rdata, tmp_path: Path):
    data, latest = rdata
    out = tmp_path / "alpha.raw"
    out.write_bytes(b"keep me")
    _refused(run_cli(data, "restore", "alpha", "--latest", "--to", str(out), check=False),
             str(out), "exists", "--force")
    assert out.read_bytes() == b"keep me"
    ino = os.stat(out).st_ino
    hard = tmp_path / "hardlink"  # replaced by rename: another name of the old inode keeps the old bytes
    os.link(out, hard)
    run_cli(data, "restore", "alpha", "--latest", "--to", str(out), "--force")
    assert out.read_bytes() == latest and os.stat(out).st_ino != ino
    assert hard.read_bytes() == b"keep me"
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    _no_temps(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    _refused(run_cli(data, "restore", "alpha", "--latest", "--to", str(fifo), "--force", check=False),
             "not a regular file")


def test_replay_refuses_symlinks_and_existing_images(rdata, tmp_path: Path):
    data, _ = rdata
    latest = bytes([g for _, g in Workload.generate(11, nbatches=10, vdisks=[_alpha(data)]).goldens()][-1][
        _alpha(data).id])  # replay applies every record
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    out = tmp_path / "drop"
    out.mkdir(mode=0o1777)
    (out / "alpha.raw").symlink_to(victim)
    for extra in ((), ("--force",)):
        _refused(run_cli(data, "journal", "replay", "cg1", "--out", str(out), *extra, check=False),
                 str(out / "alpha.raw"), "symbolic link")
        assert victim.read_bytes() == b"precious"
    (out / "alpha.raw").unlink()
    linked_dir = tmp_path / "linked"
    linked_dir.symlink_to(out)
    _refused(run_cli(data, "journal", "replay", "cg1", "--out", str(linked_dir), check=False), "symbolic link")

    run_cli(data, "journal", "replay", "cg1", "--out", str(out))
    assert (out / "alpha.raw").read_bytes() == latest
    (out / "alpha.raw").write_bytes(b"edited")
    _refused(run_cli(data, "journal", "replay", "cg1", "--out", str(out), check=False), "exists", "--force")
    assert (out / "alpha.raw").read_bytes() == b"edited"
    run_cli(data, "journal", "replay", "cg1", "--out", str(out), "--force")
    assert (out / "alpha.raw").read_bytes() == latest
    _no_temps(out)
    (out / "alpha.raw").unlink()
    _mknull(out / "alpha.raw")
    _refused(run_cli(data, "journal", "replay", "cg1", "--out", str(out), "--force", check=False),
             "character device")
    assert stat.S_ISCHR(os.lstat(out / "alpha.raw").st_mode)
