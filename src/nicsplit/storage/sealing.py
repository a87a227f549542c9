"""What a sealed image, its rekey and the blob sealer share: the sidecar's
layout (header and per-block entry), the associated data of a block, the
AES-GCM ciphers derived from the keyring, and per-thread scratch buffers.

The formats themselves are described in `nicsplit.storage.sealed` (the
image and its sidecar) and `nicsplit.storage.rekey` (the rekey log).
"""

from __future__ import annotations

import os
import struct
import threading
import time
from array import array
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from nicsplit.core.records import BLOCK_SIZE
from nicsplit.storage.atrest import KEY_SIZE, NONCE_SIZE, TAG_SIZE, AtRestError, Keyring

__all__ = [
    "BS", "TAGS_SUFFIX", "MAGIC", "VERSION", "HEADER_SIZE", "RUN_BLOCKS", "HEADER", "U32", "ENTRY", "ENTRY_SIZE",
    "AAD", "ZEROS", "ZERO_RUN", "SealedError", "Ciphers", "Scratch", "scratch", "pread_into", "tags_path",
    "nblocks", "describe_blocks", "pwritev_all", "IOV_MAX",
]

BS = BLOCK_SIZE  # the sealing unit (`core.records.BLOCK_SIZE`): one GCM message per block
TAGS_SUFFIX = ".tags"
MAGIC = b"NSSI"
VERSION = 1
HEADER_SIZE = 4096  # the header is alone in the sidecar's first page
# Entries of a whole run go in one syscall; 512 blocks = 2 MiB keeps an
# unaligned 1 MiB request in one run and each thread's scratch at 4-8 MiB.
RUN_BLOCKS = 512
_REFRESH_S = 1.0  # the keyring is re-read (stat) at most this often

HEADER = struct.Struct(">4sH16sQI")
assert HEADER.size == 34
U32 = struct.Struct(">I")  # the header's CRC; a blob's key id
ENTRY = struct.Struct(">I12s16s")  # key id, nonce, tag
ENTRY_SIZE = ENTRY.size
assert ENTRY_SIZE == 32 and NONCE_SIZE == 12 and TAG_SIZE == 16
AAD = struct.Struct(">16sQ")  # image uid, block number
ZEROS = bytes(BS)
# Buffers one pwritev takes (Linux: 1024; more is EINVAL).
IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024
ZERO_RUN = memoryview(bytes(RUN_BLOCKS * BS))  # reused: a fresh 2 MiB of zeros costs page faults
assert array("I").itemsize == 4  # key ids are read as an array("I") (`SealedImage._kids`)


class SealedError(Exception):
    """A sealed image or blob that cannot be read or written as asked: one clear line."""


def tags_path(path: str | Path) -> Path:
    """The sidecar of image ``path`` (its existence makes the image sealed)."""
    path = Path(path)
    return path.with_name(path.name + TAGS_SUFFIX)



def nblocks(size: int) -> int:
    """Blocks of an image of ``size`` bytes (the last may be short)."""
    return -(-size // BS)


def describe_blocks(blks: list[int]) -> str:
    """Block numbers for a log line: the first few."""
    return ", ".join(map(str, blks[:8])) + (", ..." if len(blks) > 8 else "")


# -- keys ------------------------------------------------------------------------------------


class Ciphers:
    """The AES-GCM ciphers of one HKDF ``info`` under the keyring's keys,
    derived once per key id (ids are never reused and keys never change)."""

    def __init__(self, keyring: Keyring, info: bytes) -> None:
        self.keyring = keyring
        self._info = info
        self._by_id: dict[int, AESGCM] = {}
        self.refresh()

    def refresh(self) -> None:
        try:
            self.keyring.refresh()
        except AtRestError:
            pass  # the file became unreadable: keep the keys we have (atrest rule 3)
        self._checked = time.monotonic()

    def get(self, key_id: int) -> AESGCM | None:
        """The cipher of ``key_id``, or None when the keyring lacks that key."""
        c = self._by_id.get(key_id)
        if c is None:
            if not self.keyring.has(key_id) and time.monotonic() - self._checked >= _REFRESH_S:
                self.refresh()  # perhaps added since we read the keyring
            if not self.keyring.has(key_id):
                return None
            sub = HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None,
                       info=self._info).derive(self.keyring.key(key_id))
            c = self._by_id[key_id] = AESGCM(sub)
        return c

    def active(self, fallback: bool) -> tuple[int, AESGCM] | None:
        """(key id, cipher) that new data is sealed under: the active key,
        else (``fallback``) the newest key held, else None."""
        if time.monotonic() - self._checked >= _REFRESH_S:
            self.refresh()
        kid = self.keyring.active
        if kid is None and fallback:
            ids = self.keyring.ids()
            kid = ids[-1] if ids else None
        if kid is None:
            return None
        c = self.get(kid)
        return None if c is None else (kid, c)

    def describe_missing(self, key_id: int) -> str:
        held = ", ".join(map(str, self.keyring.ids())) or "no keys"
        return f"at-rest key {key_id}, which is not in the keyring {self.keyring.path} (it holds {held})"


# -- per-thread scratch ------------------------------------------------------------------------


class Scratch(threading.local):
    """Buffers each thread reuses from call to call: "ct" ciphertext read or
    written, "pt" plaintext decrypted, "stage" a partly rewritten run, and
    one block plus its tag for the AEAD call."""

    def __init__(self) -> None:
        self.bufs: dict[str, memoryview] = {}
        self.block = bytearray(BS + TAG_SIZE)
        self.block_view = memoryview(self.block)

    def get(self, name: str, n: int) -> memoryview:
        v = self.bufs.get(name)
        if v is None or len(v) < n:
            v = self.bufs[name] = memoryview(bytearray(max(n, RUN_BLOCKS * BS)))
        return v[:n]


scratch = Scratch()


def pread_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` from ``offset``; bytes past the end of the file read as zeros."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            view[got:] = bytes(len(view) - got)
            return
        got += n



def pwritev_all(fd: int, bufs: list, offset: int, max_bytes: int = 0) -> None:
    """``os.pwritev`` of ``bufs`` (contiguous at ``offset``) until every byte
    is written (it may write fewer), `IOV_MAX` buffers per call; with
    ``max_bytes``, calls of at most that many bytes where the buffers allow
    (a buffer longer than it goes in one call: give it pieces)."""
    if max_bytes:
        group: list = []
        size = 0
        for b in bufs:
            if group and size + len(b) > max_bytes:
                pwritev_all(fd, group, offset)
                offset += size
                group, size = [], 0
            group.append(b)
            size += len(b)
        if group:
            pwritev_all(fd, group, offset)
        return
    for i in range(0, len(bufs), IOV_MAX):
        chunk = bufs[i : i + IOV_MAX] if len(bufs) > IOV_MAX else bufs
        total = sum(map(len, chunk))
        n = os.pwritev(fd, chunk, offset)
        if n != total:
            joined = memoryview(b"".join(chunk))  # a short write (rare): finish the rest one pwrite at a time
            while n < total:
                n += os.pwrite(fd, joined[n:], offset + n)
        offset += total
