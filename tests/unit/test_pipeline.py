"""Card pipeline stages, in-process and deterministic: a fake endpoint feeds
writes and outcomes, a fake appliance opens the batches and answers acks."""

from __future__ import annotations

import pytest

from nicsplit.card.pipeline import CardPipeline, PipelineConfig
from nicsplit.core.records import RFLAG_IN_WINDOW
from nicsplit.card.pipeline.batch import Batcher
from nicsplit.card.pipeline.compress import Compressor
from nicsplit.card.pipeline.dedup import Dedup
from nicsplit.card.pipeline.encrypt import Encryptor
from nicsplit.card.pipeline.hold import Hold
from nicsplit.card.pipeline.items import Item, Resolved
from nicsplit.testing.pipeline import FakeAppliance, FakeCatalog, FakeEndpoint, committed, failed, write
from nicsplit.core.records import Op, WFlag
from nicsplit.wire.frames import (
    COMPRESS_NONE, COMPRESS_ZSTD, PROTOCOL_VERSION, Batch, FrameError, Hello, Record, batch_aad, decode_records,
    encode_records, expand, fingerprint,
)
from nicsplit.wire.envelope import seal, unseal

KEY = bytes(range(32))
MS = 1_000_000
CAT = FakeCatalog({1: ("cgA", "a-root", 1 << 20), 2: ("cgA", "a-data", 1 << 20), 3: ("cgB", "b-root", 1 << 20)})
CG_OF = {1: 1, 2: 1, 3: 2}  # vdisk → cg_id


def blk(n: int, size: int = 4096) -> bytes:
    return bytes([n & 0xFF]) * size


class Rig:
    """Pipeline + fake endpoint + fake appliance on a manual clock."""

    def __init__(self, key: bytes | None = KEY, **cfg) -> None:
        cfg.setdefault("batch_delay_us", 0)
        self.ep = FakeEndpoint()
        self.lost = []
        self.p = CardPipeline(CAT, release=self.ep.release, on_lost=self.lost.append, key=key,
                              config=PipelineConfig(**cfg))
        self.p.add_cgs(CAT.cg_names())
        self.app = FakeAppliance(key)
        self.wire: list[bytes] = []
        self.t = 0
        self.seqs = {1: 0, 2: 0}
        self.io = 0

    def w(self, vdisk: int, data: bytes = b"", *, offset: int = 0, op: Op = Op.WRITE, length=None, flags=WFlag.NONE):
        cg = CG_OF[vdisk]
        self.seqs[cg] += 1
        self.io += 1
        return write(self.io, self.seqs[cg], cg_id=cg, vdisk_id=vdisk, offset=offset, data=data, op=op,
                     length=length, flags=flags, ts=1_000 + self.io)

    def step(self, *entries, dt_ms: float = 1) -> None:
        self.ep.push(*entries)
        self.t += int(dt_ms * MS)
        self.p.feed(self.ep.poll(), self.t)
        self.p.tick(self.t)

    def connect(self) -> None:
        self.app.connect()
        hello = Hello("card-test", PROTOCOL_VERSION, self.p.cgs())
        self.p.window.connected(self.app.hello(hello).resume, self.wire.append)

    def deliver(self, *, acks: bool = True) -> None:
        frames, self.wire[:] = list(self.wire), []
        for f in frames:
            for ack in self.app.receive(f):
                if acks:
                    self.p.window.on_ack(ack)
        self.p.pump(self.t)

    def seqs_shipped(self, cg: str) -> list[int]:
        return [r.seq for r in self.app.records(cg)]


# -- resolve + hold: order and P3 ----------------------------------------------------


def test_seq_order_preserved_per_cg_across_vdisks_with_outcomes_out_of_order():
    r = Rig()
    r.connect()
    ws = [r.w(v, blk(i)) for i, v in enumerate([1, 2, 3, 1, 3, 2, 2, 1])]
    r.step(*ws)
    assert r.wire == []  # nothing committed yet
    for w in reversed(ws):  # outcomes in reverse order: hold must reorder
        r.step(committed(w.io_id))
    r.deliver()
    assert r.seqs_shipped("cgA") == [1, 2, 3, 4, 5, 6]
    assert [j.record.vdisk_id for j in r.app.journal if j.cg == "cgA"] == [1, 2, 1, 2, 2, 1]
    assert r.seqs_shipped("cgB") == [1, 2]
    assert sorted(r.ep.released) == sorted(w.io_id for w in ws) and not r.ep.held


