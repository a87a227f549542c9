"""In-process stand-ins for the host's peers, for tests that run a real
`HostServer` (real datastore, real chain, real ring) in one event loop.

`RingCard` is the card's side of a real ring: it heartbeats, takes and acks
entries, keeps what it received and, like the appliance's durable ack would,
releases a payload once its outcome arrived. `until` waits for a condition
with a deadline (the async twin of `nicsplit.testing.procs.wait_for`).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Callable

from nicsplit.card.transports.ring_endpoint import RingEndpoint
from nicsplit.core.cgs import CGCatalog
from nicsplit.core.config import Config
from nicsplit.core.records import AugmentedWrite, Outcome
from nicsplit.host.datastore import Datastore
from nicsplit.host.server import HostServer

__all__ = ["RingCard", "until", "unix_connector", "host_with_card"]

POLL_S = 0.0005  # the stand-in card's poll interval (a real card spins, then sleeps on its doorbell)


class RingCard:
    """``paused`` stops it taking entries; ``durable = False`` keeps every
    payload held (acked, never durable)."""

    def __init__(self, run: Path, data_size: int = 16 << 20, sq_entries: int = 256) -> None:
        self.ep = RingEndpoint(run, data_size=data_size, sq_entries=sq_entries)
        self.writes: list[AugmentedWrite] = []
        self.outcomes: list[Outcome] = []
        self.paused = False
        self.durable = True
        self._task: asyncio.Task | None = None

    def start(self) -> "RingCard":
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def _run(self) -> None:
        while True:
            self.ep.heartbeat()
            if not self.paused:
                for e in self.ep.poll():
                    if isinstance(e, Outcome):
                        self.outcomes.append(e)
                        if self.durable:
                            self._release(e.io_id)
                    else:
                        if e.data is not None:
                            e.data = bytes(e.data)
                        self.writes.append(e)
            await asyncio.sleep(POLL_S)  # ok-sleep: the stand-in card's poll interval

    def _release(self, io_id: int) -> None:
        try:
            self.ep.release(io_id)
        except KeyError:
            pass  # a barrier holds nothing

    async def kill(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.ep.close()


async def until(cond: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    """Wait until ``cond()`` is true; AssertionError after ``timeout`` s."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError(f"{what} not reached within {timeout:g} s")
        await asyncio.sleep(0.002)  # ok-sleep: the poll interval of a deadline wait


def unix_connector(path: Path | str) -> Callable:
    """A `Shipper` connect callable that opens a Unix stream to ``path``."""
    async def connect():
        return await asyncio.open_unix_connection(str(path))
    return connect


def host_with_card(data: Path, host: dict[str, Any] | None = None, *, size: int = 8 << 20) -> tuple[HostServer, Datastore, RingCard]:
    """A real `HostServer` on a fresh datastore in ``data`` with vdisk ``a``
    (``size`` bytes) in CG cg1 and a started `RingCard`: (host, datastore,
    card). ``host``: the ``[host]`` table. The caller kills the card, stops
    the host and closes the datastore."""
    cfg = Config(data=data, raw={"host": dict(host or {})})
    CGCatalog(data).create("cg1")
    ds = Datastore.create(cfg.datastore_dir, volume_size=64 << 20)
    ds.open_io()
    ds.create_vdisk("a", size, extra={"cg": "cg1"})
    srv = HostServer(cfg, ds)
    card = RingCard(srv.cfg.layout.run)
    card.start()
    return srv, ds, card
