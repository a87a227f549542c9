"""Shared fixtures: real processes, real peers, seeded randomness.

A missing peer tool is a *failure* (never a skip): the suite exists to show
that real clients nobody here wrote work against nicsplit.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest

from nicsplit.testing.datadir import init_data
from nicsplit.testing.procs import HostProcess

PEER_TOOLS = ("nbdkit", "nbdinfo", "nbdcopy", "qemu-io", "qemu-img", "fio", "qemu-system-x86_64")


@pytest.fixture(scope="session")
def peers() -> None:
    missing = [t for t in PEER_TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"peer tools missing: {', '.join(missing)} (make test installs them: scripts/setup-system.sh)")


@pytest.fixture
def seed() -> int:
    """A seed for this test; printed so a failure can be reproduced with
    NICSPLIT_SEED=<seed>."""
    s = int(os.environ.get("NICSPLIT_SEED", random.SystemRandom().randrange(1 << 32)))
    print(f"seed={s} (rerun with NICSPLIT_SEED={s})")
    return s


@pytest.fixture
def rng(seed: int) -> random.Random:
    return random.Random(seed)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return init_data(tmp_path / "data")


@pytest.fixture
def host_factory(tmp_path: Path):
    started: list[HostProcess] = []

    def start(data: Path, *args: str) -> HostProcess:
        h = HostProcess(data, *args).start()
        started.append(h)
        return h

    yield start
    for h in started:
        if h.proc is not None and h.proc.poll() is None:
            status = h.stop()
            assert status == 0, f"host exited {status} on SIGTERM; log:\n{h.log()}"


@pytest.fixture(autouse=True)
def _no_stray_image_servers(tmp_path: Path):
    """`nicsplit image export` and `nicsplit failover` detach their servers
    on purpose; a test that fails before `image close` or `failback` must not
    leave one running."""
    yield
    import signal

    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        detached = (b"image" in cmd and b"serve" in cmd) or b"failover-serve" in cmd
        if detached and any(str(tmp_path).encode() in c for c in cmd):
            try:
                os.kill(int(proc.name), signal.SIGTERM)
            except OSError:
                pass
