"""The automatic resync and the gap flag, in one process: a real datastore
under a real chain (HostServer without listening), a real ring (RingEndpoint)
played by a small card loop in the test.

- dirty regions are read below the splitter and shipped in CG order with
  WFlag.GAP; every record of the CG carries GAP while a vdisk is marking or
  resyncing, and none after the vdisk is protected again;
- a region's bit clears only once the card acked its copy;
- a card lost mid-resync marks the copied-but-not-durable regions again, and
  the next resync ships only what is left;
- a client write to a region being copied waits and lands after the copy.
"""

from __future__ import annotations

import asyncio
from pathlib import Path


from nicsplit.core.cgs import CGCatalog
from nicsplit.core.config import Config
from nicsplit.core.dirtymap import REGION
from nicsplit.core.records import Op, WFlag
from nicsplit.host.datastore import Datastore
from nicsplit.host.regions import RegionLock
from nicsplit.host.resync import RateLimit, Resync
from nicsplit.testing.inproc import RingCard as Card, until
from nicsplit.host.server import HostServer

SIZE = 8 << 20
GAP = int(WFlag.GAP)


def mkhost(tmp_path: Path) -> tuple[HostServer, Datastore]:
    cfg = Config(data=tmp_path, raw={"host": {"validate": True, "resync_mib_s": 0, "card": {"retry_s": 0.01}}})
    CGCatalog(tmp_path).create("cg1")
    ds = Datastore.create(cfg.datastore_dir, volume_size=64 << 20)
    ds.open_io()
    ds.create_vdisk("a", SIZE, extra={"cg": "cg1"})
    ds.create_vdisk("b", SIZE, extra={"cg": "cg1"})
    return HostServer(cfg, ds), ds


def pattern(tag: int, n: int) -> bytes:
    return bytes([tag & 0xFF]) * n


async def go_marking(host: HostServer, card: Card, writes: list[tuple[int, int]], tag: int = 0x5A) -> None:
    """Kill the card, then write ``(offset, length)`` ranges to vdisk a: they are marked."""
    await card.kill()
    t = host.context.card.get()
    if t is not None:
        assert not t.healthy()
        host.context.card.lost("test: card killed")
    top = host.chain("a").top
    for off, n in writes:
        await top.pwrite(off, pattern(tag, n), 0)
    assert host.chain("a").filter("split").state == "marking"


def resync_of(host: HostServer, name: str = "a") -> Resync:
    ch = host.chain(name)
    return Resync(ch.filter("split"), ch.below("split"), host.resyncer.rate, chunk=4 * REGION)


