"""The asyncio shipper and the card process, over in-memory Unix sockets
(no TLS, no network): reconnect with retransmit, resume, control socket,
ready line, SIGTERM-style drain."""

from __future__ import annotations

import asyncio
import json

import pytest

from nicsplit.testing.inproc import unix_connector, until
from nicsplit.card.pipeline import CardPipeline, PipelineConfig, Shipper
from nicsplit.testing.pipeline import (
    FakeAppliance, FakeApplianceServer, FakeCatalog, FakeEndpoint, committed, failed, write,
)
from nicsplit.card.lostlog import LostLogReader
from nicsplit.card.process import CardConfig, CardProcess, run_card

KEY = bytes(range(32))
CAT = FakeCatalog({1: ("cgA", "a1", 1 << 20), 2: ("cgA", "a2", 1 << 20), 3: ("cgB", "b1", 1 << 20)})


def blk(n: int) -> bytes:
    return bytes([n]) * 4096


def test_shipper_reconnects_retransmits_and_releases_only_after_durable_acks(tmp_path):
    async def main():
        app = FakeAppliance(KEY)
        srv = FakeApplianceServer(app, drop_after_batches=2)
        server = await asyncio.start_unix_server(srv.handle, path=str(tmp_path / "app.sock"))
        ep = FakeEndpoint()
        p = CardPipeline(CAT, release=ep.release, on_lost=pytest.fail, key=KEY,
                         config=PipelineConfig(batch_delay_us=0))
        p.add_cgs(CAT.cg_names())
        sh = Shipper(p.window, connect=unix_connector(tmp_path / "app.sock"), card_id="c1", cgs=p.cgs,
                     heartbeat_s=0.01, backoff_min_s=0.001, backoff_max_s=0.01)
        task = asyncio.create_task(sh.run())
        ws = [write(i, i, vdisk_id=1 + i % 2, offset=i * 4096, data=blk(i)) for i in range(1, 7)]
        ep.push(*ws, *(committed(w.io_id) for w in ws))
        p.feed(ep.poll(), 0)
        await until(lambda: p.window.empty)
        assert srv.connections == 2  # dropped after the 2nd batch, reconnected
        assert [r.seq for r in app.records("cgA")] == [1, 2, 3, 4, 5, 6]  # exactly once, in order
        assert sorted(ep.released) == [w.io_id for w in ws] and not ep.held
        assert p.window.statistics().retransmits >= 1
        assert srv.hellos[0].cgs == ("cgA", "cgB")
        sh.stop()
        await task
        server.close()
        await server.wait_closed()

    asyncio.run(main())


def test_shipper_resume_after_appliance_kept_batches_whose_acks_were_lost(tmp_path):
    async def main():
        app = FakeAppliance(KEY)
        ep = FakeEndpoint()
        p = CardPipeline(CAT, release=ep.release, on_lost=pytest.fail, key=KEY,
                         config=PipelineConfig(batch_delay_us=0))
        ws = [write(i, i, data=blk(i)) for i in range(1, 4)]
        ep.push(*ws, *(committed(w.io_id) for w in ws))
        p.feed(ep.poll(), 0)
        sent = []
        p.window.connected({}, sent.append)  # a first link that carries them...
        for f in sent:
            app.receive(f)  # ...the appliance journals them, the acks never come back
        p.window.disconnected()
        assert ep.released == []
        srv = FakeApplianceServer(app)
        server = await asyncio.start_unix_server(srv.handle, path=str(tmp_path / "a.sock"))
        sh = Shipper(p.window, connect=unix_connector(tmp_path / "a.sock"), card_id="c1", cgs=p.cgs)
        task = asyncio.create_task(sh.run())
        await until(lambda: p.window.empty)
        assert app.batches == 3 and app.duplicates == 0  # nothing resent
        assert sorted(ep.released) == [1, 2, 3]
        sh.stop()
        await task
        server.close()

    asyncio.run(main())


