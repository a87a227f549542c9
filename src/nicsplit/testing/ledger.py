"""The ledger oracle: a client that writes self-describing 4 KiB blocks to
one vdisk one at a time (each acknowledged before the next), so the order
of ``done`` is the client's write order, and a check that an image is
exactly a prefix of that order (what every consistent PIT must be)."""

from __future__ import annotations

import random
import struct
import threading
import time

from nicsplit.testing.procs import nbd_connect

BS = 4096


def block(i: int) -> bytes:
    """Ledger write i's block: self-describing."""
    return struct.pack("<Q", i + 1) * (BS // 8)


class Ledger(threading.Thread):
    def __init__(self, uri: str, seed: int, size: int, *, rate: float | None = None) -> None:
        super().__init__(daemon=True, name="ledger")
        self.h = nbd_connect(uri)
        self.size = size
        self.stop = threading.Event()
        self.done: list[int] = []  # block numbers, in write order
        self.seed = seed
        self.error: BaseException | None = None
        self.rate = rate  # writes per second at most (None: as fast as acks come)

    def run(self) -> None:
        rng = random.Random(self.seed)
        t = time.monotonic()
        try:
            while not self.stop.is_set():
                if self.rate:
                    t += 1 / self.rate
                    self.stop.wait(max(0.0, t - time.monotonic()))  # pacing the client, not synchronising
                b = rng.randrange(self.size // BS)
                self.h.pwrite(block(len(self.done)), b * BS)
                self.done.append(b)
        except BaseException as e:  # reported by the test
            self.error = e

    def image(self, n: int) -> bytes:
        img = bytearray(self.size)
        for i, b in enumerate(self.done[:n]):
            img[b * BS:(b + 1) * BS] = block(i)
        return bytes(img)


def check_prefix(img: bytes, ledger: Ledger) -> int:
    """The image is exactly the ledger's prefix up to its newest write; returns its length."""
    newest = -1
    for b in range(ledger.size // BS):
        chunk = img[b * BS:(b + 1) * BS]
        if chunk.count(0) != BS:
            i = struct.unpack_from("<Q", chunk)[0] - 1
            assert chunk == block(i), f"block {b}: not a ledger block"
            newest = max(newest, i)
    assert img == ledger.image(newest + 1), f"not the prefix of the first {newest + 1} writes"
    return newest + 1
