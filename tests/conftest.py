"""Shared fixtures: real processes, real peers, seeded randomness.

A missing peer tool is a *failure* (never a skip): the suite exists to show
that real clients nobody here wrote work against nicsplit.

Every test is marked by the directory it lives in (unit, integration, e2e,
peers, crash), so `pytest -m unit` (`make test-fast`) needs no marks in the
test files: tests/unit starts no process; tests/integration starts nicsplit
commands or peer tools as children; e2e, peers and crash run whole systems.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from nicsplit.testing.datadir import init_data
from nicsplit.testing.procs import HostProcess, missing_peer_tools, stop_detached_servers

TESTS = Path(__file__).resolve().parent
KINDS = ("unit", "integration", "e2e", "peers", "crash")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        try:
            kind = item.path.resolve().relative_to(TESTS).parts[0]
        except ValueError:  # collected from outside tests/
            continue
        if kind in KINDS:
            item.add_marker(kind)


@pytest.fixture(scope="session")
def peers() -> None:
    missing = missing_peer_tools()
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
    """An initialised data directory (``nicsplit init`` runs as a child)."""
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
    stop_detached_servers(tmp_path)
