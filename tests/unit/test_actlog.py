"""The host's activity log (nicsplit.host.actlog): the record codec, a torn
or garbage tail, LRU eviction with pins, group commit, and the rule that a
write's extent is on disk (fdatasync'd) before the write goes anywhere;
then, through a real host chain, an unclean stop marks exactly the hot
extents and a clean stop marks nothing."""

from __future__ import annotations

import asyncio
import os
import random
import threading
from pathlib import Path

import pytest

from nicsplit.core.cgs import CGCatalog
from nicsplit.core.config import Config
from nicsplit.host import actlog
from nicsplit.host.actlog import (
    CHECKPOINT, CLEAN, ENTRY, RECORD_HEAD, UPDATE, ActivityLog, decode_log, encode_record, key,
)
from nicsplit.host.datastore import Datastore
from nicsplit.host.server import HostServer
from nicsplit.testing.inproc import RingCard, until

EXT = 4 << 20


def records(rng: random.Random, n: int) -> tuple[bytes, list[set[int]]]:
    """A log of a checkpoint and ``n - 1`` updates, and the set after each record."""
    cur = {key(rng.randrange(1, 4), rng.randrange(100)) for _ in range(rng.randrange(0, 8))}
    out, states = [encode_record(CHECKPOINT, 10, 22, sorted(cur))], [set(cur)]
    for i in range(1, n):
        dels = set(rng.sample(sorted(cur), k=min(len(cur), rng.randrange(0, 3))))
        adds = {key(rng.randrange(1, 4), rng.randrange(100)) for _ in range(rng.randrange(1, 4))} - cur
        cur = (cur - dels) | adds
        out.append(encode_record(UPDATE, 10 + i, 22, sorted(adds), sorted(dels)))
        states.append(set(cur))
    return b"".join(out), states


def test_codec_round_trip(seed):
    rng = random.Random(seed)
    print("seed", seed)
    for _ in range(50):
        buf, states = records(rng, rng.randrange(1, 12))
        r = decode_log(buf)
        assert r.keys == states[-1] and r.records == len(states) and r.tail == 0 and r.end == len(buf)
        assert not r.clean and not r.unknown and r.seq == 10 + len(states) - 1
    clean = decode_log(buf + encode_record(CLEAN, r.seq + 1, 22))
    assert clean.clean and clean.keys == set()
    assert decode_log(b"").clean and not decode_log(b"").unknown  # no log: nothing to resync
    rec = encode_record(UPDATE, 7, 22, [key(2, 5)], [key(1, 9)])
    assert len(rec) == RECORD_HEAD.size + 2 * ENTRY.size
    assert decode_log(encode_record(CHECKPOINT, 3, 22, [key(5, 1)])).ranges() == [(5, EXT, EXT)]
    with pytest.raises(ValueError):
        encode_record(CLEAN, 1, 22, [key(1, 1)])


def test_torn_and_garbage_tail_end_the_log_at_the_last_good_record(seed):
    rng = random.Random(seed)
    print("seed", seed)
    buf, states = records(rng, 6)
    ends, pos = [], 0
    while pos < len(buf):  # record boundaries
        _, _, _, _, _, _, na, nd, _ = RECORD_HEAD.unpack_from(buf, pos)
        pos += RECORD_HEAD.size + (na + nd) * ENTRY.size
        ends.append(pos)
    last_start = ends[-2]
    for cut in range(last_start, len(buf)):  # every torn length of the last record
        r = decode_log(buf[:cut])
        assert r.keys == states[-2] and r.end == last_start and r.tail == cut - last_start
    garbage = bytes(rng.randrange(256) for _ in range(300))
    r = decode_log(buf + garbage)
    assert r.keys == states[-1] and r.tail == len(garbage)
    # A flipped byte anywhere in record 3 ends the log after record 2.
    for at in range(ends[1], ends[2]):
        bad = bytearray(buf)
        bad[at] ^= 0x40
        r = decode_log(bytes(bad))
        assert r.keys == states[1] and r.end == ends[1], at
    # An old record after the end (a wrong seq) is not replayed.
    stale = encode_record(UPDATE, 3, 22, [key(9, 9)])
    assert decode_log(buf + stale).keys == states[-1]
    # Nothing readable at all: unknown (the host then resyncs in full).
    r = decode_log(garbage)
    assert r.unknown and not r.clean


