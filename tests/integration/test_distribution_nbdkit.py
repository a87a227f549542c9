"""Failover's failback copy client against a real ``nbdkit memory`` (a
child process); split from tests/unit/test_distribution.py."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from nicsplit.storage import atrest
from nicsplit.recovery.failover import copy_runs
from nicsplit.recovery.nbdclient import NbdClient, NbdError
from nicsplit.core.dirtymap import REGION as DIRTY_REGION
from nicsplit.storage.image import open_image
from nicsplit.testing.procs import NbdkitProcess, import_libnbd


@pytest.mark.usefixtures("peers")
def test_nbd_client_writes_zeroes_and_flushes_against_nbdkit(tmp_path: Path, rng: random.Random):
    size = 4 << 20
    src = bytearray(rng.randbytes(size))
    src[1 << 20 : 2 << 20] = bytes(1 << 20)  # a chunk of zeros: goes as WRITE_ZEROES
    kr = atrest.Keyring.create(tmp_path / atrest.KEYRING_NAME)
    with open_image(tmp_path / "src.img", size, kr, writable=True, create=True) as w:  # sealed, as replicas are
        assert w.sealed
        w.pwrite(src, 0)
    runs = [(0, 3 * DIRTY_REGION), (1 << 20, (1 << 20) + 5000), (size - 4096, 4096)]
    with NbdkitProcess(tmp_path, ["memory", str(size)]) as kit:
        uri = f"nbd+unix:///?socket={kit.sock}"
        with open_image(tmp_path / "src.img", size, kr, writable=False) as img, NbdClient(uri) as c:
            assert c.size == size and c.can_zero
            written, zeroed = copy_runs(c, img, runs, chunk=1 << 20)
        assert zeroed == 1 << 20 and written == sum(n for _, n in runs) - zeroed
        h = import_libnbd().NBD()
        h.connect_uri(uri)
        got = h.pread(size, 0)
        h.shutdown()
        want = bytearray(size)
        for off, n in runs:
            want[off : off + n] = src[off : off + n]
        assert got == bytes(want)
    (tmp_path / "ro").mkdir()
    with NbdkitProcess(tmp_path / "ro", ["memory", "1M"], readonly=True) as kit:
        with pytest.raises(NbdError, match="read-only"):
            NbdClient(f"nbd+unix:///?socket={kit.sock}")
