"""Distribution's per-write costs under a paced load (issue 9): ingest hands
its journaled payloads to the distribution thread (`PayloadHandoff`, so a
step does not read them back from the journal), and a cycle does not chain
a step of the few records that became durable while its step ran.

Oracle: the seeded workload's ledger (D1/D3): after every catch-up the
replica equals the ledger prefix, whether payloads came from the handoff,
from the journal, or from both.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

from nicsplit.core.records import Op
from nicsplit.journal.writer import Journal
from nicsplit.recovery.blockindex import BlockIndex
from nicsplit.recovery.distribution import (CGDistribution, PayloadHandoff, failover_state_path, journaled_payloads,
                                             replica_dir)
from nicsplit.recovery.replica import Distributor
from nicsplit.core.layout import vdisk_file
from nicsplit.testing.workload import Meta, Workload, golden_at
from nicsplit.wire.frames import Record
from nicsplit.wire.wirerecords import wire_records


def assert_replica(data: Path, w: Workload, seq: int, cg: str = "cg1") -> None:
    rd, want = replica_dir(data, cg), golden_at(w, seq)
    for v in w.vdisks:
        assert vdisk_file(rd, v.id, ".img").read_bytes() == want[v.id], \
            f"replica of {v.name} differs from the ledger prefix up to seq {seq}"


class Ingest:
    """What the appliance does per group commit: append, sync, refresh the
    CG's block index (no append runs meanwhile), wake distribution."""

    def __init__(self, j: Journal, idx: BlockIndex) -> None:
        self.j, self.idx, self.dist = j, idx, None

    def commit(self, batches) -> None:
        for meta, recs in batches:
            self.j.append_batch(meta, recs, sync=False)
        self.j.sync()
        self.idx.refresh()
        if self.dist is not None:
            self.dist.notify(self.j.durable_seq)


def offer_batch(h: PayloadHandoff, res, recs) -> None:
    """What the appliance's ingest worker offers after a group's fdatasync."""
    h.offer(journaled_payloads([res], [wire_records(recs)]))


def test_handoff_gives_what_was_offered_in_seq_order_and_drops_older():
    h = PayloadHandoff(max_bytes=100, min_room=1)
    h.offer([(3, b"c" * 10), (5, b"e" * 10), (7, b"g" * 10), (9, b"i" * 10)])
    assert h.take([5, 6, 7]) == [b"e" * 10, None, b"g" * 10]  # 3 dropped on the way: older than asked
    assert (h.hits, h.misses, len(h)) == (2, 1, 1)
    assert h.take([3]) == [None]  # gone, and 9 (newer) stays
    assert h.take([9]) == [b"i" * 10] and len(h) == 0


def test_handoff_is_bounded_and_refuses_out_of_order_offers():
    h = PayloadHandoff(max_bytes=25, min_room=1)
    h.offer([(1, b"a" * 10), (2, b"b" * 10), (3, b"c" * 10), (4, b"d" * 1)])  # the third does not fit: cut there
    h.offer([(2, b"x" * 1), (5, b"e" * 1)])  # not after the newest held: refused (a seq is journaled once)
    assert h.dropped == 2 and len(h) == 2
    assert h.take([1, 2, 3, 4, 5]) == [b"a" * 10, b"b" * 10, None, None, None]
    h.offer([(6, b"f" * 25)])  # taking freed the room
    assert h.take([6]) == [b"f" * 25]


def test_a_full_handoff_refuses_an_offer_without_walking_it():
    """Less room than `min_room` left (a paused replica): the offer is not
    iterated at all, so ingest pays nothing per record for it."""
    h = PayloadHandoff(max_bytes=8192, min_room=4096)
    h.offer([(1, bytes(4096)), (2, bytes(2048))])
    walked = []

    def items():
        for seq in (3, 4):
            walked.append(seq)
            yield seq, b"x"

    h.offer(items())  # 2048 bytes of room left < min_room
    assert walked == [] and h.dropped == 1 and len(h) == 2
    assert h.take([1, 2]) == [bytes(4096), bytes(2048)]
    h.offer(items())  # room again: walked and held
    assert walked == [3, 4] and h.take([3, 4]) == [b"x", b"x"]


