"""The appliance's collector policy once recovered (appliance/startup.py
`serving_gc`): start-up state frozen out of collection, the young
generation collected every GC_THRESHOLDS[0] allocations."""

import gc

import pytest

from nicsplit.appliance.startup import GC_THRESHOLDS, serving_gc

pytestmark = pytest.mark.unit


def test_serving_gc_freezes_what_exists_and_raises_the_young_threshold():
    before = gc.get_threshold()
    kept = [[] for _ in range(100)]  # containers alive at "start-up"
    try:
        serving_gc()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert GC_THRESHOLDS[0] > before[0]
        assert gc.get_freeze_count() >= len(kept)
        ids = {id(o) for o in gc.get_objects()}  # the collector no longer walks the frozen ones
        assert not any(id(k) in ids for k in kept)
        later = []
        assert id(later) in {id(o) for o in gc.get_objects()}  # what comes after is collected as before
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
