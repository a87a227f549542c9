"""card/hidden.py: the sweep of stale hidden volumes, which needs the pid of
a card process that is gone (a real child, started and reaped); split from
tests/unit/test_hidden_volume.py."""

from __future__ import annotations

import struct

from nicsplit.card.hidden import NAME_PREFIX, HiddenVolume
from nicsplit.wire import ring as R

SMALL = dict(data_size=R.MIN_DATA, sq_entries=8, cq_entries=8)


def test_sweep_removes_only_volumes_of_dead_cards(tmp_path):
    import subprocess
    import sys

    live = HiddenVolume.create(dir=tmp_path, **SMALL)
    dead = HiddenVolume.create(dir=tmp_path, **SMALL)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    struct.pack_into("<I", dead.header, 80, child.pid)  # card_pid of a process that is gone
    junk = tmp_path / (NAME_PREFIX + "not-a-volume")
    junk.write_bytes(b"x" * 100)
    assert HiddenVolume.sweep_stale(tmp_path) == [dead.path]
    assert live.path.exists() and junk.exists() and not dead.path.exists()
    for v in (live, dead):
        v.close()
    live.unlink()