def test_only_journaled_inline_writes_are_offered(tmp_path: Path):
    """A duplicate batch offers nothing, an overlapping one only the records
    the journal appended; ZERO/TRIM and records with references are read
    from the journal (their payload is not the inline data)."""
    j = Journal.open(tmp_path / "j")

    def rec(seq: int, op: int = Op.WRITE, fill: int = 1) -> Record:
        return Record(seq=seq, io_id=seq, vdisk_id=1, op=op, flags=0, offset=seq * 4096, length=4096,
                      time_ns=seq, refs=(), data=bytes([fill]) * 4096 if op == Op.WRITE else b"")

    a = [rec(1), rec(2), rec(3, Op.ZERO), rec(4)]
    res_a = j.append_batch(Meta(1, 1, 4), a)
    assert [s for s, _ in journaled_payloads([res_a], [wire_records(a)])] == [1, 2, 4]
    dup = [rec(3, Op.ZERO), rec(4, fill=9)]
    res_dup = j.append_batch(Meta(2, 3, 4), dup)
    assert list(journaled_payloads([res_dup], [wire_records(dup)])) == []
    over = [rec(4, fill=9), rec(5, fill=5), rec(6, fill=6)]
    res_over = j.append_batch(Meta(3, 4, 6), over)
    got = list(journaled_payloads([res_over], [wire_records(over)]))
    assert [(s, bytes(d)) for s, d in got] == [(5, b"\5" * 4096), (6, b"\6" * 4096)]
    j.close()


def _distributor_run(tmp_path: Path, seed: int, offer: str) -> tuple[Distributor, PayloadHandoff]:
    """A journal fed batch by batch, each durable batch offered (all, every
    other one, or none), a Distributor with the handoff stepping behind it."""
    w = Workload.generate(seed, nbatches=40)
    jd = tmp_path / "data" / "appliance" / "journal" / "cg1"
    j = Journal.open(jd, segment_size=64 * 1024)
    h = PayloadHandoff()
    d = Distributor(jd, replica_dir(tmp_path / "data", "cg1"), w.vdisks, journal=j, keyring=None, handoff=h)
    for i, (meta, recs) in enumerate(w.batches):
        res = j.append_batch(meta, recs)
        if offer == "all" or (offer == "half" and i % 2):
            offer_batch(h, res, recs)
        if i % 3 == 2:
            d.catch_up(5, j.durable_seq)
            assert_replica(tmp_path / "data", w, d.applied_seq)
    d.catch_up(5, j.durable_seq)
    assert d.applied_seq == j.last_seq
    assert_replica(tmp_path / "data", w, d.applied_seq)
    j.close()
    return d, h


def test_distributor_takes_handed_payloads_and_reads_the_rest(tmp_path: Path, seed: int):
    d, h = _distributor_run(tmp_path / "all", seed, "all")
    assert h.hits > 0 and len(h) == 0, (h.hits, h.misses, len(h))
    d.close()
    d, h = _distributor_run(tmp_path / "half", seed, "half")
    assert h.hits > 0 and h.misses > 0, (h.hits, h.misses)
    d.close()


def test_a_handed_payload_is_what_the_replica_gets(tmp_path: Path):
    """The step really uses the handoff (not a read of the journal that
    happens to agree): a payload offered under a seq lands in the image."""
    jd = tmp_path / "data" / "appliance" / "journal" / "cg1"
    j = Journal.open(jd)
    w = Workload.generate(1, nbatches=1, refs=False)
    vd = w.vdisks[0]

    r = Record(seq=1, io_id=1, vdisk_id=vd.id, op=Op.WRITE, flags=0, offset=0, length=4096, time_ns=1, refs=(),
               data=b"\1" * 4096)
    j.append_batch(Meta(1, 1, 1), [r])
    h = PayloadHandoff()
    h.offer([(1, b"\2" * 4096)])
    d = Distributor(jd, replica_dir(tmp_path / "data", "cg1"), [vd], journal=j, keyring=None, handoff=h)
    assert d.step(16) == 1 and h.hits == 1
    assert d.read(vd.id, 0, 4096) == b"\2" * 4096
    d.close()
    j.close()