def test_seq_n_waits_for_every_lower_seq():
    r = Rig()
    r.connect()
    a, b, c = r.w(1, blk(1)), r.w(2, blk(2)), r.w(1, blk(3))
    r.step(a, b, c, committed(b.io_id), committed(c.io_id))
    r.deliver()
    assert r.app.journal == []
    r.step(committed(a.io_id))
    r.deliver()
    assert r.seqs_shipped("cgA") == [1, 2, 3]


def test_failed_writes_are_never_shipped_and_released_at_once():
    r = Rig()
    r.connect()
    a, b, c = r.w(1, blk(1)), r.w(1, blk(2), offset=4096), r.w(2, blk(3))
    r.step(a, b, c, failed(b.io_id))
    assert r.ep.released == [b.io_id]  # freed before anything is shipped
    r.step(committed(a.io_id), committed(c.io_id))
    r.deliver()
    assert r.seqs_shipped("cgA") == [1, 3]
    assert all(rec.data != blk(2) for rec in r.app.records("cgA"))
    assert r.p.statistics().hold.failed == 1 and r.lost == []


def test_missing_outcome_times_out_to_on_lost_and_the_cg_moves_on():
    r = Rig(outcome_timeout_ms=50)
    r.connect()
    a, b = r.w(1, blk(1)), r.w(2, blk(2))
    r.step(a, b, committed(b.io_id))
    r.deliver()
    assert r.app.journal == [] and r.lost == []
    r.step(dt_ms=60)
    assert r.lost == [a]  # the lead marks its region dirty
    assert a.io_id in r.ep.released
    r.deliver()
    assert r.seqs_shipped("cgA") == [2]
    r.step(committed(a.io_id))  # a late outcome changes nothing...
    r.step(dt_ms=60)  # ...and is forgotten after the timeout
    r.deliver()
    assert r.seqs_shipped("cgA") == [2]
    st = r.p.statistics().hold
    assert st.lost_timeout == 1 and st.stray_outcomes == 1 and st.held == 0


def test_seq_that_never_arrives_is_skipped_after_the_timeout():
    r = Rig(outcome_timeout_ms=50)
    r.connect()
    a = r.w(1, blk(1))
    r.seqs[1] += 1  # seq 2 is never handed to the card (the splitter marked it itself)
    c = r.w(1, blk(3))
    r.step(a, c, committed(a.io_id), committed(c.io_id))
    r.deliver()
    assert r.seqs_shipped("cgA") == [1]
    r.step(dt_ms=60)
    r.deliver()
    assert r.seqs_shipped("cgA") == [1, 3]
    assert r.p.statistics().hold.gaps_skipped == 1 and r.lost == []


def test_late_or_repeated_seq_is_lost_not_shipped_out_of_order():
    r = Rig()
    r.connect()
    a, b = r.w(1, blk(1)), r.w(1, blk(2))
    r.step(b, committed(b.io_id))  # seq 2 first: the lane starts at 2
    r.step(a, committed(a.io_id))
    dup = write(999, 2, cg_id=1, vdisk_id=1, data=blk(9))
    r.step(dup)
    r.deliver()
    assert r.seqs_shipped("cgA") == [2]
    assert r.lost == [a, dup]
    assert r.p.statistics().hold.lost_late == 2


def test_resolve_drops_unknown_vdisk_and_out_of_range_without_blocking_the_cg():
    r = Rig()
    r.connect()
    a = r.w(1, blk(1))
    bad_vd = write(100, 2, cg_id=1, vdisk_id=77, data=blk(2))
    bad_range = write(101, 3, cg_id=1, vdisk_id=1, offset=(1 << 20) - 4096 + 1, data=blk(3))
    bad_len = write(102, 4, cg_id=1, vdisk_id=2, data=blk(4), length=8192)
    r.seqs[1] = 4
    d = r.w(2, blk(5))
    r.step(a, bad_vd, bad_range, bad_len, d)
    assert r.lost == [bad_vd, bad_range, bad_len]
    assert set(r.ep.released) == {100, 101, 102}
    r.step(committed(a.io_id), committed(d.io_id), committed(100))
    r.deliver()
    assert r.seqs_shipped("cgA") == [1, 5]
    st = r.p.statistics().resolve
    assert (st.dropped_unknown_vdisk, st.dropped_out_of_range, st.dropped_bad_payload) == (1, 1, 1)