def test_a_cg_unknown_to_the_hello_triggers_a_new_hello_instead_of_a_refused_batch(tmp_path):
    async def main():
        app = FakeAppliance(KEY)
        srv = FakeApplianceServer(app)
        server = await asyncio.start_unix_server(srv.handle, path=str(tmp_path / "a.sock"))
        ep = FakeEndpoint()
        p = CardPipeline(CAT, release=ep.release, on_lost=pytest.fail, key=KEY, config=PipelineConfig(batch_delay_us=0))
        sh = Shipper(p.window, connect=unix_connector(tmp_path / "a.sock"), card_id="c1", cgs=p.cgs,
                     backoff_min_s=0.001)
        task = asyncio.create_task(sh.run())
        a = write(1, 1, cg_id=1, vdisk_id=1, data=blk(1))
        ep.push(a, committed(1))
        p.feed(ep.poll(), 0)
        await until(lambda: p.window.empty)
        assert srv.hellos[-1].cgs == ("cgA",)
        b = write(2, 1, cg_id=2, vdisk_id=3, data=blk(2))  # cgB appears after the Hello
        ep.push(b, committed(2))
        p.feed(ep.poll(), 0)
        await until(lambda: p.window.empty)
        assert srv.unknown_cg == 0 and srv.connections == 2
        assert srv.hellos[-1].cgs == ("cgA", "cgB")
        assert [r.seq for r in app.records("cgB")] == [1]
        sh.stop()
        await task
        server.close()

    asyncio.run(main())


def test_card_process_ships_reports_stats_and_drains_on_stop(tmp_path):
    async def main():
        app = FakeAppliance(KEY)
        srv = FakeApplianceServer(app)
        server = await asyncio.start_unix_server(srv.handle, path=str(tmp_path / "app.sock"))
        ep = FakeEndpoint()
        cfg = CardConfig.from_mapping(tmp_path, {"tls": False, "cpus": [], "batch_delay_us": 100_000,
                                                 "idle_spin_us": 50, "sleep_max_ms": 1})
        card = CardProcess(cfg, ep, CAT, key=KEY, connect=unix_connector(tmp_path / "app.sock"))
        ready = []
        run = asyncio.create_task(card.run(ready=ready.append))
        await until(lambda: ready)
        assert ready[0]["event"] == "ready"
        ws = [write(i, i, vdisk_id=1, offset=i * 4096, data=blk(i)) for i in range(1, 5)]
        ep.push(*ws, committed(1), committed(2), failed(3), committed(4))
        await until(lambda: not ep.queue)
        # control socket
        r, w = await asyncio.open_unix_connection(str(tmp_path / "run" / "card-ctl.sock"))
        w.write(b'{"cmd": "stats"}\n')
        reply = json.loads(await r.readline())
        assert reply["ok"] and reply["stats"]["pid"] > 0
        st = reply["stats"]
        assert st["stages"]["hold"]["failed"] == 1 and st["writes_in"] == 4
        assert set(st["stages"]) == {"resolve", "hold", "merge", "dedup", "compress", "encrypt", "batch", "ship"}
        assert "cgA" in st["cgs"] and {"bytes_in", "bytes_out"} <= set(st["wire"])
        w.write(b'{"cmd": "nope"}\n')
        assert json.loads(await r.readline())["ok"] is False
        w.close()
        assert app.journal == []  # the batch is still open (100 ms delay)
        assert ep.sleeping in (True, False)
        late = write(5, 5, vdisk_id=1, data=blk(5))
        ep.push(late)
        await until(lambda: not ep.queue)
        card.stop()  # SIGTERM: drain closes the open batch and waits for its ack
        ep.push(committed(5))  # an outcome still queued in the transport at stop time
        assert await run == 0
        assert [r.seq for r in app.records("cgA")] == [1, 2, 4, 5]
        assert sorted(ep.released) == [1, 2, 3, 4, 5]
        assert not (tmp_path / "run" / "card-ctl.sock").exists()
        server.close()

    asyncio.run(main())