def test_a_cycle_leaves_what_arrived_during_its_step_to_the_next_one(tmp_path: Path, seed: int):
    """What became durable while a step ran (less than a full step) waits for
    the next cycle, one step interval later, instead of a second step of a
    few records in the same cycle (each step pays the same fsyncs)."""
    w = Workload.generate(seed, nbatches=8)
    data = tmp_path / "data"
    jd = data / "appliance" / "journal" / "cg1"
    j = Journal.open(jd, segment_size=64 * 1024)
    ing = Ingest(j, BlockIndex(jd))
    fed = threading.Event()
    at: list[float] = []

    def fp(name: str) -> None:
        if name == "step" and not fed.is_set():  # right after the first step: a group commit lands
            fed.set()
            ing.commit(w.batches[1:3])
            at.append(time.monotonic())

    dist = CGDistribution(data, "cg1", jd, members=lambda: tuple(w.vdisks), durable=lambda: j.durable_seq,
                          journal=j, index=ing.idx, step_records=1 << 20, wake_interval=0.05, step_interval=0.5,
                          failpoint=fp)
    ing.dist = dist
    ing.commit(w.batches[:1])
    dist.start()
    try:
        assert dist.wait_idle(30), dist.statistics()
        st = dist.statistics()
        assert fed.is_set() and st.applied_seq == j.durable_seq == w.batches[2][0].last_seq
        assert time.monotonic() - at[0] >= 0.4, "the records were applied in the same cycle"
        assert st.steps == 2 and st.state == "caught-up", st
        assert dist.handoff.hits == 0  # this test's ingest offers nothing: all read from the journal
        assert_replica(data, w, st.applied_seq)
    finally:
        dist.stop()
        dist.join(10)
        j.close()


def test_handoff_fills_only_to_its_bound_while_distribution_lags(tmp_path: Path):
    """A paused or slow replica: offers beyond the bound are dropped (read
    from the journal later), memory stays bounded."""
    h = PayloadHandoff(max_bytes=64 * 1024)
    rng = random.Random(5)
    print("seed 5")
    seq = held = offers_held = 0  # the model: 16 payloads fit; an offer is held up to the first that does not
    for _ in range(100):
        items = []
        for _ in range(rng.randint(1, 8)):
            seq += 1
            items.append((seq, bytes(4096)))
        h.offer(items)
        offers_held += held + len(items) <= 16
        held = min(16, held + len(items))
    assert offers_held < 100 and held == 16
    assert len(h) == 16 and h.dropped == 100 - offers_held  # one per offer cut short or refused
    assert sum(p is not None for p in h.take(list(range(1, seq + 1)))) == 16 and len(h) == 0


def test_a_paused_handoff_lets_go_and_refuses_until_resumed():
    h = PayloadHandoff(max_bytes=1 << 20)
    h.offer([(1, b"a" * 4096), (2, b"b" * 4096)])
    h.pause()
    assert len(h) == 0 and h.take([1, 2]) == [None, None]
    h.offer([(3, b"c" * 4096)])
    assert len(h) == 0 and h.dropped == 1
    h.resume()
    h.offer([(4, b"d" * 4096)])
    assert h.take([3, 4]) == [None, b"d" * 4096]


def test_distribution_paused_for_a_failover_holds_no_payloads(tmp_path: Path):
    """A paused CG (its failover file exists) has no Distributor to take
    payloads: the handoff lets go of what it held and refuses offers (no
    16 MiB of batch plaintext pinned, no walk of every offer); once the
    failover file is gone and the replica reopens, offers are held again
    and the replica catches up to the ledger."""
    w = Workload.generate(3, nbatches=6)
    data = tmp_path / "data"
    jd = data / "appliance" / "journal" / "cg1"
    j = Journal.open(jd, segment_size=64 * 1024)
    ing = Ingest(j, BlockIndex(jd))
    dist = CGDistribution(data, "cg1", jd, members=lambda: tuple(w.vdisks), durable=lambda: j.durable_seq,
                          journal=j, index=ing.idx, wake_interval=0.02, step_interval=0.0)
    ing.dist = dist
    dist.handoff.offer([(10_000, bytes(4096))])  # held before the thread looked at the replica
    fo = failover_state_path(data, "cg1")
    fo.parent.mkdir(parents=True, exist_ok=True)
    fo.write_text("{}")
    ing.commit(w.batches[:3])
    dist.start()
    try:
        assert dist.wait_idle(30), dist.statistics()
        assert dist.statistics().state == "paused" and len(dist.handoff) == 0
        dist.handoff.offer([(10_001, bytes(4096))])
        assert len(dist.handoff) == 0
        fo.unlink()
        ing.commit(w.batches[3:])
        assert dist.wait_idle(30), dist.statistics()
        st = dist.statistics()
        assert st.state == "caught-up" and st.applied_seq == j.durable_seq, st
        assert_replica(data, w, st.applied_seq)
        dist.handoff.offer([(j.durable_seq + 1, bytes(4096))])  # open again: held
        assert len(dist.handoff) == 1
    finally:
        dist.stop()
        dist.join(10)
        j.close()
