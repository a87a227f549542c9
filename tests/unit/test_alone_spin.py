"""A waiter for the card spins long only while its request is the only
one the host executes (`nicsplit.host.load`): at QD1 the ack that comes
50-150 µs later is then caught by the spin instead of a sleep and a wake-up
of the loop, while with other requests executing (or more of a pipelined
client's requests unparsed) the short spin stands and the loop is free.

A fake transport whose ack appears a fixed time after the wait begins; the
host's request count (`HostLoad`) as a session keeps it; and a real NBD
session (`NBDSession` on a real host over a socketpair) counting its
requests in and out."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from nicsplit.host.cardlink import CardLink
from nicsplit.host.load import HostLoad

ACK_AFTER_NS = 100_000  # the card's ack comes 100 µs after the wait starts


class LateAck:
    """A transport whose ack for every io is ready ACK_AFTER_NS after `arm`."""

    wake_fd = None

    def __init__(self) -> None:
        self.ready_at = 0

    def arm(self) -> None:
        self.ready_at = time.monotonic_ns() + ACK_AFTER_NS

    def reap(self) -> None:
        pass

    def take_ack(self, io_id: int):
        return True if time.monotonic_ns() >= self.ready_at else None

    def poll_ack(self, io_id: int):
        return self.take_ack(io_id)

    def detach(self, io_id: int):
        return None


def wait_once(tmp_path: Path, load: HostLoad | None):
    link = CardLink(tmp_path / "card.sock", tmp_path / "card-lost.log", spin_us=20, load=load, alone_spin_us=2000)
    t = LateAck()
    link._t = t
    loop = asyncio.new_event_loop()
    try:
        async def go():
            t.arm()
            return link.wait_ack(t, 1, time.monotonic_ns() + 1_000_000_000)
        return loop.run_until_complete(go())
    finally:
        loop.close()


def test_a_lone_request_catches_a_late_ack_in_its_spin(tmp_path):
    load = HostLoad()
    load.requests = 1
    assert wait_once(tmp_path, load) is True


@pytest.mark.parametrize("requests, backlog", [(2, False), (16, False), (1, True)])
def test_with_other_requests_the_short_spin_stands_and_the_waiter_sleeps(tmp_path, requests, backlog):
    load = HostLoad()
    load.requests, load.backlog = requests, backlog
    assert isinstance(wait_once(tmp_path, load), asyncio.Future)


def test_a_link_without_a_host_load_never_spins_long(tmp_path):
    assert isinstance(wait_once(tmp_path, None), asyncio.Future)


def test_a_real_session_counts_its_requests_in_and_out(tmp_path):
    """qemu-io against a real host (real chain, datastore and ring; a small
    card loop): every QD1 write waits for its ack alone; 16 pipelined
    writes (aio_write) do not all; nothing stays counted afterwards."""
    from nicsplit.testing.inproc import host_with_card

    sock = tmp_path / "nbd.sock"
    uri = f"nbd+unix:///a?socket={sock}"

    async def qemu_io(*cmds: str) -> None:
        args = [x for c in cmds for x in ("-c", c)]
        p = await asyncio.create_subprocess_exec("qemu-io", "-f", "raw", *args, uri,
                                                 stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await p.communicate()
        assert p.returncode == 0 and b"error" not in out.lower(), out

    async def main():
        host, ds, card = host_with_card(tmp_path, {"resync_mib_s": 0, "card": {"retry_s": 0.01}})
        load = host.context.load
        seen: list[tuple[int, bool]] = []
        link = host.context.card
        wait_ack = link.wait_ack

        def watched(*a):
            seen.append((load.requests, load.backlog))
            return wait_ack(*a)

        link.wait_ack = watched
        try:
            await host.start(None, str(sock))
            await qemu_io(*(f"write -P 0x{i + 1:02x} {i * 4096} 4k" for i in range(20)))
            qd1 = list(seen)
            seen.clear()
            await qemu_io(*(f"aio_write -P 0x5a {(64 + i) * 4096} 4k" for i in range(16)), "aio_flush")
            assert load.requests == 0, "a request stayed counted after its reply"
        finally:
            await card.kill()
            await host.stop()
            ds.close()
        return qd1, seen

    qd1, burst = asyncio.run(main())
    assert len(qd1) >= 20 and all(r == 1 and not b for r, b in qd1), qd1  # 20 writes (and the flush at close)
    # the flush passes the splitter too (a barrier record): 16 writes and at least one barrier
    assert len(burst) >= 16 and any(r > 1 or b for r, b in burst), burst


def test_the_spin_for_a_late_ack_is_counted_apart_and_an_ack_there_at_once_costs_none(tmp_path):
    """`spin_ns_total` (the host's stats ``card.spin_us``): what the card's
    latency costs the host in spinning, reported apart from its own work."""
    link = CardLink(tmp_path / "card.sock", tmp_path / "card-lost.log", spin_us=20, alone_spin_us=2000,
                    load=HostLoad())
    link.load.requests = 1
    t = LateAck()
    link._t = t
    loop = asyncio.new_event_loop()
    try:
        async def go(arm: bool):
            if arm:
                t.arm()
            else:
                t.ready_at = 0  # the ack is there before the wait
            return link.wait_ack(t, 1, time.monotonic_ns() + 1_000_000_000)
        assert loop.run_until_complete(go(False)) is True
        assert link.spin_ns_total == 0
        assert loop.run_until_complete(go(True)) is True
        assert ACK_AFTER_NS * 0.5 <= link.spin_ns_total <= 2_000_000
    finally:
        loop.close()
