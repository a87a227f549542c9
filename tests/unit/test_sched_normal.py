"""nicsplit.card.sched.to_normal / normal_priority: the card reaps its
worker and stops at normal priority (a real-time reaper can spin in the
kernel waiting for a task it keeps from running), and gets SCHED_FIFO back
after a reap while it runs."""

from __future__ import annotations

import os
import threading

from nicsplit.card.sched import normal_priority, to_normal


def in_thread(fn):
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def test_normal_priority_restores_fifo() -> None:
    def run():
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))  # the tests run as root, as the card may
        seen = []
        with normal_priority():
            seen.append(os.sched_getscheduler(0))
        seen.append(os.sched_getscheduler(0))
        seen.append(to_normal())
        seen.append(os.sched_getscheduler(0))
        seen.append(to_normal())  # already normal: nothing to do
        return seen

    assert in_thread(run) == [os.SCHED_OTHER, os.SCHED_FIFO, True, os.SCHED_OTHER, False]


def test_normal_priority_leaves_a_normal_thread_normal() -> None:
    def run():
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))  # not what an earlier test left the main thread
        with normal_priority():
            inside = os.sched_getscheduler(0)
        return inside, os.sched_getscheduler(0)

    assert in_thread(run) == (os.SCHED_OTHER, os.SCHED_OTHER)
