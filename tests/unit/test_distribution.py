"""Distribution inside the appliance (issue "any-point-in-time recovery",
item 1) and the pieces failover is made of, in-process.

The oracle is the ledger of the seeded workload (nicsplit.testing.workload, D1/D3):
whenever the distribution thread says it caught up, the replica images equal
the ledger prefix up to the journal's durable seq, byte for byte.  Failover's
parts are checked against real peers where there is one: the writable
replica server with libnbd (the failback copy client against ``nbdkit
memory``, a child process, is in tests/integration/test_distribution_nbdkit.py).
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest

from nicsplit.testing.served import Served
from nicsplit.testing.workload import BS, T0, V, Meta, Workload, golden_at

from nicsplit.recovery.distribution import (
    CatalogMembers, CGDistribution, ReplicaLock, failover_state_path, replica_dir,
)
from nicsplit.recovery.failover import failback_regions
from nicsplit.core.dirtymap import REGION as DIRTY_REGION, DirtyMap
from nicsplit.recovery.image import ReplicaServer
from nicsplit.journal.writer import Journal
from nicsplit.recovery.blockindex import BlockIndex
from nicsplit.recovery.replica import Distributor
from nicsplit.core.layout import vdisk_file
from nicsplit.core.records import Op
from nicsplit.testing.procs import import_libnbd, libnbd_errno, wait_for
from nicsplit.wire.frames import Record


def replica_images(data: Path, cg: str, vdisks) -> dict[int, bytes]:
    rd = replica_dir(data, cg)
    return {v.id: vdisk_file(rd, v.id, ".img").read_bytes() for v in vdisks}


def assert_replica(data: Path, w: Workload, seq: int, cg: str = "cg1") -> None:
    got, want = replica_images(data, cg, w.vdisks), golden_at(w, seq)
    for v in w.vdisks:
        assert got[v.id] == want[v.id], f"replica of {v.name} differs from the ledger prefix up to seq {seq}"


class Ingest:
    """What the appliance does per group commit: append, sync, refresh the
    CG's block index (no append runs meanwhile), wake distribution."""

    def __init__(self, j: Journal, idx: BlockIndex) -> None:
        self.j, self.idx, self.dist = j, idx, None

    def commit(self, batches, *, sync: bool = True) -> None:
        for meta, recs in batches:
            self.j.append_batch(meta, recs, sync=False)
        if sync:
            self.j.sync()
        self.idx.refresh()
        if self.dist is not None:
            self.dist.notify(self.j.durable_seq)


@pytest.fixture
def live(tmp_path: Path, seed: int):
    """A live journal (the appliance's writer) with its block index, a
    workload to feed it and a distribution thread over it (not started)."""
    w = Workload.generate(seed, nbatches=48)
    data = tmp_path / "data"
    jd = data / "appliance" / "journal" / "cg1"
    j = Journal.open(jd, segment_size=64 * 1024)
    ing = Ingest(j, BlockIndex(jd))
    dist = CGDistribution(data, "cg1", jd, members=lambda: tuple(w.vdisks), durable=lambda: j.durable_seq,
                          journal=j, index=ing.idx, step_records=7, wake_interval=0.05)
    ing.dist = dist
    yield w, data, j, dist, ing
    dist.stop()
    dist.join(10)
    j.close()


def test_distribution_follows_the_journal_and_reports_lag(live, rng: random.Random):
    w, data, j, dist, ing = live
    dist.start()
    i = 0
    while i < len(w.batches):
        n = rng.randint(1, 6)
        ing.commit(w.batches[i : i + n])
        i += n
        assert dist.wait_idle(30), dist.statistics()
        st = dist.statistics()
        assert st.applied_seq == j.durable_seq and st.lag_records == 0 and st.lag_seconds == 0, st
        assert_replica(data, w, st.applied_seq)
    st = dist.statistics()
    assert st.state == "caught-up" and st.errors == 0 and st.last_error is None
    assert st.records_applied == sum(1 for e in w.ledger if e[2] != Op.BARRIER)
    state = json.loads((replica_dir(data, "cg1") / "state.json").read_text())
    assert state["applied_seq"] == j.durable_seq