def test_resolve_refreshes_a_stale_catalog_once():
    class Stale(FakeCatalog):
        refreshed = 0

        def refresh(self):
            self.refreshed += 1
            self.vdisks[9] = ("cgA", "new", 1 << 20)

    cat = Stale({1: ("cgA", "a", 1 << 20)})
    ep = FakeEndpoint()
    p = CardPipeline(cat, release=ep.release, on_lost=lambda w: pytest.fail("lost"), key=None)
    w = write(1, 1, vdisk_id=9, data=blk(1))
    ep.push(w)
    p.feed(ep.poll(), 0)
    assert cat.refreshed == 1 and p.statistics().resolve.resolved == 1


# -- merge -------------------------------------------------------------------------


def replay(records, images=None):
    images = images if images is not None else {}
    for rec in records:
        img = images.setdefault(rec.vdisk_id, bytearray(1 << 16))
        if rec.op == Op.WRITE:
            img[rec.offset:rec.offset + rec.length] = rec.data
        elif rec.op in (Op.ZERO, Op.TRIM):
            img[rec.offset:rec.offset + rec.length] = bytes(rec.length)
    return images


def test_merge_off_every_write_is_its_own_record():
    r = Rig()
    r.connect()
    ws = [r.w(1, blk(i), offset=0) for i in range(5)]
    r.step(*ws, *(committed(w.io_id) for w in ws))
    r.deliver()
    recs = r.app.records("cgA")
    assert [x.seq for x in recs] == [1, 2, 3, 4, 5]
    assert not any(x.flags & RFLAG_IN_WINDOW for x in recs)


def test_merge_folds_overlapping_writes_inside_a_window():
    r = Rig(merge_window_ms=10)
    r.connect()
    ws = [
        r.w(1, blk(1, 8192), offset=0),
        r.w(2, blk(2), offset=0),
        r.w(1, blk(3), offset=4096),  # overwrites the second half of write 1
        r.w(1, blk(4), offset=8192),  # touches: folds too
        r.w(1, blk(5), offset=40960),  # separate range: own record
    ]
    r.step(*ws, *(committed(w.io_id) for w in ws), dt_ms=1)
    r.deliver()
    assert r.app.journal == []  # window still open
    r.step(dt_ms=10)
    r.deliver()
    recs = r.app.records("cgA")
    assert [x.seq for x in recs] == [2, 4, 5]
    folded = recs[1]
    assert (folded.vdisk_id, folded.offset, folded.length) == (1, 0, 12288)
    assert folded.data == blk(1) + blk(3) + blk(4)
    assert [bool(x.flags & RFLAG_IN_WINDOW) for x in recs] == [True, True, False]
    direct = replay([Record(w.cg_seq, w.io_id, w.vdisk_id, w.op, 0, w.voffset, w.length, 0, bytes(w.data)) for w in ws])
    assert replay(recs) == direct
    assert sorted(r.ep.released) == sorted(w.io_id for w in ws)  # every folded write's slot freed


def test_merge_barrier_fua_and_overlapping_zero_close_the_window():
    r = Rig(merge_window_ms=1000)
    r.connect()
    ws = [
        r.w(1, blk(1), offset=0),
        r.w(1, blk(2), offset=0),
        r.w(1, op=Op.BARRIER),  # closes: 1+2 folded, then the barrier
        r.w(1, blk(3), offset=0),
        r.w(1, op=Op.ZERO, offset=0, length=4096),  # overlaps write 4: closes before it
        r.w(1, blk(4), offset=0),
        r.w(1, blk(5), offset=0, flags=WFlag.FUA),  # folds 6+7, FUA closes
    ]
    r.step(*ws, *(committed(w.io_id) for w in ws))
    r.deliver()
    recs = r.app.records("cgA")
    assert [(x.seq, Op(x.op).name) for x in recs] == [(2, "WRITE"), (3, "BARRIER"), (4, "WRITE"), (5, "ZERO"),
                                                      (7, "WRITE")]
    assert recs[-1].data == blk(5) and recs[-1].flags & WFlag.FUA
    assert [bool(x.flags & RFLAG_IN_WINDOW) for x in recs] == [True, False, False, True, False]
    assert r.p.merger.statistics().open_windows == 0