class FakeDisk:
    """fdatasync stand-in: counts, reads what the file holds at that moment,
    and can hold the caller until released."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.calls = 0
        self.seen: list = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, fd: int) -> None:
        self.calls += 1
        self.seen.append(decode_log(self.path.read_bytes()).keys)
        self.entered.set()
        assert self.gate.wait(10)
        os.fdatasync(fd)


def test_lru_eviction_keeps_pinned_extents_and_costs_nothing_when_hot(tmp_path):
    async def main():
        disk = FakeDisk(tmp_path / "al")
        al = ActivityLog(tmp_path / "al", extents=3, sync=disk)
        al.begin()
        for e in range(3):
            assert not al.enter(1, e * EXT, 4096)
            await al.activate(1, e * EXT, 4096)
            al.leave(1, e * EXT, 4096)
        assert disk.calls == 3 and al.hot == 3
        for _ in range(100):  # hot: no IO
            assert al.enter(1, 4096, 4096)
            al.leave(1, 4096, 4096)
        assert disk.calls == 3
        assert al.enter(1, 0, 1)  # a write in flight to extent 0 pins it ...
        for e in (1, 2):  # ... and it becomes the least recently used
            assert al.enter(1, e * EXT, 1)
            al.leave(1, e * EXT, 1)
        assert not al.enter(1, 3 * EXT, 1)
        await al.activate(1, 3 * EXT, 1)
        assert al.is_hot(1, 0) and not al.is_hot(1, EXT) and al.is_hot(1, 2 * EXT) and al.is_hot(1, 3 * EXT)
        assert al.evicted == 1 and disk.seen[-1] == {key(1, 0), key(1, 2), key(1, 3)}
        # Every extent pinned: the set grows past the bound rather than hold the write.
        assert al.enter(1, 2 * EXT, 1) and al.enter(1, 3 * EXT, 1)
        assert not al.enter(1, 7 * EXT, 1)
        await al.activate(1, 7 * EXT, 1)
        assert al.hot == 4 and al.over == 1
        await al.close(clean=False)
        r = decode_log((tmp_path / "al").read_bytes())
        assert r.keys == {key(1, 0), key(1, 2), key(1, 3), key(1, 7)} and not r.clean

    asyncio.run(main())


def test_activation_is_durable_before_it_returns_and_commits_are_grouped(tmp_path):
    async def main():
        disk = FakeDisk(tmp_path / "al")
        al = ActivityLog(tmp_path / "al", extents=100, sync=disk)
        al.begin()
        disk.gate.clear()
        assert not al.enter(4, 0, 4096)
        first = asyncio.create_task(al.activate(4, 0, 4096))
        await until(disk.entered.is_set, what="the first fdatasync")
        # While it runs, 20 more writes to 10 other cold extents wait for ONE more commit.
        more = []
        for i in range(20):
            e = 1 + i % 10
            assert not al.enter(4, e * EXT, 4096)
            more.append(asyncio.create_task(al.activate(4, e * EXT, 4096)))
        for _ in range(20):
            await asyncio.sleep(0)  # ok-sleep: let every task run; none may finish before the disk
        assert not first.done() and not any(t.done() for t in more) and not al.is_hot(4, 0)
        assert disk.seen[0] == {key(4, 0)}  # the record was in the file when fdatasync ran
        disk.gate.set()
        await first
        await asyncio.gather(*more)
        assert disk.calls == 2 and disk.seen[1] == {key(4, e) for e in range(11)}
        assert al.commits == 2 and al.activated == 11 and al.waits == 21

    asyncio.run(main())


def test_compaction_rewrites_one_checkpoint_and_recovers(tmp_path, seed):
    async def main():
        rng = random.Random(seed)
        print("seed", seed)
        al = ActivityLog(tmp_path / "al", extents=8, max_bytes=0)  # max_bytes: at least 4 checkpoints' worth
        al.begin()
        for _ in range(200):
            v, e = rng.randrange(1, 3), rng.randrange(40)
            if not al.enter(v, e * EXT, 512):
                await al.activate(v, e * EXT, 512)
            al.leave(v, e * EXT, 512)
        hot = set(al._hot)
        assert al.compactions > 0 and len(hot) == 8
        assert (tmp_path / "al").stat().st_size <= al.max_bytes
        await al.close(clean=False)  # a crash, as far as the file knows
        again = ActivityLog(tmp_path / "al", extents=8)
        assert again.recovered.keys == hot and not again.recovered.clean
        again.begin()
        await again.close(clean=True)
        assert ActivityLog(tmp_path / "al").recovered.clean

    asyncio.run(main())


# -- through a host chain ----------------------------------------------------------------

SIZE = 64 << 20


def mkhost(tmp_path: Path, create: bool = True) -> tuple[HostServer, Datastore]:
    cfg = Config(data=tmp_path, raw={"host": {"validate": True, "resync_mib_s": 0, "card": {"retry_s": 0.01}}})
    if create:
        CGCatalog(tmp_path).create("cg1")
        ds = Datastore.create(cfg.datastore_dir, volume_size=256 << 20)
        ds.open_io()
        ds.create_vdisk("a", SIZE, extra={"cg": "cg1"})
        ds.create_vdisk("u", SIZE)  # in no CG: its writes are not journaled, nor logged
    else:
        ds = Datastore.open(cfg.datastore_dir)
        ds.open_io()
    host = HostServer(cfg, ds)
    host.check_chains()
    return host, ds


def test_write_waits_for_its_extent_on_disk_before_the_card_sees_it(tmp_path):
    async def main():
        host, ds = mkhost(tmp_path)
        host.recover_activity_log()
        al = host.context.activity_log
        disk = FakeDisk(al.path)
        al._sync = disk
        card = RingCard(host.cfg.layout.run).start()
        await until(lambda: host.context.card.get() is not None)
        top, below = host.chain("a").top, host.chain("a").below("split")
        disk.gate.clear()
        w = asyncio.create_task(top.pwrite(5 * EXT + 8192, b"\x77" * 4096, 0))
        await until(disk.entered.is_set, what="the activation's fdatasync")
        for _ in range(20):
            await asyncio.sleep(0)  # ok-sleep: give the write every chance to go on (it must not)
        assert not w.done() and card.writes == []
        assert await below.pread(5 * EXT + 8192, 4096, 0) == bytes(4096)
        disk.gate.set()
        await w
        await until(lambda: len(card.writes) == 1)
        assert disk.seen == [{key(host.chain("a").vdisk.id, 5)}]
        # The same extent again, and a vdisk in no CG: no IO on the log.
        await top.pwrite(5 * EXT, b"\x01" * 4096, 0)
        await host.chain("u").top.pwrite(0, b"\x02" * 4096, 0)
        assert disk.calls == 1 and al.hot == 1
        await card.kill()
        await host.stop()
        ds.close()

    asyncio.run(main())


def test_unclean_stop_marks_the_hot_extents_and_a_clean_stop_nothing(tmp_path):
    async def main():
        host, ds = mkhost(tmp_path)
        host.recover_activity_log()
        card = RingCard(host.cfg.layout.run).start()
        await until(lambda: host.context.card.get() is not None)
        top = host.chain("a").top
        for off in (0, 3 * EXT + 100, 9 * EXT - 4096):  # extents 0, 3, 8
            await top.pwrite(off, b"\x33" * 4096, 0)
        await top.zero(13 * EXT, 2 * EXT, 0)  # extents 13, 14
        await card.kill()
        # Crash: no stop. The process's file descriptors go with it.
        host.context.card.close()
        ds.close()

        host2, ds2 = mkhost(tmp_path, create=False)
        out = host2.recover_activity_log()
        sp = host2.chain("a").filter("split")
        assert not out["clean"] and out["extents"] == 5 and out["marked_bytes"] == 5 * EXT
        assert sp.state == "marking" and sp.dmap.dirty_bytes() == 5 * EXT
        assert sp.dmap.regions() == [(0, EXT), (3 * EXT, EXT), (8 * EXT, EXT), (13 * EXT, 2 * EXT)]
        assert "host stopped uncleanly" in sp.dmap.reason
        assert host2.context.gap("cg1").vdisks == {"a"}  # no consistent PIT until the resync ends
        assert host2.chain("u").filter("split").state == "unprotected"
        await host2.stop()  # clean
        ds2.close()

        host3, ds3 = mkhost(tmp_path, create=False)
        out = host3.recover_activity_log()
        assert out["clean"] and out["marked_bytes"] == 0
        assert host3.chain("a").filter("split").dmap.dirty_bytes() == 5 * EXT  # still to resync, from the bitmap
        await host3.stop()
        ds3.close()

    asyncio.run(main())


def test_a_large_activation_is_split_into_bounded_records(tmp_path, monkeypatch):
    monkeypatch.setattr(actlog, "BATCH", 4)

    async def main():
        disk = FakeDisk(tmp_path / "al")
        al = ActivityLog(tmp_path / "al", extents=100, sync=disk)
        al.begin()
        assert not al.enter(3, 0, 10 * EXT)  # a 40 MiB TRIM: 10 extents
        await al.activate(3, 0, 10 * EXT)
        al.leave(3, 0, 10 * EXT)
        assert disk.calls == 3 and [len(s) for s in disk.seen] == [4, 8, 10]
        assert decode_log((tmp_path / "al").read_bytes()).keys == {key(3, e) for e in range(10)}
        with pytest.raises(ValueError):
            encode_record(UPDATE, 1, 22, range(actlog.MAX_ENTRIES + 1))
        await al.close(clean=True)

    asyncio.run(main())
