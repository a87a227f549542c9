"""``[card] acker_core``: the card's own checks of a dedicated acker core
(`nicsplit.card.fastpath.worker_cpus`, `CardConfig`) and the thread moves
that keep the acker's helpers off a core it never yields
(`nicsplit.card.sched`)."""

from __future__ import annotations

import os
import threading
from types import SimpleNamespace

import pytest

from nicsplit.card.fastpath import worker_cpus
from nicsplit.card.process import CardConfig
from nicsplit.card.sched import off_core, run_off_core
from nicsplit.core.config import ConfigError


def cfg(core: str, worker=()) -> SimpleNamespace:
    return SimpleNamespace(acker_core=core, worker_cpus=worker)


def test_shared_worker_runs_everywhere_by_default():
    assert worker_cpus(cfg("shared"), (0, 1), (1,)) == (0, 1)
    assert worker_cpus(cfg("shared", (1,)), (0, 1), (1,)) == (1,)


def test_dedicated_worker_runs_off_the_acker():
    assert worker_cpus(cfg("dedicated"), (0, 1), (1,)) == (0,)
    assert worker_cpus(cfg("dedicated"), (0, 1, 2, 3), (2, 3)) == (0, 1)
    assert worker_cpus(cfg("dedicated", (0,)), (0, 1, 2), (2,)) == (0,)


@pytest.mark.parametrize("allowed, acker, worker, words", [
    ((0,), (0,), (), "others left for its worker"),
    ((0, 1), (), (), "needs the acker pinned"),
    ((0, 1), (1,), (0, 1), "worker_cpus = (0, 1) shares the dedicated acker core"),
    ((0, 1), (1,), None, "shares the dedicated acker core"),
])
def test_dedicated_core_that_cannot_be_is_a_config_error(allowed, acker, worker, words):
    with pytest.raises(ConfigError) as e:
        worker_cpus(cfg("dedicated", worker), allowed, acker)
    assert words in str(e.value)


def test_card_config_checks_acker_core(tmp_path):
    assert CardConfig.from_mapping(tmp_path, {}).acker_core == "shared"
    assert CardConfig.from_mapping(tmp_path, {"acker_core": "dedicated"}).acker_core == "dedicated"
    with pytest.raises(ConfigError, match="acker_core must be"):
        CardConfig.from_mapping(tmp_path, {"acker_core": "spin"})
    with pytest.raises(ConfigError, match="needs fast_path"):
        CardConfig.from_mapping(tmp_path, {"acker_core": "dedicated", "fast_path": "inline"})


def test_run_off_core_runs_on_the_set_and_leaves_the_caller_alone():
    allowed = tuple(sorted(os.sched_getaffinity(0)))
    target = allowed[:1]
    assert run_off_core(target, lambda: tuple(sorted(os.sched_getaffinity(0)))) == target
    assert tuple(sorted(os.sched_getaffinity(0))) == allowed
    assert run_off_core(target, lambda: os.sched_getscheduler(0)) == os.SCHED_OTHER
    with pytest.raises(ZeroDivisionError):
        run_off_core(target, lambda: 1 // 0)


def test_off_core_moves_another_thread():
    allowed = tuple(sorted(os.sched_getaffinity(0)))
    go, done = threading.Event(), threading.Event()
    seen: list = []

    def body() -> None:
        go.wait(10)
        seen.append(tuple(sorted(os.sched_getaffinity(0))))
        done.set()

    t = threading.Thread(target=body)
    t.start()
    off_core(allowed[-1:], t.native_id)
    go.set()
    assert done.wait(10)
    t.join()
    assert seen == [allowed[-1:]]
    assert tuple(sorted(os.sched_getaffinity(0))) == allowed