# -- dedup -------------------------------------------------------------------------


def test_dedup_turns_confirmed_blocks_into_refs_and_expand_restores_them():
    r = Rig()
    r.connect()
    first = r.w(1, blk(1) + blk(2) + b"tail")
    r.step(first, committed(first.io_id))
    r.deliver()  # the ack's known set teaches dedup blk(1), blk(2)
    assert r.p.dedup.statistics().known == 2
    second = r.w(2, blk(7) + blk(2) + blk(1))
    r.step(second, committed(second.io_id))
    frames = list(r.wire)
    r.deliver()
    sent = decode_records(unseal(_body(frames[-1]), KEY, _aad(frames[-1])))
    assert sent[0].refs == ((1, fingerprint(blk(2))), (2, fingerprint(blk(1))))
    assert sent[0].data == blk(7)
    assert expand(sent[0], r.app.blocks["cgA"].__getitem__) == second.data
    assert r.app.records("cgA")[-1].data == second.data
    assert r.p.dedup.statistics().ref_blocks == 2
    before = len(first.data) + len(second.data)  # 6 blocks and a tail; 2 blocks went as refs
    assert r.p.cg_report()["cgA"]["dedup_ratio"] == round(before / (before - 2 * 4096), 4)


def test_dedup_only_trusts_acked_fingerprints_and_its_lru_is_bounded():
    d = Dedup(known_max=2)
    item = Item("cg", 1, 1, Op.WRITE, 0, 0, 8192, 0, blk(1) + blk(2), (1,))
    rec, ids = d.apply(item)
    assert rec.refs == () and ids == (1,)  # nothing confirmed yet
    d.learn("cg", [fingerprint(blk(1)), fingerprint(blk(2)), fingerprint(blk(3))])
    st = d.statistics()
    assert (st.known, st.evicted) == (2, 1)  # blk(1) evicted first
    rec, _ = d.apply(item)
    assert [i for i, _ in rec.refs] == [1] and rec.data == blk(1)


def test_dedup_forgets_a_block_past_its_horizon_and_relearns_it():
    d = Dedup(known_max=16, horizon_s=600)
    item = Item("cg", 1, 1, Op.WRITE, 0, 0, 8192, 0, blk(1) + blk(2), (1,))
    d.learn("cg", [fingerprint(blk(1)), fingerprint(blk(2))])
    assert len(d.apply(item)[0].refs) == 2
    d._known[("cg", fingerprint(blk(1)))] -= 601 * 10**9  # learned 601 s ago
    d.apply(item)  # a hit does not extend the horizon ...
    rec, _ = d.apply(item)
    assert [i for i, _ in rec.refs] == [1] and rec.data == blk(1)  # ... blk(1) goes as data again
    st = d.statistics()
    assert (st.expired, st.known) == (1, 1)
    d.learn("cg", [fingerprint(blk(1))])  # the appliance confirmed the new copy
    assert len(d.apply(item)[0].refs) == 2


def test_dedup_references_resolve_per_cg_only():
    r = Rig()
    r.connect()
    a = r.w(1, blk(1))
    r.step(a, committed(a.io_id))
    r.deliver()
    b = r.w(3, blk(1))  # cgB: same block, but cgB's journal does not hold it
    r.step(b, committed(b.io_id))
    r.deliver()
    assert r.p.dedup.statistics().ref_blocks == 0
    assert r.app.records("cgB")[0].data == blk(1)
    c = r.w(3, blk(1))  # now cgB confirmed it too
    r.step(c, committed(c.io_id))
    r.deliver()
    assert r.p.dedup.statistics().ref_blocks == 1


def _body(frame: bytes) -> bytes:
    from nicsplit.wire.frames import FrameDecoder
    dec = FrameDecoder()
    dec.receive_data(frame)
    return dec.next_event().body


