"""run_eager: synchronous completion without a Task; otherwise a Task that
behaves exactly like one (results, exceptions, cancellation)."""

from __future__ import annotations

import asyncio

import pytest

from nicsplit.host.eager import run_eager
from nicsplit.host.plugin import GroupSync


async def quick(x):
    return x * 2


async def slow(fut, x):
    await asyncio.sleep(0)  # ok-sleep: a bare yield to the loop is the case under test
    v = await fut
    return v + x


async def fails_later(fut):
    await fut
    raise ValueError("boom")


def test_eager_paths():
    async def main():
        done, v = run_eager(quick(21))
        assert done and v == 42
        fut = asyncio.get_running_loop().create_future()
        done, task = run_eager(slow(fut, 1))
        assert not done
        asyncio.get_running_loop().call_later(0.001, fut.set_result, 41)
        assert await task == 42
        fut2 = asyncio.get_running_loop().create_future()
        done, task2 = run_eager(fails_later(fut2))
        fut2.set_result(None)
        with pytest.raises(ValueError, match="boom"):
            await task2
        fut3 = asyncio.get_running_loop().create_future()
        done, task3 = run_eager(slow(fut3, 0))
        await asyncio.sleep(0)  # ok-sleep: one loop turn so the task is suspended, then cancel it
        task3.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task3

    asyncio.run(main())


def test_group_sync_coalesces_and_covers():
    """A sync requested while one runs waits for the next one; concurrent
    requests share it."""
    import threading

    started = []
    release = threading.Event()

    def sync():
        started.append(len(started))
        if len(started) == 1:
            release.wait(10)

    async def main():
        loop = asyncio.get_running_loop()
        in_sync = asyncio.Event()
        gs = GroupSync(lambda: (loop.call_soon_threadsafe(in_sync.set), sync()))
        first = asyncio.ensure_future(gs.sync())
        await asyncio.wait_for(in_sync.wait(), 10)
        later = [asyncio.ensure_future(gs.sync()) for _ in range(10)]
        done, _ = await asyncio.wait(later, timeout=0.01)  # the first sync is held: none may finish
        assert not done
        release.set()
        await asyncio.gather(first, *later)
        assert gs.syncs == 2 and gs.requests == 11

    asyncio.run(main())