def test_small_backlogs_are_gathered_into_fewer_steps(live):
    """STEP_INTERVAL: after a cycle, less than a full step waits up to the
    interval before the next one, so frequent group commits do not each pay
    a step's fsyncs; everything is still applied."""
    w, data, j, dist, ing = live
    dist.step_interval = 0.5
    dist.step_records = 1 << 20  # every backlog here is "small"
    ing.commit(w.batches[:1])
    dist.start()
    assert dist.wait_idle(30)
    t0 = time.monotonic()
    steps0 = dist.statistics().steps
    for b in w.batches[1:6]:  # five group commits in quick succession
        ing.commit([b])
    assert dist.wait_idle(30)
    st = dist.statistics()
    assert time.monotonic() - t0 >= 0.4, "the next cycle did not wait for the step interval"
    assert st.steps - steps0 <= 2, st  # gathered, not one step per commit
    assert st.applied_seq == j.durable_seq == w.batches[5][0].last_seq
    assert_replica(data, w, st.applied_seq)


def test_only_durable_records_are_distributed(live):
    w, data, j, dist, ing = live
    half = len(w.batches) // 2
    ing.commit(w.batches[:half])
    dist.start()
    assert dist.wait_idle(30)
    at = dist.statistics().applied_seq
    assert at == w.batches[half - 1][0].last_seq
    # Appended but not synced: on disk (the block index sees the COMMITs) yet not durable.
    ing.commit(w.batches[half:], sync=False)
    assert j.durable_seq == at < j.last_seq and ing.idx.pits.latest(consistent=False).seq == j.last_seq
    assert dist.wait_idle(30)
    assert dist.statistics().applied_seq == at
    assert_replica(data, w, at)
    j.sync()
    dist.notify(j.durable_seq)
    assert dist.wait_idle(30)
    assert dist.statistics().applied_seq == j.last_seq
    assert_replica(data, w, j.last_seq)


