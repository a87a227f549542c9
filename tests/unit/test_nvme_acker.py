"""nvme-pi on the card's fast path in one process: the host's NvmePiSplitter,
the card's NvmeAcker (checks, completes, hands off) and the worker's
HandoffEndpoint on the same handoff queue, stepped by hand. The worker must
see exactly what the inline NvmePiEndpoint hands the pipeline."""

from __future__ import annotations

import time

import pytest

from nicsplit.card.transports.nvme_pi import NvmePiEndpoint, NvmePiSplitter
from nicsplit.core.records import AugmentedWrite, Op, Outcome, Status, WFlag
from nicsplit.testing.cardrig import CardRig
from nicsplit.testing.splitpair import WriteMaker
from nicsplit.wire import nvme as N

FAR = 10 * 1_000_000_000  # a deadline we never mean to reach
STALE = 60 * 1_000_000_000  # no heartbeat is pumped here: the card must not look dead
_records = WriteMaker()
write = _records.write


class Rig(CardRig):
    """`CardRig` on nvme-pi, the acker's refusals collected; `card()` is one
    acker pump then one worker poll."""

    def __init__(self, run, *, data_size: int = 1 << 20, sq: int = 8, slots: int = 64) -> None:
        super().__init__(run, slots=slots, data_size=data_size, sq=sq, verify=False, transport="nvme-pi",
                         stale_after_ns=STALE)
        self.refused: list[tuple] = []
        self.acker.on_refused = lambda *a: self.refused.append(a)

    def card(self) -> list:
        self.acker.pump()
        return self.worker.poll()


@pytest.fixture
def rig(tmp_path):
    rigs: list[Rig] = []

    def make(**kw) -> Rig:
        r = Rig(tmp_path / f"run{len(rigs)}", **kw)
        rigs.append(r)
        return r

    yield make
    for r in rigs:
        r.close()


def test_the_worker_gets_what_the_inline_endpoint_would_through_many_laps(rig, rng, tmp_path):
    """Unaligned, multi-block and one-byte writes with outcomes, zero, trim
    and barrier: the SQ/CQ (8 entries) and the 1 MiB namespace wrap many
    times; the worker's records equal the inline endpoint's for the same
    stream, identity and bytes, and every block is freed again."""
    r = rig()
    inline = NvmePiEndpoint(tmp_path / "inline", data_size=1 << 20, sq_entries=8, cq_entries=8)
    isp = NvmePiSplitter.connect(str(inline.socket_path), stale_after_ns=STALE)
    try:
        for i in range(300):
            if i % 50 == 49:
                op = [Op.ZERO, Op.TRIM, Op.BARRIER][i % 3]
                w = AugmentedWrite(_records.next_id(), 2, i + 1, 9, op, WFlag.FUA, 0 if op is Op.BARRIER else 4096,
                                   0 if op is Op.BARRIER else 8192, i, None)
            else:
                length = rng.choice([1, 512, 4096, 4097, 5000, 12288, 70000])
                voffset = rng.choice([0, 3, 4095, 4096 * rng.randrange(1 << 20), rng.randrange(1 << 40)])
                w = write(rng.randbytes(length), vdisk=rng.randrange(N.MAX_VDISK_ID + 1), voffset=voffset, cg=2,
                          seq=i + 1, flags=rng.choice([WFlag.NONE, WFlag.FUA, WFlag.GAP]))
            got = []
            for sp, card in ((r.sp, r.card), (isp, inline.poll)):
                assert sp.submit(w)
                recs = card()
                assert sp.wait_ack(w.io_id, time.monotonic_ns() + FAR)
                (rec,) = recs
                got.append((rec.io_id, rec.cg_id, rec.cg_seq, rec.vdisk_id, rec.op, rec.flags, rec.voffset,
                            rec.length, rec.timestamp_ns, None if rec.data is None else bytes(rec.data)))
                del rec, recs
                if w.op is Op.WRITE:
                    (r.worker if sp is r.sp else inline).release(w.io_id)
                assert sp.post_outcome(w.io_id, Status.COMMITTED)
                assert card() == [Outcome(w.io_id, Status.COMMITTED)]
            assert got[0] == got[1]
            assert got[0][:9] == (w.io_id, w.cg_id, w.cg_seq, w.vdisk_id, w.op, w.flags, w.voffset, w.length,
                                  w.timestamp_ns)
            assert got[0][9] == (None if w.data is None else bytes(w.data))
    finally:
        isp.close()
        inline.close()
    es, st = r.acker.statistics(), r.worker.statistics()
    assert es.writes == 300 and es.outcomes == 300 and es.bad == 0, es  # zero, trim, barrier count as writes
    assert st["held"] == 0 and st["guard_errors"] == 0 and st["pi_errors"] == 0, st
    assert st["released"] > (1 << 20)  # the namespace wrapped, and the floor freed every block
    assert r.refused == []