def _aad(frame: bytes) -> bytes:
    from dataclasses import replace

    from nicsplit.wire.frames import FrameDecoder
    dec = FrameDecoder()
    dec.receive_data(frame)
    return batch_aad(replace(dec.next_event(), body=b""))


# -- compress + encrypt --------------------------------------------------------------


def _sealed(key, plain, compress=True):
    head = Batch(7, "cgA", 1, 3, 10, 20, b"")
    tag, payload = Compressor(level=3, enabled=compress).compress(plain)
    return head, Encryptor(key).seal(tag, payload, batch_aad(head)), tag


@pytest.mark.parametrize("key", [KEY, None])
def test_compress_encrypt_round_trip_through_frames_unseal(key):
    recs = [Record(s, s, 1, Op.WRITE, 0, 0, 8192, s, blk(s, 8192)) for s in (1, 2, 3)]
    plain = encode_records(recs)
    head, body, tag = _sealed(key, plain)
    assert tag == COMPRESS_ZSTD and len(body) < len(plain)
    assert decode_records(unseal(body, key, batch_aad(head))) == recs
    # and what frames.seal makes, our unseal path agrees on
    assert unseal(seal(plain, key, batch_aad(head)), key, batch_aad(head)) == plain


def test_incompressible_batch_goes_uncompressed():
    import os
    plain = os.urandom(10000)
    head, body, tag = _sealed(KEY, plain)
    assert tag == COMPRESS_NONE and unseal(body, KEY, batch_aad(head)) == plain


@pytest.mark.parametrize("where", ["body", "header", "tag", "envelope"])
def test_a_flipped_byte_fails_authentication(where):
    from dataclasses import replace
    plain = encode_records([Record(1, 1, 1, Op.WRITE, 0, 0, 4096, 0, blk(1))])
    head, body, _ = _sealed(KEY, plain)
    aad = batch_aad(head)
    b = bytearray(body)
    if where == "body":
        b[20] ^= 1
    elif where == "tag":
        b[-1] ^= 0x80
    elif where == "envelope":
        b[2] ^= 1  # a nonce byte
    else:
        aad = batch_aad(replace(head, last_seq=4))
    with pytest.raises(FrameError):
        unseal(bytes(b), KEY, aad)


def test_a_keyed_appliance_refuses_an_unencrypted_batch():
    head, body, _ = _sealed(None, b"x" * 100)
    with pytest.raises(FrameError):
        unseal(body, KEY, batch_aad(head))


# -- batching ----------------------------------------------------------------------


def test_batches_close_on_bytes_records_and_delay_with_monotonic_ids():
    b = Batcher(batch_bytes=10_000, batch_records=3, batch_delay_us=500, max_ready=100, first_batch_id=40)
    rec = lambda s, n=100: Record(s, s, 1, Op.WRITE, 0, 0, n, 0, b"x" * n)  # noqa: E731
    for s in (1, 2, 3):
        b.add("a", rec(s), (s,), 0)  # closes on count
    b.add("a", rec(4, 9000), (4,), 0)
    b.add("a", rec(5, 2000), (5,), 0)  # would exceed 10 000: closes the open one first
    b.add("b", rec(1), (6,), 0)
    b.tick(499_000)
    assert b.statistics().ready == 2
    b.tick(500_000)  # delay: both open batches close
    got = []
    while (p := b.pop()) is not None:
        got.append((p.batch_id, p.cg, [r.seq for r in p.records], p.io_ids))
    assert got == [(40, "a", [1, 2, 3], [1, 2, 3]), (41, "a", [4], [4]), (42, "a", [5], [5]), (43, "b", [1], [6])]
    st = b.statistics()
    assert (st.closed_by_count, st.closed_by_size, st.closed_by_delay) == (1, 1, 2)


def test_batch_header_binds_seq_and_time_range():
    r = Rig(batch_delay_us=10_000, batch_records=100)
    r.connect()
    ws = [r.w(1, blk(i)) for i in range(3)]
    r.step(*ws, *(committed(w.io_id) for w in ws))
    assert r.wire == []  # the batch is open for 10 ms
    r.step(dt_ms=10)
    from nicsplit.wire.frames import FrameDecoder
    dec = FrameDecoder()
    dec.receive_data(r.wire[0])
    b = dec.next_event()
    assert (b.cg, b.first_seq, b.last_seq) == ("cgA", 1, 3)
    assert (b.t_first_ns, b.t_last_ns) == (ws[0].timestamp_ns, ws[-1].timestamp_ns)


