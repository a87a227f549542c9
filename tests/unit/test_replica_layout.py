"""Replica images are keyed by vdisk id, and a replica directory of the old
name-keyed layout still opens (issue 11 item 4): its ``NAME.img`` files (and
sealed sidecars) are renamed to ``vdisk+ID.img``; where one name belonged to
two vdisks (deleted and created again), the shared image mixed both and the
replica is rebuilt from the journal. The oracle is the seeded ledger
workload (TESTING.md D1)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nicsplit.core.layout import migrate_name_keyed, vdisk_file
from nicsplit.recovery.blockindex import BlockIndex
from nicsplit.recovery.replica import Distributor
from nicsplit.storage import atrest
from nicsplit.testing.workload import BS, V, Workload, golden_at


def _replica(tmp_path: Path, seed: int, sealed: bool, vdisks: list[V]) -> tuple[Workload, Path, Path]:
    if sealed:
        atrest.Keyring.create(tmp_path / atrest.KEYRING_NAME)
    w = Workload.generate(seed, nbatches=30, vdisks=vdisks)
    jd = tmp_path / "journal" / "cg1"
    w.write_journal(jd)
    return w, jd, tmp_path / "replicas" / "cg1"


def _to_old_layout(rd: Path, w: Workload) -> None:
    """What a replica directory written before ids keyed the images looks like."""
    for v in w.vdisks:
        for p in rd.glob(f"vdisk+{v.id}.img*"):
            p.rename(rd / (v.name + p.name[len(f"vdisk+{v.id}"):]))


def _assert_at(d: Distributor, w: Workload, seq: int) -> None:
    want = golden_at(w, seq)
    for v in w.vdisks:
        assert d.read(v.id, 0, v.size) == want[v.id], f"replica of {v.name} (id {v.id}) at seq {seq}"


@pytest.mark.parametrize("sealed", [False, True], ids=["plain", "sealed"])
def test_old_name_keyed_replica_is_migrated(tmp_path: Path, seed: int, sealed: bool):
    w, jd, rd = _replica(tmp_path, seed, sealed, [V(11, "alpha", 64 * BS), V(12, "beta", 48 * BS + 2048)])
    with Distributor(jd, rd, w.vdisks, index=BlockIndex(jd)) as d:
        while d.step(7):
            pass
        last = d.applied_seq
    _to_old_layout(rd, w)
    assert (rd / "alpha.img").exists() and not vdisk_file(rd, 11, ".img").exists()
    assert (rd / "alpha.img.tags").exists() == sealed
    with Distributor(jd, rd, w.vdisks, index=BlockIndex(jd)) as d:
        assert d.applied_seq == last  # kept: renamed, not rebuilt
        _assert_at(d, w, last)
        first = min(p.seq for p in w.expected_pits() if p.consistent)
        d.goto(first, 64)  # the undo log still applies to the renamed images
        _assert_at(d, w, first)
    names = sorted(p.name for p in rd.iterdir())
    assert "alpha.img" not in names and "beta.img" not in names
    assert vdisk_file(rd, 11, ".img").name in names and vdisk_file(rd, 12, ".img").name in names
    assert (vdisk_file(rd, 12, ".img").name + ".tags" in names) == sealed


def test_a_name_two_vdisks_shared_is_rebuilt(tmp_path: Path, seed: int):
    # vdisk "alpha" id 11 was deleted and created again as id 13: the old
    # layout wrote both into alpha.img
    old, new = V(11, "alpha", 64 * BS), V(13, "alpha", 64 * BS)
    w, jd, rd = _replica(tmp_path, seed, False, [old, new, V(12, "beta", 48 * BS)])
    with Distributor(jd, rd, w.vdisks, index=BlockIndex(jd)) as d:
        while d.step(9):
            pass
        last = d.applied_seq
    for p in rd.glob("vdisk+*.img"):
        p.unlink()
    mixed = bytearray(golden_at(w, last)[11])  # one file that both vdisks wrote into
    for i, b in enumerate(golden_at(w, last)[13]):
        if b:
            mixed[i] = b
    (rd / "alpha.img").write_bytes(bytes(mixed))
    (rd / "beta.img").write_bytes(golden_at(w, last)[12])
    assert migrate_name_keyed(rd, w.vdisks, ".img") == ["alpha"]  # beta moved, alpha is ambiguous
    with Distributor(jd, rd, w.vdisks, index=BlockIndex(jd)) as d:
        assert d.applied_seq == 0  # discarded: rebuilt from the journal
        while d.step(9):
            pass
        assert d.applied_seq == last
        _assert_at(d, w, last)
    assert not (rd / "alpha.img").exists()


def test_failover_dirty_bitmaps_and_unknown_names(tmp_path: Path):
    d = tmp_path / "failover" / "cg1"
    d.mkdir(parents=True)
    (d / "alpha.dirty").write_bytes(b"\x01")
    (d / "gone.dirty").write_bytes(b"\x02")  # no vdisk has this name: left alone
    (d / "vdisk+12.dirty").write_bytes(b"\x03")
    assert migrate_name_keyed(d, [V(11, "alpha", BS), V(12, "beta", BS)], ".dirty") == []
    assert sorted(p.name for p in d.iterdir()) == ["gone.dirty", "vdisk+11.dirty", "vdisk+12.dirty"]
    assert vdisk_file(d, 11, ".dirty").read_bytes() == b"\x01"
    assert migrate_name_keyed(d, [V(11, "alpha", BS)], ".dirty") == []  # idempotent