def corrupt_data(data, off, nb):
    data[off + N.EXT + 1234] ^= 0x40  # a data byte of block 1 the guard already covers


def test_a_guard_error_completes_282h_goes_to_the_lost_log_and_frees_its_blocks(rig, rng):
    r = rig()
    good = write(rng.randbytes(4096), seq=1)
    assert r.sp.submit(good)
    (rec,) = r.card()
    assert r.sp.wait_ack(good.io_id, time.monotonic_ns() + FAR)
    del rec
    r.sp.fault_after_pi = corrupt_data
    bad = write(rng.randbytes(8192), vdisk=5, voffset=4096 * 10, cg=3, seq=2)
    assert r.sp.submit(bad)
    assert r.card() == []  # never handed to the pipeline
    assert r.sp.wait_ack(bad.io_id, time.monotonic_ns() + FAR) is False
    r.sp.fault_after_pi = None
    assert r.sp.statistics().refused_status == N.Status.GUARD_CHECK == 0x282
    assert r.refused == [(bad.io_id, 5, 4096 * 10, 8192, "GUARD_CHECK")]  # reported before its blocks are freed
    assert r.worker.skipped == [(3, 2)]  # hold skips its seq
    st, es = r.worker.statistics(), r.acker.statistics()
    assert (st["guard_errors"], st["pi_errors"], es.guard_errors, es.bad) == (1, 0, 1, 1), (st, es)
    r.worker.release(good.io_id)
    assert r.sp.released_position() >= 3 * N.EXT  # the good write's block and the bad one's two, in order
    after = write(rng.randbytes(100), seq=3)  # nothing is stuck
    assert r.sp.submit(after)
    (rec,) = r.card()
    assert r.sp.wait_ack(after.io_id, time.monotonic_ns() + FAR) and bytes(rec.data) == after.data


def test_a_duplicate_io_id_while_held_is_refused_cid_conflict(rig, rng):
    r = rig()
    w = write(rng.randbytes(4096), seq=1)
    assert r.sp.submit(w)
    (rec,) = r.card()
    assert r.sp.wait_ack(w.io_id, time.monotonic_ns() + FAR)
    again = AugmentedWrite(w.io_id, 1, 2, 1, Op.WRITE, WFlag.NONE, 8192, 4096, 5, rng.randbytes(4096))
    assert r.sp.submit(again)
    assert r.card() == []
    assert r.sp.wait_ack(w.io_id, time.monotonic_ns() + FAR) is False
    assert r.sp.statistics().refused_status == N.Status.CID_CONFLICT
    assert r.worker.skipped == [(1, 2)]
    assert bytes(rec.data) == w.data  # the held one is untouched


def test_a_full_worker_gets_writes_refused_not_ready_and_their_seqs_skipped(rig, rng):
    r = rig()
    r.worker.set_full(True)
    w = write(rng.randbytes(4096), cg=4, seq=7)
    z = AugmentedWrite(_records.next_id(), 4, 8, 1, Op.ZERO, WFlag.NONE, 0, 4096, 5, None)
    for x in (w, z):
        assert r.sp.submit(x)
    assert r.card() == []
    for x in (w, z):
        assert r.sp.wait_ack(x.io_id, time.monotonic_ns() + FAR) is False
    assert r.sp.statistics().refused_status == N.Status.NS_NOT_READY
    assert r.worker.skipped == [(4, 7), (4, 8)]
    r.worker.set_full(False)
    ok = write(rng.randbytes(4096), cg=4, seq=9)
    assert r.sp.submit(ok)
    (rec,) = r.card()
    assert r.sp.wait_ack(ok.io_id, time.monotonic_ns() + FAR) and rec.cg_seq == 9
