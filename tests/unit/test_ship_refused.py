"""Issue 11 item 2, card side: a CG the card must not name (bad name) or the
appliance refuses (left out of HelloAck's resume) is held; every other CG
ships on the same link, with no reconnect loop."""

from __future__ import annotations

import asyncio

import pytest

from nicsplit.card.pipeline import CardPipeline, PipelineConfig, Shipper
from nicsplit.testing.inproc import unix_connector, until
from nicsplit.testing.pipeline import FakeAppliance, FakeApplianceServer, FakeCatalog, FakeEndpoint, committed, write

pytestmark = pytest.mark.unit

KEY = bytes(range(32))
# vdisk 2's CG has a name an earlier version let in; cgC is refused by the appliance
CAT = FakeCatalog({1: ("cgA", "a1", 1 << 20), 2: ("_bad", "b1", 1 << 20), 3: ("cgC", "c1", 1 << 20)})


def test_one_refused_cg_never_blocks_the_others(tmp_path):
    async def main():
        app = FakeAppliance(KEY)
        app.refuse = {"cgC"}
        srv = FakeApplianceServer(app)
        server = await asyncio.start_unix_server(srv.handle, path=str(tmp_path / "app.sock"))
        ep = FakeEndpoint()
        p = CardPipeline(CAT, release=ep.release, on_lost=pytest.fail, key=KEY,
                         config=PipelineConfig(batch_delay_us=0, batch_records=1))
        p.add_cgs(CAT.cg_names())
        sh = Shipper(p.window, connect=unix_connector(tmp_path / "app.sock"), card_id="c1", cgs=p.cgs,
                     heartbeat_s=0.01, backoff_min_s=0.001, backoff_max_s=0.01)
        task = asyncio.create_task(sh.run())
        seqs = {1: 0, 2: 0, 3: 0}
        ws = []
        for i in range(1, 13):
            vd = 1 + i % 3
            seqs[vd] += 1
            ws.append(write(i, seqs[vd], cg_id=vd, vdisk_id=vd, offset=i * 4096, data=bytes([i]) * 4096))
        ep.push(*ws, *(committed(w.io_id) for w in ws))
        p.feed(ep.poll(), 0)
        await until(lambda: len(app.records("cgA")) == 4, what="cgA journaled")
        # ten more heartbeat round trips on the link: a re-Hello loop would show as more connections
        seen = sh.bytes_in
        await until(lambda: sh.bytes_in >= seen + 10 * 24, what="ten heartbeat echoes")
        assert srv.connections == 1 and srv.unknown_cg == 0
        assert srv.hellos[0].cgs == ("cgA", "cgC")  # the bad name is never put on the wire
        assert app.records("_bad") == [] and app.records("cgC") == []
        refused = p.window.statistics().refused_cgs
        assert set(refused) == {"_bad", "cgC"}
        assert "bad CG name" in refused["_bad"] and "refused by the appliance" in refused["cgC"]
        assert p.window.refused("_bad") == refused["_bad"] and p.window.refused("cgA") is None
        cga = {w.io_id for w in ws if w.vdisk_id == 1}
        assert cga <= set(ep.released) and not (set(ep.released) - cga)  # the held CGs' writes stay held
        sh.stop()
        await task
        server.close()
        await server.wait_closed()

    asyncio.run(main())


def test_a_cg_the_appliance_refused_is_asked_for_again(tmp_path):
    async def main():
        app = FakeAppliance(KEY)
        app.refuse = {"cgC"}
        srv = FakeApplianceServer(app)
        server = await asyncio.start_unix_server(srv.handle, path=str(tmp_path / "app.sock"))
        ep = FakeEndpoint()
        cat = FakeCatalog({1: ("cgA", "a1", 1 << 20), 3: ("cgC", "c1", 1 << 20)})
        p = CardPipeline(cat, release=ep.release, on_lost=pytest.fail, key=KEY,
                         config=PipelineConfig(batch_delay_us=0, batch_records=1))
        p.add_cgs(cat.cg_names())
        sh = Shipper(p.window, connect=unix_connector(tmp_path / "app.sock"), card_id="c1", cgs=p.cgs,
                     heartbeat_s=0.01, backoff_min_s=0.001, backoff_max_s=0.01, refused_retry_s=0.05)
        task = asyncio.create_task(sh.run())
        ws = [write(1, 1, cg_id=1, vdisk_id=1, data=b"a" * 4096), write(2, 1, cg_id=3, vdisk_id=3, data=b"c" * 4096)]
        ep.push(*ws, *(committed(w.io_id) for w in ws))
        p.feed(ep.poll(), 0)
        await until(lambda: len(app.records("cgA")) == 1, what="cgA journaled")
        assert app.records("cgC") == [] and p.window.refused("cgC")
        app.refuse = set()  # e.g. `nicsplit cg create cgC` at the appliance's site
        await until(lambda: len(app.records("cgC")) == 1, what="cgC journaled after a new Hello")
        assert srv.connections >= 2 and p.window.refused("cgC") is None
        # journaled at the appliance comes before its ack reaches the card: wait for the release
        await until(lambda: sorted(ep.released) == [1, 2], what="both writes released on their durable acks")
        sh.stop()
        await task
        server.close()
        await server.wait_closed()

    asyncio.run(main())


def test_writes_of_a_refused_cg_are_reported_lost_not_batched():
    """A refused CG's writes would sit in the ship window until it fills
    and stalls every CG: the pipeline reports them lost (the host marks
    them) and releases them at once; other CGs are batched as usual."""
    from nicsplit.card.pipeline import CardPipeline, PipelineConfig
    from nicsplit.testing.pipeline import FakeCatalog, committed, write

    lost, released = [], []
    p = CardPipeline(FakeCatalog({1: ("cgA", "a", 1 << 30), 2: ("cgB", "b", 1 << 30)}), release=released.append,
                     on_lost=lost.append, key=None, config=PipelineConfig(batch_delay_us=0))
    p.window.connected({"cgA": 0, "cgB": 0}, lambda wire: True, ("cgA",), refused={"cgB": "refused by the appliance"})
    ents = []
    for i in range(1, 11):
        vd = 1 if i % 2 else 2
        ents += [write(i, (i + 1) // 2, cg_id=vd, vdisk_id=vd, offset=i * 4096, data=bytes([i]) * 4096), committed(i)]
    p.feed(ents, 0)
    p.drain(0)
    assert sorted(w.io_id for w in lost) == [2, 4, 6, 8, 10]
    assert {2, 4, 6, 8, 10} <= set(released)
    assert p.window.statistics().unacked >= 1 and p.statistics().hold.held == 0