def test_lag_is_visible_while_paused_then_failover_takes_the_replica(live):
    w, data, j, dist, ing = live
    third = len(w.batches) // 3
    ing.commit(w.batches[:third])
    dist.start()
    assert dist.wait_idle(30)
    at = dist.statistics().applied_seq
    # A failover asks for the replica: state file first, then the lock.
    failover_state_path(data, "cg1").parent.mkdir(parents=True, exist_ok=True)
    failover_state_path(data, "cg1").write_text("{}")
    dist.notify()
    lock = ReplicaLock(data, "cg1")
    assert lock.acquire(10), "the distribution thread kept the replica lock"
    wait_for(lambda: dist.statistics().state == "paused", 10, "distribution paused")
    for b in w.batches[third:]:
        ing.commit([b])
    waiting = sum(1 for e in w.ledger if at < e[0] and e[2] != Op.BARRIER)
    wait_for(lambda: dist.statistics().lag_records == waiting, 10, f"lag_records == {waiting}")
    st = dist.statistics()
    assert st.state == "paused" and st.applied_seq == at and st.durable_seq == j.last_seq
    assert st.lag_seconds > 0 and waiting > 0
    # The failover side rolls the replica back (what `failover --seq` does) ...
    back = w.batches[third // 2][0].last_seq
    with Distributor(data / "appliance" / "journal" / "cg1", replica_dir(data, "cg1"), w.vdisks,
                     index=BlockIndex(data / "appliance" / "journal" / "cg1")) as d:
        d.goto(back)
    assert_replica(data, w, back)
    # ... and gives it back: distribution re-opens it where it was left.
    failover_state_path(data, "cg1").unlink()
    lock.release()
    dist.notify()
    assert dist.wait_idle(30)
    st = dist.statistics()
    assert st.applied_seq == j.last_seq and st.reopened == 2 and st.lag_records == 0
    assert_replica(data, w, j.last_seq)


def test_a_vdisk_added_to_the_cg_gets_its_replica(tmp_path: Path):
    from nicsplit.host.datastore import Datastore

    data = tmp_path / "data"
    ds = Datastore.create(data / "datastore", volume_size=64 << 20, extent_size=1 << 20)
    a = ds.create_vdisk("a", 64 * BS, extra={"cg": "cg1"})
    b = ds.create_vdisk("b", 32 * BS)  # not in the CG yet
    ds.create_vdisk("other", 16 * BS, extra={"cg": "cg2"})
    jd = data / "appliance" / "journal" / "cg1"
    j = Journal.open(jd)
    dist = CGDistribution(data, "cg1", jd, members=CatalogMembers(data / "datastore", "cg1", replica_dir(data, "cg1")),
                          durable=lambda: j.durable_seq, journal=j, wake_interval=0.05).start()
    try:
        def batch(bid: int, seq: int, vid: int, fill: int) -> None:
            r = Record(seq, seq, vid, Op.WRITE, 0, 4 * BS, 2 * BS, T0 + seq, bytes([fill]) * (2 * BS))
            j.append_batch(Meta(bid, seq, seq, T0 + seq, T0 + seq), [r])
            dist.notify(j.durable_seq)

        batch(1, 1, a.id, 0xA1)
        assert dist.wait_idle(30)
        rd = replica_dir(data, "cg1")
        assert sorted(p.name for p in rd.glob("*.img")) == [f"vdisk+{a.id}.img"]
        ds.update_vdisk("b", extra={"cg": "cg1"})  # `nicsplit cg add cg1 b`: the host splits b's writes from now on
        batch(2, 2, b.id, 0xB2)
        batch(3, 3, a.id, 0xA3)
        assert dist.wait_idle(30)
        st = dist.statistics()
        assert st.applied_seq == 3 and st.errors == 0, st
        assert vdisk_file(rd, b.id, ".img").read_bytes() == bytes(4 * BS) + bytes([0xB2]) * (2 * BS) + bytes(26 * BS)
        assert vdisk_file(rd, a.id, ".img").read_bytes()[4 * BS : 6 * BS] == bytes([0xA3]) * (2 * BS)
        assert {v["name"] for v in json.loads((rd / "vdisks.json").read_text())["vdisks"]} == {"a", "b"}
    finally:
        dist.stop()
        dist.join(10)
        j.close()


def test_a_distribution_error_is_shown_and_retried(live, monkeypatch):
    w, data, j, dist, ing = live
    ing.commit(w.batches[:4])
    # The replica directory's place is taken by a file: opening the replica fails.
    replica_dir(data, "cg1").parent.mkdir(parents=True)
    replica_dir(data, "cg1").write_text("not a directory")
    monkeypatch.setattr("nicsplit.recovery.distribution._BACKOFF", (0.05, 0.05))
    dist.start()
    wait_for(lambda: dist.statistics().state == "error", 10, "the error state")
    st = dist.statistics()
    assert st.errors >= 1 and "FileExistsError" in st.last_error, st
    replica_dir(data, "cg1").unlink()
    assert dist.wait_idle(30)
    assert_replica(data, w, j.durable_seq)


# -- failover pieces ----------------------------------------------------------------------------


def test_dirty_map_marks_persists_and_lists_runs(tmp_path: Path):
    size = 10 * DIRTY_REGION + 1000
    m = DirtyMap(tmp_path / "v.dirty", size)
    assert list(m.runs()) == [] and os.path.getsize(tmp_path / "v.dirty") == 2
    assert m.mark(DIRTY_REGION - 1, 2) == (0, 1)  # regions 0 and 1, both in byte 0
    assert m.mark(0, 10) is None  # already set
    m.write((0, 1))
    assert m.unsynced
    m.sync()
    assert not m.unsynced
    span = m.mark(10 * DIRTY_REGION + 5, 10)  # the partial last region (bit 10: byte 1)
    assert span == (1, 2)
    m.write(span)
    m.sync()
    m.close()
    m = DirtyMap(tmp_path / "v.dirty", size)  # reopened: what was written is there
    assert list(m.runs()) == [(0, 2 * DIRTY_REGION), (10 * DIRTY_REGION, 1000)]
    assert m.count() == 3
    m.close()


def test_replica_server_serves_writable_and_tracks_dirty_regions(tmp_path: Path, seed: int, rng: random.Random):
    """The failover server over a replica brought to a PIT: reads equal that
    PIT; seeded writes, zeroes and trims (unaligned too) land in the images
    like in a byte model; every region they touched, and no other, is dirty;
    failback's region set is that ∪ the journal's records after the PIT."""
    w = Workload.generate(seed, nbatches=30, vdisks=[V(11, "alpha", 256 * BS), V(12, "beta", 96 * BS + 2048)])
    jd = tmp_path / "journal"
    w.write_journal(jd)
    rd, dd = tmp_path / "replica", tmp_path / "dirty"
    dd.mkdir()
    pit = w.batches[len(w.batches) // 2][0].last_seq
    with Distributor(jd, rd, w.vdisks) as d:
        d.catch_up()
        d.goto(pit)
    model = {v.id: bytearray(b) for v, b in zip(w.vdisks, golden_at(w, pit).values())}
    touched: dict[int, set[int]] = {v.id: set() for v in w.vdisks}
    nbd = import_libnbd()
    with Served(ReplicaServer(rd, w.vdisks, pit, dirty_dir=dd, cg="cg1", validate=True)) as s:
        hs = {v.id: nbd.NBD() for v in w.vdisks}
        for v in w.vdisks:
            hs[v.id].connect_uri(f"nbd://127.0.0.1:{s.port}/{v.name}")
            assert not hs[v.id].is_read_only() and hs[v.id].get_size() == v.size
            assert hs[v.id].pread(v.size, 0) == bytes(model[v.id])
        for _ in range(200):
            v = rng.choice(w.vdisks)
            off = rng.randrange(v.size)
            n = rng.randint(1, min(3 * DIRTY_REGION, v.size - off))
            op = rng.random()
            if op < 0.7:
                data = rng.randbytes(n)
                hs[v.id].pwrite(data, off, nbd.CMD_FLAG_FUA if rng.random() < 0.1 else 0)
                model[v.id][off : off + n] = data
            elif op < 0.85:
                hs[v.id].zero(n, off)
                model[v.id][off : off + n] = bytes(n)
            else:
                hs[v.id].trim(n, off)
                model[v.id][off : off + n] = bytes(n)
            touched[v.id].update(range(off // DIRTY_REGION, (off + n - 1) // DIRTY_REGION + 1))
        for v in w.vdisks:
            hs[v.id].flush()
            assert hs[v.id].pread(v.size, 0) == bytes(model[v.id])
            hs[v.id].shutdown()
        stats = s.srv.statistics()["vdisks"]
    for v in w.vdisks:
        assert vdisk_file(rd, v.id, ".img").read_bytes() == bytes(model[v.id])
        m = DirtyMap(vdisk_file(dd, v.id, ".dirty"), v.size)
        got = {r for off, n in m.runs() for r in range(off // DIRTY_REGION, (off + n - 1) // DIRTY_REGION + 1)}
        assert got == touched[v.id] and stats[v.name]["dirty_regions"] == len(got)
        m.close()
    # failback's regions: dirty ∪ what the journal holds after the PIT
    data = tmp_path / "data"
    (data / "appliance" / "failover").mkdir(parents=True)
    os.rename(dd, data / "appliance" / "failover" / "cg1")
    regions = failback_regions(data, "cg1", w.vdisks, pit, BlockIndex(jd))
    for v in w.vdisks:
        want = set(touched[v.id])
        for seq, vid, op, off, n, _ in w.ledger:
            if seq > pit and vid == v.id and op != Op.BARRIER:
                want.update(range(off // DIRTY_REGION, (off + n - 1) // DIRTY_REGION + 1))
        got = {r for off, n in regions[v.id]["runs"] for r in range(off // DIRTY_REGION, (off + n - 1) // DIRTY_REGION + 1)}
        assert got == want


def test_replica_server_refuses_writes_past_the_end(tmp_path: Path, seed: int):
    """Bad input to the failover server: a write past the end gets ENOSPC
    (or EINVAL), the session lives on, nothing is marked dirty."""
    w = Workload.generate(seed, nbatches=6)
    jd = tmp_path / "journal"
    w.write_journal(jd)
    rd, dd = tmp_path / "replica", tmp_path / "dirty"
    dd.mkdir()
    with Distributor(jd, rd, w.vdisks) as d:
        d.catch_up()
        seq = d.applied_seq
    nbd = import_libnbd()
    v = w.vdisks[0]
    with Served(ReplicaServer(rd, w.vdisks, seq, dirty_dir=dd, cg="cg1")) as s:
        h = nbd.NBD()
        h.set_strict_mode(0)
        h.connect_uri(f"nbd://127.0.0.1:{s.port}/{v.name}")
        with pytest.raises(nbd.Error) as e:
            h.pwrite(b"x" * 4096, v.size - 1024)
        assert libnbd_errno(e.value) in (28, 22)
        assert h.pread(4096, 0) == golden_at(w, seq)[v.id][:4096]
        h.shutdown()
    m = DirtyMap(vdisk_file(dd, v.id, ".dirty"), v.size)
    assert list(m.runs()) == []
    m.close()
