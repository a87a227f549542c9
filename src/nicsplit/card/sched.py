"""How the card's processes share a core: CPU pinning, scheduling class and
the cyclic collector kept out of the hot path."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import threading
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")

__all__ = ["set_priority", "quiet_gc", "collect_when_idle", "pin_cpus", "off_core", "run_off_core", "to_normal",
           "normal_priority"]

log = logging.getLogger("nicsplit.card")


def set_priority(mode: str) -> str:
    """A DPU's cores serve only the card. Emulated on a shared core, the card
    must at least preempt whatever else runs there the moment the doorbell
    rings, or a wake-up waits for the scheduler's tick (~1 ms, the whole split
    timeout). ``realtime``: SCHED_FIFO priority 1 (the kernel's RT throttle
    still leaves others 5 %); ``high``: nice -10; ``normal``: unchanged.
    Returns what is in force (falls back when not permitted)."""
    if mode != "realtime" and os.sched_getscheduler(0) != os.SCHED_OTHER:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))  # not inherited from a real-time parent
    if mode == "realtime":
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
            return "realtime"
        except (PermissionError, AttributeError, OSError) as e:
            log.warning("card: SCHED_FIFO not permitted (%s); using nice -10", e)
            mode = "high"
    if mode == "high":
        try:
            os.nice(-10 - os.nice(0))
            return "high"
        except OSError as e:
            log.warning("card: cannot raise priority (%s)", e)
    return "normal"


def quiet_gc() -> None:
    """The cyclic collector stops the card for milliseconds — longer than
    the split timeout — once it holds many objects: with automatic
    collection every 50,000 allocations, points of the split bench went to
    marking after ~10,000 writes, each time. Objects alive after start-up
    are frozen out of collection and automatic collection is off; the card
    collects the young generation when it is idle (`collect_when_idle`),
    and reference counting frees the per-write objects anyway."""
    gc.collect()
    gc.freeze()
    gc.disable()


_GC_YOUNG = 2_000  # young objects worth a collection in a gap (~0.1 ms to traverse)


def collect_when_idle(sleeping: bool) -> None:
    """Collect in the card's gaps only: the youngest generation whenever the
    ring is momentarily empty and enough objects piled up (a write arriving
    meanwhile waits ~0.1 ms, not the milliseconds of a big pass); the middle
    one too before a doorbell sleep, after 100 young passes."""
    young, passes, _ = gc.get_count()
    if young >= _GC_YOUNG:
        gc.collect(1 if sleeping and passes >= 100 else 0)


def pin_cpus(cpus: tuple[int, ...] | None) -> tuple[int, ...]:
    """Pin this process; returns the CPU set in force."""
    if not hasattr(os, "sched_setaffinity"):
        return ()
    allowed = sorted(os.sched_getaffinity(0))
    want = (allowed[-1],) if cpus is None else cpus
    if want:
        os.sched_setaffinity(0, want)
    return tuple(sorted(os.sched_getaffinity(0)))


def off_core(cpus: tuple[int, ...], tid: int = 0) -> None:
    """Put one thread (0: the calling one) on ``cpus`` at normal priority.
    A thread inherits its creator's CPUs and SCHED_FIFO; next to a poller
    that never sleeps (``acker_core = "dedicated"``) it would never run, as
    real-time threads of one priority do not share a CPU by time slices."""
    os.sched_setaffinity(tid, cpus)
    if os.sched_getscheduler(tid) != os.SCHED_OTHER:
        os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))


def run_off_core(cpus: tuple[int, ...], fn: Callable[[], T]) -> T:
    """``fn()`` on a short-lived thread moved to ``cpus`` at normal priority,
    so a process it forks starts there, not on the poller's core."""
    out: list = []
    err: list = []

    def run() -> None:
        try:
            off_core(cpus)
            out.append(fn())
        except BaseException as e:  # re-raised in the caller
            err.append(e)

    t = threading.Thread(target=run, name="card-off-core")
    t.start()
    t.join()
    if err:
        raise err[0]
    return out[0]


def to_normal() -> bool:
    """The calling thread at normal priority (SCHED_OTHER); True if it was
    real-time. What the kernel does for a reaping parent (``wait4`` frees
    the child's /proc entries) may wait for another task to let go of them;
    a real-time caller on a shared core keeps that task from ever running,
    and the two spin there together: an acker reaping its worker at
    SCHED_FIFO was seen spinning in ``shrink_dcache_parent`` for 10 minutes,
    with SIGTERM pending. So the card reaps and stops at normal priority."""
    if os.sched_getscheduler(0) == os.SCHED_OTHER:
        return False
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    return True


@contextlib.contextmanager
def normal_priority() -> Iterator[None]:
    """`to_normal` for a block; SCHED_FIFO (priority 1, `set_priority`'s)
    again after it if the thread had it."""
    was = to_normal()
    try:
        yield
    finally:
        if was:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
