"""Run a coroutine eagerly: step it synchronously and only make a Task if it
actually has to wait.

Why: most IOs (a page-cache write, a read) never block, yet a Task per IO
costs several microseconds of scheduling — at ~100k IOPS that is a large
share of a core. Python 3.12's eager task factory does this; 3.11 has none.

`run_eager(coro)` returns ``(True, value)`` when the coroutine finished in its
first step, else ``(False, task)`` with a Task that resumes the *same*
coroutine exactly where it suspended (re-yielding the future it waits on), so
semantics, exceptions and cancellation are those of a normal Task.
"""

from __future__ import annotations

import asyncio
from typing import Any, Coroutine


class _Reyield:
    """Awaitable that hands an already-yielded future back to the Task."""

    __slots__ = ("fut",)

    def __init__(self, fut: Any) -> None:
        self.fut = fut

    def __await__(self):
        return (yield self.fut)


async def _resume(coro: Coroutine[Any, Any, Any], yielded: Any) -> Any:
    while True:
        try:
            await _Reyield(yielded)
        except BaseException as exc:  # cancellation or a failed wait: deliver to coro
            try:
                yielded = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
            continue
        try:
            yielded = coro.send(None)
        except StopIteration as stop:
            return stop.value


def run_eager(coro: Coroutine[Any, Any, Any]) -> tuple[bool, Any]:
    """Step ``coro``; exceptions of a synchronous finish propagate to the caller."""
    try:
        yielded = coro.send(None)
    except StopIteration as stop:
        return True, stop.value
    return False, asyncio.get_running_loop().create_task(_resume(coro, yielded))