def test_resync_ships_dirty_regions_in_cg_order_with_gap_then_protected(tmp_path: Path):
    async def main():
        host, ds = mkhost(tmp_path)
        card = Card(host.cfg.layout.run)
        card.start()
        a, b = host.chain("a").top, host.chain("b").top
        sa, sb = host.chain("a").filter("split"), host.chain("b").filter("split")
        await a.pwrite(0, pattern(1, 8192), 0)
        await until(lambda: len(card.writes) == 1)
        assert card.writes[0].flags == WFlag.NONE and sa.state == "protected"
        await until(lambda: len(card.outcomes) == 1)
        link = host.context.card

        def released() -> bool:  # the card releases it (durable): the host forgets it
            link.trim()
            return link.tracked == 0

        await until(released, what="the acked write released")

        dirty = [(REGION, 4096), (3 * REGION + 100, 2 * REGION), (40 * REGION, 12 * REGION)]
        await go_marking(host, card, dirty)
        d = sa.dmap
        assert d.dirty_regions() == 1 + 3 + 12 and host.context.gap("cg1").vdisks == {"a"}

        card = Card(host.cfg.layout.run)  # the card restarts
        card.start()
        await until(lambda: host.context.card.get() is not None)
        await b.pwrite(0, pattern(2, 4096), 0)  # another vdisk of the CG: in the gap too
        host.resyncer.poll([host.chain("a"), host.chain("b")])
        assert sa.state == "resyncing"
        await asyncio.wait_for(host.resyncer.tasks["a"], 10)
        assert sa.state == "protected" and d.dirty_regions() == 0 and not host.context.gap("cg1").vdisks
        await b.pwrite(4096, pattern(3, 4096), 0)  # after the gap: no flag
        await until(lambda: card.writes and card.writes[-1].vdisk_id == sb.vdisk.id and card.writes[-1].voffset == 4096)

        seqs = [w.cg_seq for w in card.writes]
        assert seqs == sorted(seqs), "ring order is CG order"
        *gap, barrier, last = card.writes
        assert all(w.flags & GAP for w in gap) and gap[-1].vdisk_id == sa.vdisk.id
        # The gap ends with a barrier without GAP: a consistent PIT at once.
        assert barrier.op == Op.BARRIER and barrier.flags == WFlag.NONE and not last.flags & GAP
        copies = [w for w in card.writes if w.vdisk_id == sa.vdisk.id and w.op == Op.WRITE]
        covered = set()
        for w in copies:
            assert w.op == Op.WRITE and w.voffset % REGION == 0 and w.length % REGION == 0
            assert w.data == await host.chain("a").below("split").pread(w.voffset, w.length, 0)
            covered |= set(range(w.voffset // REGION, (w.voffset + w.length) // REGION))
        assert covered == {1, 3, 4, 5} | set(range(40, 52))
        assert sa.statistics()["resync_shipped_bytes"] == 16 * REGION
        await card.kill()
        await host.stop()
        ds.close()

    asyncio.run(main())


def test_bits_clear_only_after_the_card_acked_and_a_lost_card_marks_again(tmp_path: Path):
    async def main():
        host, ds = mkhost(tmp_path)
        card = Card(host.cfg.layout.run)
        card.start()
        sa = host.chain("a").filter("split")
        await go_marking(host, card, [(0, 8 * REGION)])
        card = Card(host.cfg.layout.run)
        card.paused = True  # takes nothing: no ack
        card.start()
        await until(lambda: host.context.card.get() is not None)
        sa.dmap.enter_resyncing("test")
        r = resync_of(host)
        task = asyncio.get_running_loop().create_task(r.run())
        await until(lambda: sa.dmap.claimed == 8)  # both chunks submitted, waiting for acks
        assert sa.dmap.dirty_regions() == 8, "no bit clears before the ack"
        card.durable = False  # acked, never durable
        card.paused = False
        await asyncio.wait_for(task, 10)
        assert sa.state == "protected" and sa.dmap.dirty_regions() == 0
        assert host.context.card.tracked == 2  # acked, kept until durable
        # The card dies before the appliance has them: the regions are dirty again.
        await card.kill()
        host.context.card.lost("test: card killed again")
        assert sa.state == "marking" and sa.dmap.dirty_regions() == 8
        await host.stop()
        ds.close()

    asyncio.run(main())


def test_card_killed_mid_resync_resumes_with_what_is_left(tmp_path: Path):
    async def main():
        host, ds = mkhost(tmp_path)
        card = Card(host.cfg.layout.run)
        card.start()
        sa = host.chain("a").filter("split")
        await go_marking(host, card, [(0, 64 * REGION)])
        card = Card(host.cfg.layout.run)
        card.start()
        await until(lambda: host.context.card.get() is not None)
        host.resyncer.rate = RateLimit(8)  # 4 MiB at 8 MiB/s: time to kill it half way
        host.resyncer.poll([host.chain("a")])
        # Kill the card once part of the vdisk is copied and durable.
        await until(lambda: sa.resync is not None and sa.resync.done_bytes >= 16 * REGION, 10)
        await card.kill()
        task = host.resyncer.tasks["a"]
        await asyncio.wait_for(task, 10)
        assert sa.state == "marking"
        left = sa.dmap.dirty_regions()
        # Usually part of the copy was durable before the kill (left < 64);
        # on a loaded machine the card's durability can trail the copy by all
        # of it, and then everything is left: either way what is left is
        # exactly what the resumed copy must move (below).
        assert 0 < left <= 64, left
        shipped_before = sa.resync.shipped_total
        card = Card(host.cfg.layout.run)
        card.start()
        await until(lambda: host.context.card.get() is not None and host.context.card.get().healthy())
        host.resyncer.poll([host.chain("a")])
        await asyncio.wait_for(host.resyncer.tasks["a"], 10)
        assert sa.state == "protected"
        resumed = sa.resync.shipped_total - shipped_before
        assert resumed == left * REGION, (resumed, left)
        assert {w.voffset // REGION for w in card.writes if w.vdisk_id == sa.vdisk.id} <= set(range(64))
        await card.kill()
        await host.stop()
        ds.close()

    asyncio.run(main())


class GatedBelow:
    """The layer below the splitter, with a read that waits for a gate."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.gate = asyncio.Event()
        self.reading = asyncio.Event()

    async def pread(self, offset: int, length: int, flags: int) -> bytes:
        self.reading.set()
        await self.gate.wait()
        return await self.inner.pread(offset, length, flags)


def test_a_client_write_to_a_region_being_copied_waits_and_lands_after(tmp_path: Path):
    async def main():
        host, ds = mkhost(tmp_path)
        card = Card(host.cfg.layout.run)
        card.start()
        sa = host.chain("a").filter("split")
        top = host.chain("a").top
        await go_marking(host, card, [(0, REGION)], tag=0x11)
        card = Card(host.cfg.layout.run)
        card.start()
        await until(lambda: host.context.card.get() is not None)
        sa.dmap.enter_resyncing("test")
        r = resync_of(host)
        below = r.below = GatedBelow(r.below)
        task = asyncio.get_running_loop().create_task(r.run())
        await below.reading.wait()
        client = asyncio.get_running_loop().create_task(top.pwrite(4096, pattern(0x22, 4096), 0))
        other = asyncio.get_running_loop().create_task(top.pwrite(2 * REGION, pattern(0x33, 4096), 0))
        await asyncio.wait_for(other, 5)  # another region: not held
        await until(lambda: sa.regions.waits == 1, what="the client write waiting on the region")
        assert not client.done()
        below.gate.set()
        await asyncio.wait_for(client, 5)
        await asyncio.wait_for(task, 10)
        assert sa.state == "protected"
        ws = [w for w in card.writes if w.vdisk_id == sa.vdisk.id]
        copy = next(w for w in ws if w.voffset == 0 and w.length == REGION)
        after = next(w for w in ws if w.voffset == 4096)
        assert copy.cg_seq < after.cg_seq and ws.index(copy) < ws.index(after)
        assert copy.data[4096:8192] == pattern(0x11, 4096), "the copy holds the data before the client write"
        assert await top.pread(4096, 4096, 0) == pattern(0x22, 4096)
        assert copy.flags & GAP and after.flags & GAP  # the write came while resyncing
        await card.kill()
        await host.stop()
        ds.close()

    asyncio.run(main())


def test_region_lock_waits_for_writes_in_flight():
    async def main():
        rl = RegionLock()
        rl.enter(100, 10)
        locking = asyncio.get_running_loop().create_task(rl.lock(0, REGION))
        await until(lambda: rl.locked, what="the region locked")  # new writes stop at once ...
        assert not locking.done()  # ... but the lock waits for the write in flight
        assert rl.blocked(REGION - 1, 2) and not rl.blocked(REGION, 10)
        rl.leave(100, 10)
        await asyncio.wait_for(locking, 1)
        waiter = asyncio.get_running_loop().create_task(rl.wait(0, 1))
        await until(lambda: rl.waits == 1, what="the client waiting")
        assert not waiter.done()
        rl.unlock(0, REGION)
        await asyncio.wait_for(waiter, 1)

    asyncio.run(main())


def test_host_restart_mid_resync_resumes_from_the_bitmap(tmp_path: Path):
    async def main():
        host, ds = mkhost(tmp_path)
        card = Card(host.cfg.layout.run)
        card.start()
        sa = host.chain("a").filter("split")
        await go_marking(host, card, [(0, 64 * REGION)])
        card = Card(host.cfg.layout.run)
        card.start()
        await until(lambda: host.context.card.get() is not None)
        host.resyncer.rate = RateLimit(8)
        host.resyncer.poll([host.chain("a")])
        await until(lambda: sa.resync is not None and sa.resync.done_bytes >= 16 * REGION, 10)
        await host.stop()  # the host stops mid-resync: the state file says resyncing
        ds.close()
        ds = Datastore.open(host.cfg.datastore_dir)
        ds.open_io()
        host = HostServer(host.cfg, ds)
        sa = host.chain("a").filter("split")
        left = sa.dmap.dirty_regions()
        assert sa.state == "resyncing" and 0 < left < 64, (sa.state, left)
        assert host.context.gap("cg1").vdisks == {"a"}  # still in the gap after the restart
        await until(lambda: host.context.card.get() is not None and host.context.card.get().healthy())
        host.resyncer.poll([host.chain("a")])
        await asyncio.wait_for(host.resyncer.tasks["a"], 10)
        assert sa.state == "protected" and sa.resync.shipped_total == left * REGION
        await card.kill()
        await host.stop()
        ds.close()

    asyncio.run(main())


def test_a_write_that_does_not_reach_the_card_takes_no_seq(tmp_path: Path):
    """The card's hold stage waits its outcome timeout for a missing seq: a
    marked write must leave no hole in the CG's order."""
    async def main():
        host, ds = mkhost(tmp_path)
        card = Card(host.cfg.layout.run)
        card.start()
        await host.chain("b").top.pwrite(0, pattern(1, 4096), 0)
        seq = host.context.sequencer("cg1")
        before = seq.last
        await go_marking(host, card, [(0, 4096), (REGION, 4096)])  # a: no card, then marking
        assert seq.last == before
        assert seq.unget(seq.next()) and seq.last == before and not seq.unget(before - 1)
        await host.stop()
        ds.close()

    asyncio.run(main())
