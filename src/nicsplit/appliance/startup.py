"""What the appliance does at start: its stable id (`appliance_id`), and
the start made visible: recovering a journal is linear in
its size (every entry walked, every CRC checked, at-rest records opened),
so a big one takes longer than the supervisor's ready timeout. While
`Appliance.serve` recovers, `StartProgress` prints ``{"event": "starting",
"step": ..., "elapsed_s": ...}`` every `STARTING_EVERY_S` through the same
callback as the ready line, and the supervisor gives a start that reports
progress the timeout again from each line (`nicsplit.control.supervisor`)."""

from __future__ import annotations

import asyncio
import gc
import time
import uuid
from pathlib import Path
from typing import Callable

from nicsplit.core import failpoints as _fp
from nicsplit.core.layout import Layout
from nicsplit.journal.writer import Journal

__all__ = ["GC_THRESHOLDS", "STARTING_EVERY_S", "StartProgress", "appliance_id", "serving_gc", "recover_journal"]

STARTING_EVERY_S = 5.0
# The cyclic collector's thresholds while serving (young, middle, old).
GC_THRESHOLDS = (10_000, 10, 10)


class StartProgress:
    """``async with StartProgress(ready) as p: p.step = "..."``: a progress
    line every `STARTING_EVERY_S` until the block ends (none with no
    ``ready`` callback)."""

    def __init__(self, ready: Callable[[dict], None] | None) -> None:
        self.ready = ready
        self.step = "recovering journals"
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> "StartProgress":
        if self.ready is not None:
            self._task = asyncio.get_running_loop().create_task(self._report())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _report(self) -> None:
        t0 = time.monotonic()
        while True:
            await asyncio.sleep(STARTING_EVERY_S)
            self.ready({"event": "starting", "step": self.step, "elapsed_s": round(time.monotonic() - t0)})


def recover_journal(path: Path, segment_size: int) -> Journal:
    """Worker thread: open (recover) one journal at start."""
    if _fp.ACTIVE:
        _fp.hit("appliance.recover-journal")  # a recovery as slow as a big journal's
    return Journal.open(path, segment_size=segment_size)


def serving_gc() -> None:
    """Once recovered, before serving: what exists now (modules, recovered
    journals and indexes) is frozen out of the cyclic collector, and the
    young generation is collected every `GC_THRESHOLDS`[0] allocations
    instead of CPython's 700. At 700 a batch in flight (its records, views
    and heads) outlives several young collections, is promoted, and is
    walked again by middle and full ones: 2.2 µs of CPU a record of ingest
    and ~5 µs a write end to end (8 % of the appliance), against 0.3 µs
    here (docs/benchmarks.md, stop 28). The ingest path makes no cycles of
    its own; reference counting frees it, and what cycles asyncio makes are
    still collected, later. (The card's `card.sched.quiet_gc` goes further
    and turns automatic collection off: it collects in its own gaps.)"""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def appliance_id(data: Path) -> str:
    """A stable id for this appliance (created once under data/appliance/id)."""
    path = Layout(data).appliance_id
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        ident = f"appliance-{uuid.uuid4()}"
        path.write_text(ident + "\n")
        return ident
