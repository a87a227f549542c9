"""The soak's ledger: one write order kept across every case of a soak
(`nicsplit.testing.soak`), written by a client that survives the faults.

The writer writes self-describing 4 KiB blocks (`nicsplit.testing.ledger.block`)
one at a time, each acknowledged before the next, so ``order`` is the
client's write order. A write whose connection broke (the host was killed)
is *uncertain*: it may or may not have reached production. The writer
reconnects and writes the very same block again before anything else, so
each write appears once in the order whatever happened to the first try:
every consistent PIT must still be exactly a prefix of ``order``.

Checks:

- `check_prefix` — an image is exactly the first n writes (returns n);
- `check_record` — a journal record of the ledger's vdisk carries only
  ledger blocks the client sent, each at the offset it was sent to (no
  phantom write).
"""

from __future__ import annotations

import random
import struct
import threading
import time
from typing import Callable

from nicsplit.testing.ledger import BS, block
from nicsplit.testing.procs import nbd_connect

__all__ = ["SoakLedger", "LedgerWriter", "check_prefix", "check_record"]


class SoakLedger:
    """The write order of the whole soak: ``order[i]`` is the block number
    write i went to; writes ``< acked`` were acknowledged."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.nblocks = size // BS
        self.rng = random.Random(seed)
        self.order: list[int] = []
        self.acked = 0

    def next_block(self) -> int:
        b = self.rng.randrange(self.nblocks)
        self.order.append(b)
        return b

    def image(self, n: int) -> bytes:
        img = bytearray(self.size)
        for i, b in enumerate(self.order[:n]):
            img[b * BS:(b + 1) * BS] = block(i)
        return bytes(img)


def block_index(chunk: bytes) -> int | None:
    """The ledger write a 4 KiB block holds (None: all zeros); raises on a
    block that is neither."""
    if chunk.count(0) == len(chunk):
        return None
    i = struct.unpack_from("<Q", chunk)[0] - 1
    if len(chunk) != BS or i < 0 or chunk != block(i):
        raise AssertionError(f"not a ledger block: starts {bytes(chunk[:16]).hex()}")
    return i


def check_prefix(img: bytes, ledger: SoakLedger) -> int:
    """``img`` is exactly the ledger's first n writes (n = newest write it
    holds + 1); returns n. Raises AssertionError naming the first difference."""
    newest = -1
    for b in range(ledger.nblocks):
        try:
            i = block_index(img[b * BS:(b + 1) * BS])
        except AssertionError as e:
            raise AssertionError(f"block {b}: {e}") from None
        if i is not None:
            if i >= len(ledger.order):
                raise AssertionError(f"block {b} holds ledger write {i}, which the client never sent (phantom)")
            newest = max(newest, i)
    want = ledger.image(newest + 1)
    if img != want:
        bad = next(b for b in range(ledger.nblocks) if img[b * BS:(b + 1) * BS] != want[b * BS:(b + 1) * BS])
        got = block_index(img[bad * BS:(bad + 1) * BS])
        exp = block_index(want[bad * BS:(bad + 1) * BS])
        raise AssertionError(f"not the prefix of the first {newest + 1} writes: block {bad} holds write {got}, "
                             f"the prefix has write {exp} there")
    return newest + 1


def check_record(op: str, offset: int, length: int, blocks: list[tuple[int, bytes]], ledger: SoakLedger) -> None:
    """A journal record of the ledger's vdisk: only whole 4 KiB ledger blocks
    (or zeros: a resync copies what production holds), each at the offset
    the client sent it to, and only writes the client sent. ``blocks`` are
    (block number within the record, bytes) of the blocks it carries."""
    if op != "write":
        raise AssertionError(f"{op} of {length} bytes at {offset}: the ledger client sends only writes")
    if offset % BS or length % BS or offset + length > ledger.size:
        raise AssertionError(f"write of {length} bytes at {offset}: the ledger writes aligned 4 KiB blocks")
    for k, chunk in blocks:
        i = block_index(chunk)
        if i is None:
            continue
        b = offset // BS + k
        if i >= len(ledger.order):
            raise AssertionError(f"block {b} carries ledger write {i}, which the client never sent (phantom)")
        if ledger.order[i] != b:
            raise AssertionError(f"block {b} carries ledger write {i}, which the client sent to block {ledger.order[i]}")


class LedgerWriter(threading.Thread):
    """Writes the ledger through whatever host ``uri()`` names, reconnecting
    after a broken connection and writing an uncertain write again first.
    ``pace`` caps the rate (writes per second) so a long soak's journal
    stays small."""

    def __init__(self, ledger: SoakLedger, uri: Callable[[], str], pace: float = 200.0) -> None:
        super().__init__(daemon=True, name="soak-ledger")
        self.ledger = ledger
        self.uri = uri
        self.pace = pace
        self.stop = threading.Event()
        self.h = None
        self.reconnects = 0
        self.errors: list[str] = []

    def _connect(self, timeout: float = 180.0) -> None:
        t0 = time.monotonic()
        while True:
            try:
                self.h = nbd_connect(self.uri())
                return
            except Exception as e:  # the host is down or restarting: try again, for a while
                self.errors.append(f"connect: {e}")
                if time.monotonic() - t0 > timeout:
                    raise
                time.sleep(0.1)  # a retry back-off, not synchronisation

    def pending(self) -> bool:
        return self.ledger.acked < len(self.ledger.order)

    def run(self) -> None:
        led = self.ledger
        gap = 1.0 / self.pace
        try:
            self._connect()
            while not self.stop.is_set() or self.pending():
                t0 = time.monotonic()
                i = led.acked
                b = led.order[i] if self.pending() else led.next_block()
                try:
                    self.h.pwrite(block(i), b * BS)
                except Exception as e:  # uncertain: reconnect and write the same block again
                    self.errors.append(f"write {i}: {e}")
                    self._drop()
                    self.reconnects += 1
                    self._connect()
                    continue
                led.acked = i + 1
                rest = gap - (time.monotonic() - t0)
                if rest > 0:
                    self.stop.wait(rest)  # pacing, not synchronisation
        except BaseException as e:  # reported by the driver
            self.errors.append(f"writer ended: {e!r}")
            self.failed = e
        finally:
            self._drop()

    failed: BaseException | None = None

    def _drop(self) -> None:
        h, self.h = self.h, None
        if h is not None:
            try:
                h.shutdown()
            except Exception:  # the connection is broken already
                pass