def test_card_process_sleeps_on_the_doorbell_when_idle(tmp_path):
    import os

    class DoorbellEndpoint(FakeEndpoint):
        def __init__(self):
            super().__init__()
            self.fd = os.eventfd(0, os.EFD_NONBLOCK)
            self.sleeps = 0

        def doorbell_fd(self):
            return self.fd

        def set_sleeping(self, sleeping):
            self.sleeps += sleeping
            super().set_sleeping(sleeping)

        def ring(self, *entries):
            self.push(*entries)
            if self.sleeping:
                os.eventfd_write(self.fd, 1)

    async def main():
        ep = DoorbellEndpoint()
        cfg = CardConfig.from_mapping(tmp_path, {"tls": False, "cpus": [], "idle_spin_us": 10, "sleep_max_ms": 50})

        async def never():
            raise OSError("no appliance in this test")

        card = CardProcess(cfg, ep, CAT, key=None, connect=never)
        run = asyncio.create_task(card.run())
        await until(lambda: ep.sleeping)
        ep.ring(write(1, 1, data=blk(1)))
        await until(lambda: card.pipeline.statistics().writes_in == 1, timeout=0.04)  # woken, not timed out
        assert ep.sleeps >= 1 and card.stats()["poller"]["doorbell_wakeups"] >= 1
        card.stop()
        await run
        os.close(ep.fd)

    asyncio.run(main())


def test_run_card_prints_one_ready_line_and_exits_on_sigterm(tmp_path, capsys):
    import os
    import signal

    async def main():
        ep = FakeEndpoint()

        async def never():
            raise OSError("no appliance")

        task = asyncio.create_task(run_card({"data": str(tmp_path), "tls": False, "encrypt": False, "cpus": [],
                                             "drain_timeout_s": 0.1}, endpoint=ep, catalog=CAT, connect=never))
        await until(lambda: (tmp_path / "run" / "card-ctl.sock").exists())
        os.kill(os.getpid(), signal.SIGTERM)  # handled by the card's loop handler: stop, drain, exit 0
        assert await task == 0
        assert not ep.closed  # an endpoint passed in belongs to the caller

    asyncio.run(main())
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 1 and lines[0]["event"] == "ready" and lines[0]["pid"] > 0


def test_card_config_parses_sizes_and_refuses_unknown_keys(tmp_path):
    from nicsplit.core.config import ConfigError

    cfg = CardConfig.from_mapping(tmp_path, {"batch_bytes": "512K", "merge_window_ms": 5, "cpus": [0],
                                             "transport_options": {"data_size": "16M"}})
    assert cfg.pipeline.batch_bytes == 512 << 10 and cfg.pipeline.merge_window_ms == 5
    assert cfg.cpus == (0,) and cfg.transport_options == {"data_size": 16 << 20}
    with pytest.raises(ConfigError):
        CardConfig.from_mapping(tmp_path, {"bogus": 1})


def test_card_process_puts_refused_writes_in_the_lost_log(tmp_path):
    """The endpoint's refusals reach the lost log the host reads at start (a
    late write's host may have answered its client and died before the
    refusal came)."""
    (tmp_path / "run").mkdir()

    class RefusingEndpoint(FakeEndpoint):
        on_refused = None

    ep = RefusingEndpoint()
    cfg = CardConfig.from_mapping(tmp_path, {"tls": False, "cpus": []})

    async def never():
        raise OSError("no appliance in this test")

    card = CardProcess(cfg, ep, CAT, key=None, connect=never)
    assert ep.on_refused == card._refused
    ep.on_refused(77, 1, 8192, 4096, "FULL")
    lines = LostLogReader(cfg.layout.card_lost_log).read_new()
    assert [(e["io_id"], e["vdisk_id"], e["offset"], e["length"]) for e in lines] == [(77, 1, 8192, 4096)]
    assert "FULL" in lines[0]["reason"]