@pytest.mark.parametrize("merge_window_ms", [0, 5])
def test_a_barrier_closes_its_cgs_batch_at_once_and_leaves_the_others_open(merge_window_ms):
    """A bookmark's PIT waits for the barrier's batch: it must not wait out
    the batch delay (50 ms by default with the fast path in a process)."""
    r = Rig(batch_delay_us=50_000, batch_records=1000, merge_window_ms=merge_window_ms)
    r.connect()
    ws = [r.w(1, blk(1)), r.w(2, blk(2), offset=8192), r.w(3, blk(3)), r.w(1, op=Op.BARRIER), r.w(1, blk(4))]
    r.step(*ws, *(committed(w.io_id) for w in ws), dt_ms=1 + merge_window_ms)
    r.deliver(acks=False)
    assert [(x.seq, Op(x.op).name) for x in r.app.records("cgA")] == [(1, "WRITE"), (2, "WRITE"), (3, "BARRIER")]
    assert r.app.records("cgB") == []  # cgB's batch (no barrier) waits for its delay
    assert r.p.batcher.statistics().closed_by_barrier == 1
    r.step(dt_ms=50)  # the merge window (if any) lets the write after the barrier go, opening a batch
    r.step(dt_ms=50)
    r.deliver(acks=False)
    assert [x.seq for x in r.app.records("cgA")] == [1, 2, 3, 4] and [x.seq for x in r.app.records("cgB")] == [1]


# -- ship window: retransmit, resume, release only after durable ---------------------


def test_retransmit_after_disconnect_ships_every_unacked_batch_and_releases_nothing_early():
    r = Rig()
    r.connect()
    ws = [r.w(1 + i % 2, blk(i)) for i in range(6)]
    r.step(*ws, *(committed(w.io_id) for w in ws))
    first_send = list(r.wire)
    assert len(first_send) == 6
    r.wire.clear()  # the link dies: everything in flight is lost
    r.p.window.disconnected()
    assert r.ep.released == []
    more = r.w(1, blk(9))
    r.step(more, committed(more.io_id))
    assert r.wire == []  # not connected: queued, not sent
    r.connect()
    assert r.wire == first_send + r.wire[6:] and len(r.wire) == 7  # same frames, same order, then the new one
    assert r.ep.released == []
    r.deliver()
    assert r.seqs_shipped("cgA") == [1, 2, 3, 4, 5, 6, 7]
    assert sorted(r.ep.released) == sorted(w.io_id for w in ws + [more])
    st = r.p.window.statistics()
    assert st.retransmits == 6 and st.unacked == 0


def test_non_durable_acks_release_nothing():
    r = Rig()
    r.connect()
    r.app.durable_acks = False
    w = r.w(1, blk(1))
    r.step(w, committed(w.io_id))
    r.deliver()
    assert r.ep.released == [] and r.p.window.statistics().unacked == 1


def test_resume_skips_batches_already_durable():
    r = Rig()
    r.connect()
    ws = [r.w(1, blk(i)) for i in range(4)]
    r.step(*ws, *(committed(w.io_id) for w in ws))
    r.deliver(acks=False)  # journaled and durable, but every ack was lost
    assert r.ep.released == [] and r.p.window.statistics().unacked == 4
    r.p.window.disconnected()
    r.connect()  # HelloAck.resume = {"cgA": 4}
    assert r.wire == []  # nothing resent
    assert sorted(r.ep.released) == sorted(w.io_id for w in ws)
    assert r.p.window.statistics().skipped_by_resume == 4
    assert r.app.duplicates == 0


def test_a_durable_ack_covers_every_earlier_batch_of_its_cg():
    r = Rig()
    r.connect()
    ws = [r.w(1, blk(i)) for i in range(3)] + [r.w(3, blk(9))]
    r.step(*ws, *(committed(w.io_id) for w in ws))
    frames = list(r.wire)
    r.wire.clear()
    acks = [a for f in frames for a in r.app.receive(f)]
    r.p.window.on_ack(acks[2])  # only the third cgA batch's ack arrives
    assert sorted(r.ep.released) == sorted(w.io_id for w in ws[:3])
    assert r.p.window.statistics().unacked == 1  # cgB still unacked


