"""A real deployment whose link to the appliance runs through our TCP fault
relay (`linkemu.LinkEmulator`), for the link tests: `relayed_deployment`
makes the data directory (cg1 with vdisk "a"), starts the relay and returns
an `UpProcess` (not started) whose appliance listens behind it::

    data, link, up = relayed_deployment(
        tmp_path, seed, 8 << 20,
        lambda relay: {"splitter": {"transport": "net", "appliance": relay}})
    try:
        with up:
            ...
    finally:
        link.close()
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

from nicsplit.testing.datadir import init_data
from nicsplit.testing.linkemu import LinkEmulator
from nicsplit.testing.procs import UpProcess, run_cli


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on (as of now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def relayed_deployment(tmp_path: Path, seed: int, size: int, sections: Callable[[str], dict],
                       **host: object) -> tuple[Path, LinkEmulator, UpProcess]:
    """``sections(relay)`` gives the configuration sections, ``relay`` being
    the relay's "host:port" (what the shipping side must name as appliance);
    ``host`` goes to `init_data` as is (filters=...)."""
    appliance = ("127.0.0.1", free_port())
    link = LinkEmulator(("127.0.0.1", 0), appliance, seed=seed).start()
    data = init_data(tmp_path / "data", sections=sections(f"{link.address[0]}:{link.address[1]}"), **host)
    run_cli(data, "cg", "create", "cg1")
    run_cli(data, "vdisk", "create", "a", "--size", str(size), "--cg", "cg1")
    up = UpProcess(data, "--appliance-listen", f"{appliance[0]}:{appliance[1]}")
    return data, link, up
