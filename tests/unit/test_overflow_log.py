"""The card's overflow log (nicsplit.card.overflow): record codec, torn tail
at open, and the card riding out a stalled appliance through it (FakeEndpoint
and FakeAppliance in-process, no processes): no refusal, everything reaches
the appliance in order, and the log survives a card restart."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from nicsplit.testing.inproc import unix_connector, until
from nicsplit.card.overflow import FILE_MAGIC, REC, Overflow, OverflowLog, TornRecord, decode, encode
from nicsplit.card.pipeline import CardPipeline, PipelineConfig
from nicsplit.card.process import CardConfig, CardProcess
from nicsplit.card.transports.ring_endpoint import RingEndpoint
from nicsplit.card.transports.ring_splitter import RingSplitter
from nicsplit.core.records import AugmentedWrite, Op, Outcome, Status, WFlag
from nicsplit.wire.frames import Ack
from nicsplit.testing.pipeline import (
    FakeAppliance, FakeApplianceServer, FakeCatalog, FakeEndpoint, committed, failed, write,
)

KEY = bytes(range(32))
CAT = FakeCatalog({1: ("cgA", "a1", 1 << 30), 2: ("cgA", "a2", 1 << 30), 3: ("cgB", "b1", 1 << 30)})


def blk(n: int, size: int = 4096) -> bytes:
    return bytes([n % 256]) * size


def _entries(rng, n, *, first_io=1, qd=4):
    """n writes of cgA in seq order with their outcomes trailing by up to ``qd``
    entries (as a host with queue depth ``qd`` posts them); a few fail."""
    ws = [write(first_io + i, i + 1, vdisk_id=1 + i % 2, offset=rng.randrange(256) * 4096,
                data=blk(i, 4096 * rng.randint(1, 4))) for i in range(n)]
    out: list = []
    waiting: list = []
    for w in ws:
        out.append(w)
        waiting.append(w)
        while len(waiting) > rng.randint(0, qd):
            x = waiting.pop(0)
            out.append(failed(x.io_id) if x.cg_seq % 17 == 0 else committed(x.io_id))
    out += [failed(x.io_id) if x.cg_seq % 17 == 0 else committed(x.io_id) for x in waiting]
    return ws, out


# -- codec --------------------------------------------------------------------------


def test_record_codec_round_trip():
    assert REC.size == 72
    cases = [
        write(7, 3, cg_id=2, vdisk_id=9, offset=1 << 40, data=blk(5, 8192), flags=WFlag.FUA, ts=123),
        write(8, 4, op=Op.ZERO, length=1 << 20, offset=4096, ts=5),
        write(9, 5, op=Op.BARRIER, ts=6),
        Outcome(7, Status.COMMITTED),
        Outcome(8, Status.FAILED),
    ]
    buf = b"".join(h + bytes(d) for h, d in map(encode, cases))
    pos, got = 0, []
    while pos < len(buf):
        e, pos, _ = decode(buf, pos)
        got.append(e)
    for a, b in zip(cases, got, strict=True):
        if isinstance(a, Outcome):
            assert a == b
        else:
            assert (a.io_id, a.cg_id, a.cg_seq, a.vdisk_id, a.op, a.flags, a.voffset, a.length, a.timestamp_ns) == \
                   (b.io_id, b.cg_id, b.cg_seq, b.vdisk_id, b.op, b.flags, b.voffset, b.length, b.timestamp_ns)
            assert (None if a.data is None else bytes(a.data)) == (None if b.data is None else bytes(b.data))
    assert decode(buf[:100], 0) is None  # ends inside the first record's payload
    bad = bytearray(buf)
    bad[REC.size + 10] ^= 1  # a payload byte
    with pytest.raises(TornRecord):
        decode(bytes(bad), 0)


def test_open_cuts_a_torn_tail_and_keeps_every_good_entry(tmp_path, rng):
    path = tmp_path / "ovf.log"
    lg = OverflowLog(path, 1 << 30)
    ws, entries = _entries(rng, 20)
    for e in entries:
        assert lg.append(e)
    lg.flush()
    lg.sync()
    good = path.stat().st_size
    lg.close()
    # a crash mid-append: a record head and half its payload
    head, data = encode(write(999, 21, data=blk(1, 65536)))
    with open(path, "ab") as f:
        f.write(head + data[:1000])
    lg = OverflowLog(path, 1 << 30)
    assert lg.entries == lg.unread == len(entries) and lg.cut_bytes == REC.size + 1000
    assert path.stat().st_size == good
    got = []
    while (e := lg.peek()) is not None:
        got.append(e)
        lg.advance()
    assert [type(e).__name__ + str(e.io_id) for e in got] == [type(e).__name__ + str(e.io_id) for e in entries]
    assert [bytes(e.data) for e in got if not isinstance(e, Outcome)] == [w.data for w in ws]
    lg.close()
    # a flipped bit in the 5th record: everything from it on is cut
    sizes = [REC.size + len(encode(e)[1]) for e in entries]
    off = len(FILE_MAGIC) + sum(sizes[:4]) + 20
    with open(path, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0x40]))
    lg = OverflowLog(path, 1 << 30)
    assert lg.entries == 4 and path.stat().st_size == len(FILE_MAGIC) + sum(sizes[:4])
    lg.close()
    path.write_bytes(b"garbage")
    lg = OverflowLog(path, 1 << 30)
    assert lg.entries == 0 and path.read_bytes() == FILE_MAGIC
    lg.close()


def test_a_full_log_refuses_writes_but_takes_outcomes(tmp_path):
    lg = OverflowLog(tmp_path / "o.log", 4 << 20)
    n = 0
    while lg.append(write(n + 1, n + 1, data=blk(n, 65536))):
        n += 1
    assert lg.full and 50 < n < 64 and lg.size <= 4 << 20
    assert lg.append(committed(1))
    lg.close()


def test_a_small_log_is_not_full_while_empty(tmp_path):
    """overflow_max = "1M" made the card full (refusing every write) from its
    start: the reserve kept for the last append was 1 MiB, all of the log."""
    lg = OverflowLog(tmp_path / "o.log", 1 << 20)
    assert not lg.full
    n = 0
    while lg.append(write(n + 1, n + 1, data=blk(n, 65536))):
        n += 1
    assert lg.full and 8 <= n < 16 and lg.size <= 1 << 20
    assert lg.append(committed(1))
    lg.close()


# -- the policy, sans-IO ----------------------------------------------------------------


def test_outcomes_of_writes_waiting_in_hold_are_not_stuck_behind_the_log(tmp_path):
    """Hold full of pending writes whose outcomes sit in the log behind a write
    that does not fit: the outcomes are handed over at once, nothing expires."""
    ep = FakeEndpoint()
    lost = []
    ovf = Overflow(OverflowLog(tmp_path / "o.log"), release_ring=ep.release)
    p = CardPipeline(CAT, release=lambda io: ovf.release(io) or ep.release(io), on_lost=lost.append, key=None,
                     config=PipelineConfig(hold_max_writes=4, batch_delay_us=0, outcome_timeout_ms=50))

    def ack_all():
        for b in list(p.window._unacked.values()):  # test drives the acks by hand
            p.window.on_ack(Ack(b.head.batch_id, b.head.cg, b.head.last_seq, True, ()))

    ws = [write(i, i, data=blk(i)) for i in range(1, 9)]
    ep.push(*ws[:4])
    p.feed(ep.poll(), 0)  # 4 pending writes: hold full
    ep.push(*ws[4:], *(committed(w.io_id) for w in ws))
    entries = ep.poll()
    assert ovf.behind(p, entries, 0.0)
    ovf.divert(entries, p, 1)
    assert ovf.early_outcomes == 4  # seqs 1..4 resolved right away
    ovf.sync_now()
    assert sorted(ep.released) == [5, 6, 7, 8]  # logged and durable: the ring forgets them
    p.window.connected({}, lambda b: None)
    while ovf.active:
        ovf.feed(p, 2)
        ack_all()
        p.tick(3)
    p.drain(4)
    ack_all()
    p.tick(10**9)  # past the outcome timeout: nothing may be waiting
    assert not lost and p.hold.statistics().committed == 8
    assert not ovf.from_log and ovf.log.entries == 0 and ovf.log.resets == 1  # drained: cut back
    ovf.log.close()


# -- the card process --------------------------------------------------------------------


def _card_cfg(tmp_path, **kw):
    m = {"tls": False, "cpus": [], "idle_spin_us": 50, "sleep_max_ms": 1, "batch_delay_us": 0,
         "hold_max_writes": 16, "ship_window": 2, "batch_records": 4, "backoff_min_s": 0.001,
         "backoff_max_s": 0.01, "drain_timeout_s": 0.2}
    m.update(kw)
    return CardConfig.from_mapping(tmp_path, m)


def test_card_keeps_accepting_through_a_stalled_appliance_and_ships_everything_in_order(tmp_path, rng):
    async def main():
        app = FakeAppliance(KEY)
        srv = FakeApplianceServer(app)
        sock = tmp_path / "app.sock"
        ep = FakeEndpoint()
        card = CardProcess(_card_cfg(tmp_path), ep, CAT, key=KEY, connect=unix_connector(sock))
        run = asyncio.create_task(card.run())
        ws, entries = _entries(rng, 400)
        for i in range(0, len(entries), 37):  # no appliance yet: the window and then hold fill up
            ep.push(*entries[i:i + 37])
            await until(lambda: not ep.queue)
        st = card.stats()
        assert st["overflow"]["lagging"] and st["overflow"]["entries"] > 300 and not st["full"]
        assert st["cgs"]["cgA"]["lagging"] and st["cgs"]["cgA"]["rpo_seconds"] > 0
        total = sum(len(w.data) for w in ws)
        assert 0 < st["cgs"]["cgA"]["rpo_bytes"] <= total and st["cgs"]["cgA"]["in_bytes_total"] == total
        assert st["cgs"]["cgA"]["out_bytes_total"] == 0 and st["cgs"]["cgB"]["rpo_bytes"] == 0
        assert not ep.full_flag and not card.lost
        await until(lambda: card.overflow.statistics()["unsynced"] == 0)
        logged = set(ep.released)
        assert len(logged) > 300  # released once durable in the log, not shipped
        server = await asyncio.start_unix_server(srv.handle, path=str(sock))  # the appliance is back
        await until(lambda: len(app.records("cgA")) == sum(1 for w in ws if w.cg_seq % 17))
        assert [r.seq for r in app.records("cgA")] == [w.cg_seq for w in ws if w.cg_seq % 17]
        assert [bytes(r.data) for r in app.records("cgA")] == [w.data for w in ws if w.cg_seq % 17]
        await until(lambda: not ep.held and card.overflow.log.entries == 0)  # drained and cut back
        assert not ep.full_flag and not card.lost and app.duplicates == 0
        st = card.stats()
        assert st["overflow"]["lagging"] is False
        assert st["cgs"]["cgA"]["rpo_bytes"] == 0 and st["cgs"]["cgA"]["out_bytes_total"] > 0, st["cgs"]
        assert st["cgs"]["cgA"]["compression_ratio"] > 1 and st["cgs"]["cgA"]["dedup_ratio"] >= 1
        card.stop()
        assert await run == 0
        server.close()

    asyncio.run(main())


def test_ring_pressure_diverts_to_the_log_before_hold_is_full(tmp_path, rng):
    class PressedEndpoint(FakeEndpoint):
        fill_value = 0.9

        def fill(self):
            return self.fill_value

    async def main():
        ep = PressedEndpoint()

        async def never():
            raise OSError("no appliance in this test")

        card = CardProcess(_card_cfg(tmp_path, hold_max_writes=65536), ep, CAT, key=None, connect=never)
        run = asyncio.create_task(card.run())
        ws, entries = _entries(rng, 50)
        ep.push(*entries)
        await until(lambda: not ep.queue and card.overflow.statistics()["unsynced"] == 0)
        st = card.stats()["overflow"]
        assert st["diverted"] == 50 and st["fed"] == 50  # logged, then fed from the log (hold has room)
        assert sorted(ep.released) == [w.io_id for w in ws]  # the ring got its space back
        card.stop()
        await run

    asyncio.run(main())


def test_the_log_survives_a_card_restart_and_is_replayed_in_order(tmp_path, rng):
    async def main():
        ws, entries = _entries(rng, 200)
        ep1 = FakeEndpoint()

        async def never():
            raise OSError("no appliance yet")

        card = CardProcess(_card_cfg(tmp_path), ep1, CAT, key=KEY, connect=never)
        run = asyncio.create_task(card.run())
        for i in range(0, len(entries), 10):  # the first ones go straight to the pipeline
            ep1.push(*entries[i:i + 10])
            await until(lambda: not ep1.queue)
        card.stop()  # drain: syncs the log; what it holds waits for the next start
        assert await run == 0
        logged = sorted(ep1.released)
        # the writes fed before the log took over were spilled into it too
        assert card.overflow.spilled > 0 and not ep1.held
        assert set(logged) == {w.io_id for w in ws}
        size = card.cfg.layout.card_overflow.stat().st_size
        assert size > len(FILE_MAGIC)

        app = FakeAppliance(KEY)
        srv = FakeApplianceServer(app)
        sock = tmp_path / "app.sock"
        server = await asyncio.start_unix_server(srv.handle, path=str(sock))
        ep2 = FakeEndpoint()  # the restarted card's new ring
        card2 = CardProcess(_card_cfg(tmp_path), ep2, CAT, key=KEY, connect=unix_connector(sock))
        assert card2.overflow.log.unread > 0
        # every logged write is acked and not durable: the restarted card counts all of it
        buf, pos, in_log = card2.cfg.layout.card_overflow.read_bytes(), len(FILE_MAGIC), 0
        while pos < len(buf):
            e, pos, _ = decode(buf, pos)
            in_log += len(e.data) if type(e) is not Outcome and e.data is not None else 0
        assert in_log > 0 and card2.stats()["cgs"]["cgA"]["rpo_bytes"] == in_log
        run2 = asyncio.create_task(card2.run())
        more = [write(5000 + i, 201 + i, data=blk(i)) for i in range(5)]
        ep2.push(*more, *(committed(w.io_id) for w in more))  # new writes go behind the replay
        want = [w for w in ws if w.cg_seq % 17] + more
        await until(lambda: len(app.records("cgA")) == len(want))
        assert [r.seq for r in app.records("cgA")] == [w.cg_seq for w in want]
        assert [bytes(r.data) for r in app.records("cgA")] == [bytes(w.data) for w in want]
        await until(lambda: card2.overflow.log.entries == 0 and not ep2.held)
        assert card2.stats()["cgs"]["cgA"]["rpo_bytes"] == 0
        assert sorted(ep2.released) == [w.io_id for w in more]  # replayed writes never touch the new ring
        card2.stop()
        assert await run2 == 0
        server.close()

    asyncio.run(main())


def test_overflow_max_zero_keeps_the_old_refusal(tmp_path):
    async def main():
        ep = FakeEndpoint()

        async def never():
            raise OSError("no appliance")

        card = CardProcess(_card_cfg(tmp_path, overflow_max=0), ep, CAT, key=None, connect=never)
        assert card.overflow is None and card.stats()["overflow"] is None
        run = asyncio.create_task(card.run())
        ep.push(*(write(i, i, data=blk(i)) for i in range(1, 40)))  # no outcomes: hold stays full
        await until(lambda: ep.full_flag)
        assert len(card.lost) == 39 - 16
        card.stop()
        await run

    asyncio.run(main())
    assert not os.path.exists(tmp_path / "run" / "card-overflow.log")


def test_config_parses_overflow_max(tmp_path):
    assert CardConfig.from_mapping(tmp_path, {}).overflow_max == 4 << 30
    assert CardConfig.from_mapping(tmp_path, {"overflow_max": "512M"}).overflow_max == 512 << 20


def test_real_ring_rides_out_a_stalled_appliance_many_times_its_size(tmp_path, rng):
    """The real ring, in-process: a 1 MiB data area, 64 KiB writes, no
    appliance. Writes fed straight to the pipeline are spilled to the log and
    the ring is released as the log becomes durable, so the host never finds
    the ring full; when the appliance comes, every write arrives in order
    with its bytes (hold kept copies, not views into reused ring memory)."""
    ep = RingEndpoint(tmp_path / "run", data_size=1 << 20, sq_entries=256)
    sp = RingSplitter.connect(str(ep.socket_path), stale_after_ns=60 * 10**9)
    try:
        ovf = Overflow(OverflowLog(tmp_path / "o.log"), release_ring=ep.release, ring_fill=0.5)
        lost: list = []
        p = CardPipeline(CAT, release=lambda io: ovf.release(io) or ep.release(io), on_lost=lost.append, key=KEY,
                         config=PipelineConfig(batch_delay_us=0, batch_bytes=256 << 10))
        app = FakeAppliance(KEY)
        sent: list[bytes] = []

        def card_round(now: int) -> None:
            entries = ep.poll()
            if entries:
                if ovf.behind(p, entries, ep.fill()):
                    ovf.divert(entries, p, now)
                    ovf.sync_now()
                else:
                    ovf.fed_direct(entries)
                    p.feed(entries, now)
            ovf.feed(p, now)
            p.tick(now)
            for frame in sent[:]:
                sent.remove(frame)
                for ack in app.receive(frame):
                    p.window.on_ack(ack)

        ws = []
        for i in range(1, 161):  # 10 MiB through a 1 MiB ring
            w = AugmentedWrite(10_000 + i, 1, i, 1 + i % 2, Op.WRITE, WFlag.NONE, rng.randrange(256) * 65536,
                               65536, i, rng.randbytes(65536))
            ws.append(w)
            assert sp.submit(w), f"write {i}: the ring is full"
            card_round(i)
            assert sp.wait_ack(w.io_id, time.monotonic_ns() + 10**9)
            assert sp.post_outcome(w.io_id, Status.COMMITTED)
            card_round(i)
        assert ovf.spilled > 0 and ovf.log.entries > 0
        p.window.connected({}, sent.append)  # the appliance is back
        for t in range(10_000):
            card_round(10**6 + t)
            if not ovf.in_use and p.drained() and len(app.records("cgA")) == len(ws):
                break
        assert [r.seq for r in app.records("cgA")] == [w.cg_seq for w in ws]
        assert [bytes(r.data) for r in app.records("cgA")] == [w.data for w in ws]
        assert not lost and ep.statistics().held == 0 and ovf.log.resets >= 1
    finally:
        sp.close()
        ep.close()


@pytest.mark.parametrize("seed", [31, 32, 33])
def test_release_many_matches_release_one_by_one(tmp_path, seed):
    """`Overflow.release_many` (a durable batch's releases, CardProcess)
    returns the writes whose payload is still in the ring, in order, and
    leaves the same state as `release` one by one: with nothing fed from the
    log (the steady case), and with some writes fed from it."""
    print(f"seed {seed}")
    import random  # (this file's other tests take the rng fixture; this one needs its own seeds)

    rng = random.Random(seed)
    sides = []
    for name in ("one", "many"):
        ep = FakeEndpoint()
        sides.append(Overflow(OverflowLog(tmp_path / f"{name}.log"), release_ring=ep.release))
    one, many = sides
    ws = [write(i, i, data=blk(i)) for i in range(1, 41)]
    for o in sides:
        o.fed_direct(ws)
    logged = {w.io_id for w in ws if rng.random() < 0.3}
    order = [w.io_id for w in ws]
    rng.shuffle(order)
    for step, k in enumerate((10, 10, 20)):
        batch, order = order[:k], order[k:]
        if step == 1:
            for o in sides:
                o.from_log.update(logged)  # from now on some were fed from the log
        want = [i for i in batch if not one.release(i)]
        assert many.release_many(list(batch)) == want
        assert many.ring_backed.keys() == one.ring_backed.keys() and many.from_log == one.from_log
    assert set(one.ring_backed) <= logged  # only writes the log took over keep a ring entry here
    for o in sides:
        o.log.close()
