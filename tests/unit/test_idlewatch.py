"""`nicsplit.appliance.idlewatch.IdleWatch`: a connection's reader is
cancelled when one read has been pending ``idle`` seconds, never while it
keeps getting data or while it is not reading (backpressure), and the
cancellation is told apart from others (`fired`)."""

from __future__ import annotations

import asyncio
import time

import pytest

from nicsplit.appliance.idlewatch import IdleWatch

IDLE = 0.2


async def reader_loop(reader: asyncio.StreamReader, stall: asyncio.Event | None = None) -> tuple[str, float]:
    """The appliance's read loop in small: (how it ended, seconds it ran)."""
    t0 = time.monotonic()
    task = asyncio.current_task()
    assert task is not None
    w = IdleWatch(asyncio.get_running_loop(), task, IDLE)
    try:
        while True:
            w.reading()
            data = await reader.read(1024)
            w.read_done()
            if not data:
                return "eof", time.monotonic() - t0
            if stall is not None and data == b"stall":
                await stall.wait()  # not reading: backpressure, not silence
    except asyncio.CancelledError:
        if not w.fired:
            raise
        task.uncancel()
        return "silent", time.monotonic() - t0
    finally:
        w.close()


def test_a_silent_peer_is_cut_after_the_idle_time():
    async def main() -> tuple[str, float]:
        return await reader_loop(asyncio.StreamReader())

    how, took = asyncio.run(main())
    assert how == "silent" and IDLE <= took < IDLE + 1.0, (how, took)


def test_a_peer_that_keeps_sending_is_not_cut():
    async def main() -> tuple[str, float]:
        r = asyncio.StreamReader()
        task = asyncio.create_task(reader_loop(r))
        for _ in range(8):  # 8 x IDLE/2: longer than IDLE in all, never IDLE without data
            await asyncio.sleep(IDLE / 2)  # ok-sleep: the peer's pace is what is tested
            r.feed_data(b"x")
        r.feed_eof()
        return await task

    how, took = asyncio.run(main())
    assert how == "eof" and took >= 4 * IDLE, (how, took)


def test_time_spent_not_reading_is_not_silence():
    async def main() -> tuple[str, float]:
        r = asyncio.StreamReader()
        stall = asyncio.Event()
        task = asyncio.create_task(reader_loop(r, stall))
        r.feed_data(b"stall")
        await asyncio.sleep(3 * IDLE)  # ok-sleep: the reader is held this long outside a read
        r.feed_data(b"x")
        r.feed_eof()
        stall.set()
        return await task

    how, took = asyncio.run(main())
    assert how == "eof" and took >= 3 * IDLE, (how, took)


def test_another_cancellation_is_not_taken_for_silence():
    async def main() -> None:
        task = asyncio.create_task(reader_loop(asyncio.StreamReader()))
        await asyncio.sleep(IDLE / 4)  # ok-sleep: let the reader start its read
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
