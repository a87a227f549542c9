"""The net transport's IO half (`NetSplitter`) on an event loop, its peer
played by the frame codecs in memory (the real appliance is in
tests/e2e/test_net_*.py): one flush per loop turn, a durable ack completes
the write's future, a deadline fails it and drops its late ack, a lost link
fails every write in flight and nothing is accepted after it."""

from __future__ import annotations

import asyncio
from time import monotonic_ns

from nicsplit.card.transports.net import NetSplitter
from nicsplit.card.transports.net_state import NetState
from nicsplit.core.records import AugmentedWrite, Op, Status, WFlag
from nicsplit.wire.frames import NEED_DATA, PROTOCOL_VERSION, Ack, Batch, Error, FrameDecoder, HelloAck, encode


class Wire:
    """The writer half the splitter writes to; `batches` decodes what it sent."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False

    def write(self, b: bytes) -> None:
        if self.closed:
            raise RuntimeError("closed")
        self.out += b

    def close(self) -> None:
        self.closed = True

    def batches(self) -> list[Batch]:
        dec = FrameDecoder()
        dec.receive_data(bytes(self.out))
        self.out.clear()
        out = []
        while (f := dec.next_event()) is not NEED_DATA:
            if isinstance(f, Batch):
                out.append(f)
        return out


def w(io_id: int, seq: int) -> AugmentedWrite:
    return AugmentedWrite(io_id, 1, seq, 3, Op.WRITE, WFlag(0), seq * 4096, 4096, 1, b"d" * 4096)


async def splitter() -> tuple[NetSplitter, asyncio.StreamReader, Wire]:
    st = NetState({1: "cg1"}, key=None)
    st.connected(HelloAck("app", PROTOCOL_VERSION, {"cg1": 0}))
    reader, wire = asyncio.StreamReader(), Wire()
    t = NetSplitter(st, reader, wire, heartbeat_s=60)  # type: ignore[arg-type]
    return t, reader, wire


async def turn() -> None:
    for _ in range(3):
        await asyncio.sleep(0)  # ok-sleep: a zero sleep is one scheduler turn (no time passes): the loop runs the flush and the reader task, in order


def run(coro) -> None:
    asyncio.run(coro)


def test_writes_of_one_turn_share_a_batch_and_a_durable_ack_completes_them():
    async def main() -> None:
        t, reader, wire = await splitter()
        assert t.ack_first and t.post_outcome(1, Status.COMMITTED) and t.reserve(4096) is None
        assert t.submit(w(1, 1)) and t.submit(w(2, 2))
        far = monotonic_ns() + 10**9
        f1, f2 = t.ack_future(1, far), t.ack_future(2, far)
        assert t.released_position() == 0 and t.last_position == 2
        await turn()
        (b,) = wire.batches()
        assert (b.first_seq, b.last_seq) == (1, 2)
        assert not f1.done()
        reader.feed_data(encode(Ack(b.batch_id, "cg1", 2, False)))  # received, not durable
        await turn()
        assert not f1.done()
        reader.feed_data(encode(Ack(b.batch_id, "cg1", 2, True)))
        assert await f1 is True and await f2 is True
        assert t.released_position() == 2 and t.statistics().acked == 2
        t.close()
    run(main())


def test_a_deadline_fails_the_write_and_its_late_ack_is_dropped():
    async def main() -> None:
        t, reader, wire = await splitter()
        t.submit(w(1, 1))
        fut = t.ack_future(1, monotonic_ns() + 2_000_000)  # 2 ms
        assert await fut is False  # no ack: the splitter marks
        (b,) = wire.batches()
        assert t.released_position() == 1  # nothing waits: the failed write is the splitter's to mark
        reader.feed_data(encode(Ack(b.batch_id, "cg1", 1, True)))
        await turn()
        assert t.take_ack(1) is None and t.ack_future(1, monotonic_ns() + 10**9) is False
        assert t.healthy()
        t.close()
    run(main())


def test_an_ack_before_the_wait_is_kept_for_it():
    async def main() -> None:
        t, reader, wire = await splitter()
        t.submit(w(5, 1))
        await turn()
        (b,) = wire.batches()
        reader.feed_data(encode(Ack(b.batch_id, "cg1", 1, True)))
        await turn()
        assert t.ack_future(5, monotonic_ns() + 10**9) is True
        t.close()
    run(main())


def test_a_lost_link_fails_every_write_in_flight_and_refuses_new_ones():
    async def main() -> None:
        t, reader, wire = await splitter()
        t.submit(w(1, 1))
        await turn()
        t.submit(w(2, 2))  # queued, not flushed yet
        far = monotonic_ns() + 10**9
        f1, f2 = t.ack_future(1, far), t.ack_future(2, far)
        reader.feed_eof()
        assert await f1 is False and await f2 is False
        assert not t.healthy() and "closed the connection" in t.dead_reason and wire.closed
        assert not t.submit(w(3, 3))
        t.close()
    run(main())


def test_an_error_frame_kills_the_link():
    async def main() -> None:
        t, reader, _wire = await splitter()
        t.submit(w(1, 1))
        fut = t.ack_future(1, monotonic_ns() + 10**9)
        await turn()
        reader.feed_data(encode(Error(6, "journal failure")))
        assert await fut is False
        assert not t.healthy() and "error 6" in t.dead_reason
    run(main())


def test_a_write_of_a_cg_created_after_the_hello_makes_the_link_say_hello_again():
    async def main() -> None:
        t, _reader, wire = await splitter()
        new_cg = AugmentedWrite(1, 2, 1, 3, Op.WRITE, WFlag(0), 0, 4096, 1, b"d" * 4096)
        assert not t.submit(new_cg)
        assert not t.healthy() and "not in this link's Hello" in t.dead_reason and wire.closed
    run(main())


def test_writes_waiting_without_any_frame_for_dead_after_s_kill_the_link():
    async def main() -> None:
        st = NetState({1: "cg1"}, key=None)
        st.connected(HelloAck("app", PROTOCOL_VERSION, {"cg1": 0}))
        t = NetSplitter(st, asyncio.StreamReader(), Wire(), heartbeat_s=0.01, dead_after_s=0.05)  # type: ignore[arg-type]
        await asyncio.sleep(0.1)  # ok-sleep: idle with nothing waiting is not dead
        assert t.healthy()
        t.submit(w(1, 1))
        fut = t.ack_future(1, monotonic_ns() + 10 * 10**9)
        assert await fut is False  # the link died long before the write's own deadline
        assert "no frame from the appliance" in t.dead_reason
    run(main())


def test_writes_that_each_time_out_on_a_silent_link_still_kill_it():
    """A blackhole: every write gives up at its own (short) deadline, so
    none waits long, but nothing at all comes back: the link is dead after
    dead_after_s and the host reconnects instead of marking forever."""
    async def main() -> None:
        st = NetState({1: "cg1"}, key=None)
        st.connected(HelloAck("app", PROTOCOL_VERSION, {"cg1": 0}))
        t = NetSplitter(st, asyncio.StreamReader(), Wire(), heartbeat_s=0.01, dead_after_s=0.1)  # type: ignore[arg-type]
        for i in range(1, 30):
            if not t.submit(w(i, i)):
                break
            assert await t.ack_future(i, monotonic_ns() + 5_000_000) is False  # 5 ms deadline each
        assert not t.healthy() and "no frame from the appliance" in t.dead_reason
    run(main())
