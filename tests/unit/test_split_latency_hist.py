"""The splitter's ``split`` histogram is the latency the splitter adds to a
write (issue 9): publishing it to the card (record, payload copy and
checksum) plus the wait for its ack *after* the layer below is done. The
datastore write overlaps the card's round trip, so a slow layer below must
not show up in it (it used to: a 1 MiB write's histogram was mostly the
datastore's pwrite). A real chain and datastore, a real ring, a small card
loop in the test (`nicsplit.testing.inproc.RingCard`)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from nicsplit.testing.inproc import host_with_card, until

SLOW_NS = 50_000_000  # the layer below takes 50 ms per write


def test_a_slow_layer_below_is_not_counted_as_split_latency(tmp_path: Path):
    async def main():
        host, ds, card = host_with_card(tmp_path, {"validate": True, "resync_mib_s": 0, "card": {"retry_s": 0.01}})
        try:
            top, below = host.chain("a").top, host.chain("a").below("split")
            split = host.chain("a").filter("split")
            await top.pwrite(0, b"w" * 4096, 0)  # attaches the card
            await until(lambda: len(card.writes) == 1)
            assert split.state == "protected"
            fast_max = split.hist.max_ns
            pwrite = below.pwrite

            async def slow_pwrite(offset, data, flags):
                await asyncio.sleep(SLOW_NS / 1e9)  # ok-sleep: a slow datastore write, not synchronisation
                await pwrite(offset, data, flags)

            below.pwrite = slow_pwrite
            payload = bytes(range(256)) * 4096  # 1 MiB
            for i in range(3):
                await top.pwrite((i + 1) << 20, payload, 0)
            await until(lambda: len(card.writes) == 4)
            assert [bytes(w.data) for w in card.writes[1:]] == [payload] * 3
            st = split.statistics()
            print(f"split p50 {st['split_p50_us']:.0f} us, max {st['split_max_us']:.0f} us "
                  f"(first write {fast_max / 1000:.0f} us)")
            assert split.hist.total == 4 and st["split"] == 4 and st["marked"] == 0
            assert 0 < split.hist.max_ns < SLOW_NS / 2, "the layer below's 50 ms counted as split latency"
        finally:
            await card.kill()
            await host.stop()
            ds.close()

    asyncio.run(main())
