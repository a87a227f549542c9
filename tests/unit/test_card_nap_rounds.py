"""The pipeline worker's rounds with naps (`CardProcess.poll_loop` on an
endpoint with ``set_napping``, as the fast path's `HandoffEndpoint`): a
round that took everything queued naps at once, with no empty round in
between; a round that left entries queued polls again at once; what was
acked during the nap is taken at the next round and shipped; an entry
handed over just as the worker publishes NAPPING (the acker saw it polling,
so it rings for nothing) is taken at once, not a nap later."""

from __future__ import annotations

import asyncio

import pytest

from nicsplit.card.process import CardConfig, CardProcess
from nicsplit.testing.inproc import unix_connector, until
from nicsplit.testing.pipeline import FakeAppliance, FakeApplianceServer, FakeCatalog, FakeEndpoint, committed, write

KEY = bytes(range(32))
CAT = FakeCatalog({1: ("cgA", "a1", 1 << 20)})


def blk(n: int) -> bytes:
    return bytes([n]) * 4096


class NappingEndpoint(FakeEndpoint):
    """Logs each poll (how many entries it returned, how many stayed
    queued) and each nap, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple] = []

    def poll(self, max_entries: int = 256):
        out = super().poll(max_entries)
        self.events.append(("poll", len(out), len(self.queue)))
        return out

    def set_napping(self, until_ns: int) -> None:
        if until_ns:
            self.events.append(("nap",))


def run_card(tmp_path, body, ep=None, **card):
    async def main():
        app = FakeAppliance(KEY)
        server = await asyncio.start_unix_server(FakeApplianceServer(app).handle, path=str(tmp_path / "app.sock"))
        endpoint = ep or NappingEndpoint()
        cfg = CardConfig.from_mapping(tmp_path, {"tls": False, "cpus": [], "batch_delay_us": 0, **card})
        c = CardProcess(cfg, endpoint, CAT, key=KEY, connect=unix_connector(tmp_path / "app.sock"))
        task = asyncio.create_task(c.run())
        try:
            await body(c, endpoint, app)
        finally:
            c.stop()
            await task
            server.close()

    asyncio.run(main())


def test_a_round_that_took_everything_naps_at_once_and_the_next_takes_what_came(tmp_path):
    async def body(c, ep, app):
        # (idle since start: it sleeps on the doorbell, no naps yet)
        ep.push(write(1, 1, vdisk_id=1, offset=0, data=blk(1)), committed(1))
        await until(lambda: c.pipeline.statistics().writes_in == 1)
        await until(lambda: ("nap",) in ep.events)
        took = next(i for i, e in enumerate(ep.events) if e[0] == "poll" and e[1])
        assert ep.events[took + 1] == ("nap",), ep.events  # no empty round before the nap
        ep.push(*(w for i in range(2, 6) for w in (write(i, i, vdisk_id=1, offset=i * 4096, data=blk(i)),
                                                     committed(i))))
        await until(lambda: len(app.records("cgA")) == 5)  # taken at the next round, shipped
        assert [r.seq for r in app.records("cgA")] == [1, 2, 3, 4, 5]
        rounds = [e for e in ep.events if e[0] == "poll" and e[1]]
        assert [e[1] for e in rounds] == [2, 8], rounds  # one round per nap, each taking all that was queued

    run_card(tmp_path, body, worker_nap_us=20_000)


def test_a_round_that_left_entries_queued_polls_again_without_a_nap(tmp_path):
    async def body(c, ep, app):
        ep.push(*(w for i in range(1, 6) for w in (write(i, i, vdisk_id=1, offset=i * 4096, data=blk(i)),
                                                     committed(i))))
        await until(lambda: len(app.records("cgA")) == 5)
        polls = [e for e in ep.events if e[0] == "poll" and e[1]]
        assert [e[1] for e in polls] == [4, 4, 2], ep.events  # poll_entries = 4
        first = ep.events.index(polls[0])
        assert ep.events[first + 1][0] == "poll" and ep.events[first + 2][0] == "poll", ep.events  # no nap between

    run_card(tmp_path, body, worker_nap_us=20_000, poll_entries=4)


class LateEntryEndpoint(NappingEndpoint):
    """The first time the worker publishes NAPPING, an entry arrives at that
    very moment: the acker handed it over while the worker still polled."""

    def __init__(self, late) -> None:
        super().__init__()
        self.late = late

    def set_napping(self, until_ns: int) -> None:
        super().set_napping(until_ns)
        if until_ns and self.late:
            self.push(*self.late)
            self.late = ()


def test_an_entry_handed_over_as_the_worker_publishes_napping_is_taken_without_a_nap(tmp_path):
    async def body(c, ep, app):
        ep.push(write(1, 1, vdisk_id=1, offset=0, data=blk(1)), committed(1))
        await until(lambda: len(app.records("cgA")) == 2, what="both writes shipped")
        assert c.stats()["poller"]["naps"] == 0, ep.events  # write 2 was taken by a round, not after a nap

    # A nap of 60 s: a worker that naps first would miss until()'s deadline.
    ep = LateEntryEndpoint((write(2, 2, vdisk_id=1, offset=8192, data=blk(2)), committed(2)))
    run_card(tmp_path, body, ep, worker_nap_us=60_000_000)


def test_batch_defaults_follow_the_fast_path(tmp_path):
    """With the acker in its own process the worker seals, so batches close
    at 4 MiB / 50 ms by default; the inline fast path seals on its acking
    thread and keeps 256 KiB / 500 us, and refuses bigger batches."""
    from nicsplit.card.process import INLINE_BATCH_BYTES_MAX, PROCESS_BATCH
    from nicsplit.core.config import ConfigError

    p = CardConfig.from_mapping(tmp_path, {}).pipeline
    assert (p.batch_bytes, p.batch_delay_us) == (PROCESS_BATCH["batch_bytes"], PROCESS_BATCH["batch_delay_us"])
    assert CardConfig.from_mapping(tmp_path, {"batch_bytes": "64K"}).pipeline.batch_bytes == 64 << 10
    i = CardConfig.from_mapping(tmp_path, {"fast_path": "inline"}).pipeline
    assert (i.batch_bytes, i.batch_delay_us) == (256 << 10, 500) and i.batch_bytes <= INLINE_BATCH_BYTES_MAX
    with pytest.raises(ConfigError, match="batch_bytes .*inline"):
        CardConfig.from_mapping(tmp_path, {"fast_path": "inline", "batch_bytes": "1M"})