# -- bounds ------------------------------------------------------------------------


def test_bounded_queues_report_full_instead_of_growing():
    r = Rig(ship_window=2, batch_max_ready=2, hold_max_writes=10)
    r.connect()
    ws = [r.w(1, blk(i % 256), offset=(i % 200) * 4096) for i in range(40)]
    for w in ws:
        r.step(w, committed(w.io_id))
    st = r.p.statistics()
    assert st.ship.unacked == 2 and st.batch.ready == 2
    assert st.hold.held == 10 and st.full and r.p.full
    assert st.hold.refused_full == 40 - 10 - 2 - 2
    assert len(r.lost) == st.hold.refused_full  # refused writes are reported, never queued
    # acks drain it
    while r.wire or r.p.window.statistics().unacked:
        r.deliver()
    assert not r.p.full
    assert r.seqs_shipped("cgA") == list(range(1, 15))
    assert not r.ep.held  # every payload released exactly once
    nxt = r.w(1, blk(1))  # the refused seqs do not block the CG (no gap timeout)
    r.step(nxt, committed(nxt.io_id))
    r.deliver()
    assert r.seqs_shipped("cgA")[-1] == 41


def test_hold_rejects_bad_bounds():
    with pytest.raises(ValueError):
        Hold(on_lost=print, release=print, max_writes=0)


def test_statistics_are_frozen_dataclasses():
    import dataclasses
    r = Rig()
    st = r.p.statistics()
    for f in dataclasses.fields(st):
        v = getattr(st, f.name)
        if dataclasses.is_dataclass(v):
            with pytest.raises(dataclasses.FrozenInstanceError):
                setattr(v, dataclasses.fields(v)[0].name, 0)
    assert isinstance(r.p.snapshot()["hold"]["held"], int)


def test_every_payload_released_exactly_once_and_non_payload_writes_never():
    r = Rig(merge_window_ms=5)
    r.connect()
    ws = [r.w(1, blk(1)), r.w(1, op=Op.TRIM, offset=65536, length=4096), r.w(2, blk(2)), r.w(1, op=Op.BARRIER)]
    r.step(*ws, *(committed(w.io_id) for w in ws), dt_ms=10)
    r.deliver()
    assert sorted(r.ep.released) == [ws[0].io_id, ws[2].io_id]  # the fake raises on a second release
    assert r.p.statistics().released == 2


def test_resolved_helper_item_of():
    w = write(5, 3, data=blk(1))
    it = Item.of(Resolved(w, "cgA", "a", 4096))
    assert (it.seq, it.io_ids, it.length) == (3, (5,), 4096)


def test_cg_report_rpo_counts_writes_batched_or_shipped_but_not_durable():
    r = Rig(batch_delay_us=1_000_000)
    w = r.w(1, blk(1))
    r.step(w, committed(w.io_id))
    rep = r.p.cg_report(wall_ns=w.timestamp_ns + 2_000_000_000)
    assert rep["cgA"]["rpo_seconds"] == pytest.approx(2.0) and rep["cgB"]["rpo_seconds"] == 0.0
    assert rep["cgA"]["rpo_bytes"] == 4096 and rep["cgB"]["rpo_bytes"] == 0  # acked, not durable
    assert rep["cgA"]["out_bytes_total"] == 0 and rep["cgB"]["compression_ratio"] is None
    r.connect()
    r.p.drain(r.t)
    r.deliver()
    rep = r.p.cg_report(wall_ns=w.timestamp_ns + 3_000_000_000)
    ratios = {k: rep["cgA"].pop(k) for k in ("compression_ratio", "dedup_ratio")}
    assert rep["cgA"].pop("out_bytes_total") > 4096 // ratios["compression_ratio"]
    assert rep["cgA"].pop("in_bytes_total") == 4096
    assert rep["cgA"] == {"last_durable_seq": 1, "unacked_batches": 0, "rpo_seconds": 0.0, "rpo_bytes": 0}
    assert ratios["compression_ratio"] > 1 and ratios["dedup_ratio"] == 1.0, ratios  # blk() compresses; nothing known yet
