"""Model test: random ops on two small vdisks vs a bytearray per vdisk.

Seeded: NICSPLIT_SEED=<int> reproduces a run (the seed is printed).
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile

from hypothesis import HealthCheck, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from nicsplit.host.datastore import Datastore

SEED = int(os.environ.get("NICSPLIT_SEED", random.SystemRandom().randrange(1 << 32)))

ES = 4096 * 2
SIZES = {"a": 9 * ES + 512, "b": 5 * ES}  # odd tail extent on "a"
NAMES = sorted(SIZES)


class DatastoreModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        print(f"test_datastore_model: NICSPLIT_SEED={SEED}")  # shown with the failure
        self.dir = tempfile.mkdtemp(prefix="dsmodel-")
        self.ds = Datastore.create(os.path.join(self.dir, "ds"), volume_size=6 * ES, extent_size=ES)
        for n in NAMES:
            self.ds.create_vdisk(n, SIZES[n])
        self.ds.open_io()
        self.model = {n: bytearray(SIZES[n]) for n in NAMES}
        self.fill = 0

    def teardown(self) -> None:
        self.ds.close()
        shutil.rmtree(self.dir)

    def _range(self, data, name):
        # Bias toward extent boundaries: that is where allocation bugs live.
        size = SIZES[name]
        ext = data.draw(st.integers(0, (size - 1) // ES))
        within = data.draw(st.sampled_from([0, 0, 1, 512, ES // 2, ES - 512, ES - 1]) | st.integers(0, ES - 1))
        off = min(ext * ES + within, size - 1)
        ln = data.draw(st.sampled_from([1, 512, ES, 2 * ES, ES - within]) | st.integers(1, 3 * ES))
        return off, max(1, min(ln, size - off))

    @rule(data=st.data(), name=st.sampled_from(NAMES))
    def write(self, data, name):
        off, ln = self._range(data, name)
        self.fill = self.fill % 255 + 1
        buf = bytes([self.fill]) * ln
        self.ds.vdisk(name).pwrite(off, buf)
        self.model[name][off : off + ln] = buf

    @rule(data=st.data(), name=st.sampled_from(NAMES))
    def trim(self, data, name):
        off, ln = self._range(data, name)
        self.ds.vdisk(name).trim(off, ln)
        self.model[name][off : off + ln] = bytes(ln)

    @rule(data=st.data(), name=st.sampled_from(NAMES), no_hole=st.booleans())
    def zero(self, data, name, no_hole):
        off, ln = self._range(data, name)
        self.ds.vdisk(name).zero(off, ln, no_hole=no_hole)
        self.model[name][off : off + ln] = bytes(ln)

    @rule(data=st.data(), name=st.sampled_from(NAMES))
    def read(self, data, name):
        off, ln = self._range(data, name)
        assert self.ds.vdisk(name).pread(off, ln) == self.model[name][off : off + ln]

    @rule()
    def sync(self):
        self.ds.sync()

    @rule(compact=st.sampled_from([None, True, False]))
    def reopen(self, compact):
        self.ds.close()
        self.ds = Datastore.open(self.ds.path)
        self.ds.open_io(compact=compact)

    @invariant()
    def whole_disks_and_maps_agree(self):
        owners = {}
        for n in NAMES:
            h = self.ds.vdisk(n)
            assert h.pread(0, SIZES[n]) == self.model[n]
            runs = h.extents(0, SIZES[n])
            assert sum(r[0] for r in runs) == SIZES[n]
            pos = 0
            for ln, flags in runs:
                if flags == 3:
                    assert not any(self.model[n][pos : pos + ln])  # holes read zeros
                pos += ln
            for i in range(-(-SIZES[n] // ES)):
                p = h.physical(i * ES)
                if p is not None:
                    assert p not in owners, f"{n} extent {i} shares {p} with {owners[p]}"
                    owners[p] = (n, i)
        assert self.ds.statistics().extents_allocated == len(owners)


# @seed goes on the machine class: run_state_machine_as_test reads it from there.
DatastoreModel = seed(SEED)(DatastoreModel)
TestDatastoreModel = DatastoreModel.TestCase
TestDatastoreModel.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
