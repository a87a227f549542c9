"""The real half of a shadow write: the datastore's physical write passed
through the card's emulated device (`nicsplit.card.transports.shadow`).

The splitter filter registers each shadow write here (`INFLIGHT`, keyed by
``id(data)``) from just before it passes the write down until the layer
below returned; the datastore plugin at the bottom of the chain finds it by
the payload it is handed and, instead of ``os.pwrite``, queues the
translated pieces (volume, physical offset, bytes) to the card
(`write_through`). The chain hands a payload down as the same object
(`nicsplit.host.chain` rule 4), and objects alive at the same time have
distinct ids, so the lookup is exact; a filter below the splitter that
replaced the payload makes the lookup miss: the write goes to the file
directly and the filter marks its region (``routed`` stays False).

Why not a ``contextvars.ContextVar``: the session steps a request's chain
eagerly in *its own* task's context (`nicsplit.host.eager.run_eager`) and
only a request that suspends continues in a new Task (which copies the
context). A variable set during the eager step is set in the session
task's context and outlives the request there, so a later write of another
vdisk would see it; resetting it with its token fails once the request
resumed in the copied context. The registry has neither problem.

Production first (P4): when the card is gone, or its queue stays full for
``FULL_WAIT_NS``, the rest of the write goes to the file directly and the
filter marks the region (the vdisk goes marking, then resyncing, then
protected once the card is back). A card that is alive but stuck holds a
writer until its heartbeat goes stale (the ring's ``stale_after_ns``, 2 s):
the device's health check then fails the wait (every 50 ms while writers
wait). A write larger than the device's data area in flight at once (16
MiB by default: a write's pieces are queued together) parks for room and,
past ``FULL_WAIT_NS``, is written directly and marked.
"""

from __future__ import annotations

import asyncio
from time import monotonic_ns

from nicsplit.card.transports.shadow_device import DeviceGone
from nicsplit.core import failpoints as _fp

__all__ = ["ShadowIO", "INFLIGHT", "write_through", "FULL_WAIT_NS"]

_FP = _fp.ACTIVE
FULL_WAIT_NS = 2_000_000  # a full device queue parks a writer this long (the card drains ~1 entry/us)


class ShadowIO:
    """One shadow write on its way down: its IO id (the fake half's), the
    transport it went to, its virtual offset, and whether its real half
    passed through the card (set by `write_through`)."""

    __slots__ = ("io_id", "t", "offset", "routed")

    def __init__(self, io_id: int, t, offset: int) -> None:
        self.io_id = io_id
        self.t = t
        self.offset = offset
        self.routed = False


INFLIGHT: dict[int, ShadowIO] = {}  # id(payload) -> its ShadowIO, while the write is below the splitter


async def write_through(store, offset: int, data, io: ShadowIO) -> None:
    """Write ``data`` at virtual ``offset`` of ``store`` (a `VdiskStore`)
    through the card's device; sets ``io.routed`` when every piece was
    written by the card. OSError / ValueError of the store propagate (the
    plugin maps them as for a direct write)."""
    pieces = store.pieces_for_write(offset, data)  # allocation and the extent log stay on the host
    if _FP:
        try:
            _fp.hit("host.shadow.drop-real")
        except OSError:  # test: the real half never reaches the card (its fake half is orphaned)
            for vol, phys, piece in pieces:
                store.write_piece(vol, phys, piece)
            io.routed = True
            return
    dev = getattr(io.t, "device", None)
    queued: list[tuple[int, int]] = []  # (position, volume)
    done = 0
    try:
        if dev is None or dev.dead:
            raise DeviceGone("no device")
        if max(len(p) for _, _, p in pieces) > dev.mem.geometry.data_size:
            raise DeviceGone("a piece larger than the device's data area")  # (an extent size above it)
        last = len(pieces) - 1
        for i, (vol, phys, piece) in enumerate(pieces):
            pos = dev.write(vol, phys, piece, io.io_id, i < last)
            if pos is None:
                deadline = monotonic_ns() + FULL_WAIT_NS
                while pos is None and monotonic_ns() < deadline:
                    await asyncio.sleep(0)  # the card frees entries as it polls
                    pos = dev.write(vol, phys, piece, io.io_id, i < last)
                if pos is None:
                    break
            queued.append((pos, vol))
        ok = len(queued) == len(pieces)
        for pos, vol in queued:
            if await dev.wait(pos):
                ok = False
            store.written(vol)
            done += 1
    except DeviceGone:
        ok = False  # a dead card runs none of what is still queued: its queue died with it
    if ok:
        io.routed = True
        return
    # Production first: what the card did not write goes to the file now
    # (rewriting a piece it did write puts the same bytes there again).
    for vol, phys, piece in pieces:
        store.write_piece(vol, phys, piece)
