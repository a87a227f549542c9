"""The sealed image: a disk image at rest under AES-256-GCM per 4 KiB block,
behind the `Image` interface (`nicsplit.storage.base`; `open_image` in
`nicsplit.storage.image` decides plain or sealed).

Layout of a sealed image ``disk.img``::

    disk.img        ciphertext at the offsets of the plaintext; sparse; length = size
    disk.img.tags   the sidecar: a 4096-byte header, then one 32-byte entry per block
    disk.img.rekey  the rekey log: only while `rekey` runs, or after a crash in it (rule 6)

    header (big-endian, zero-padded to 4096 bytes)
      0  4s  magic b"NSSI"
      4  H   version (1)
      6  16s image uid: random at creation; in every block's AAD and subkey
     22  Q   size of the image in bytes (the data file's length)
     30  I   block size (4096)
     34  I   CRC32 of bytes 0..33
    entry of block N, at 4096 + 32 * N
      0  I   key id of the keyring key sealing the block; 0 = never written or zeroed
      4  12s GCM nonce, random per write of the block
     16  16s GCM tag

    The rekey log's layout is in `nicsplit.storage.rekey`.

Theory of operation
===================
`open_image` decides once: an existing image is sealed iff its sidecar
exists (images written before encryption keep working in clear); a new
image is sealed iff the keyring has an active key.  Both kinds answer the
same calls (`Image`): `pread`, `pwrite`, `zero`, `extents`, `resize`,
`fsync`, `close`, at any alignment.

A sealed block is one GCM message: the cipher is AES-256-GCM under
``HKDF-SHA256(keyring key, info=b"nicsplit image block" || uid)`` (one per key
id, cached), the nonce is fresh from ``os.urandom`` at every write, and the
associated data is ``uid || u64 block number``, so a block copied to another
offset or into another image, a flipped byte, a nonce or tag from another
write, or another key all fail authentication.  The last block of an image
whose size is not a multiple of 4 KiB is a shorter message (GCM needs no
padding).  The tag entry is authoritative: key id 0 reads as zeros whatever
the data file holds there; `zero` clears entries (a hole punched in the
sidecar) and then punches the whole blocks of the data file, so zeroed and
never-written blocks cost no space and `extents` comes from the sidecar.

Speed: a run of blocks costs one ``pread``/``pwrite`` for the ciphertext and
one for its entries, whatever its length (up to `RUN_BLOCKS` per syscall),
and per block only the AEAD call and a few slice copies into per-thread
scratch buffers that are reused (fresh megabyte buffers cost page faults
that would halve the throughput).  The bulk calls of a distribution step
(`read_blocks`, `write_blocks`) seal and open in place with
``encrypt_into``/``decrypt_into``: a run's ciphertext is sealed straight
into one buffer (each block's tag lands where the next block goes and is
moved to the entries first) and written with one ``pwrite``; read, each
block's ciphertext is read into a slot with room for its tag and opened
there.  `read_stored_blocks` / `write_stored_block` move blocks as stored
(entry and ciphertext, nothing opened) for a replica's undo log.  AES-GCM holds the GIL, so threads add no
crypto throughput; they do overlap the IO.
`rekey`'s speed is in `nicsplit.storage.rekey`.

Nonce budget: random 96-bit nonces keep the chance of a repeated nonce under
one subkey at q**2 / 2**97 after q block writes: 2**-33 at q = 2**32 (NIST's
limit), 2**-25 at 2**36.  A subkey is per (keyring key, image), so a replica
absorbing 10,000 block writes/s reaches 2**32 in ~5 days and 2**36 in ~80;
rotating the keyring and running `rekey` starts a new subkey.

Rules
-----
1. Data before entry: a write puts the ciphertext of its blocks, then their
   entries; `zero` clears the entries, then punches the data.  A crash
   between the two (or without `fsync`, the page cache writing back either
   one first) leaves a block whose data and entry disagree: reading it
   raises `SealedError` ("torn by a crash") until it is written or zeroed
   again.  Images that are rebuilt by re-applying writes (base images,
   replica steps) repair such a block by re-applying; plain images would
   instead hold a mix of old and new bytes there.  `rekey` has no caller to
   re-apply anything, so it protects itself (rule 6).
2. Every change (write, zero, resize, rekey) holds the image's lock, so the
   data and entry of a block always change together as seen by the next
   change; a read of a partial block and its rewrite happen under it too.
   Reads take no lock: a read that saw a half-changed block (authentication
   fails, or an unknown key id) is redone under the lock, where only a real
   fault fails.
3. New blocks are sealed under the keyring's active key (the keyring is
   re-read at open and at most once per second, so a rotation applies to
   later writes).  A sealed image stays sealed: with no active key, it
   seals under the newest key the keyring holds.
4. Key rotation: `atrest.rotate`, then `rekey` every image (it re-seals each
   block not under the active key and fsyncs), then `key_usage` shows the
   old key unused and `atrest.retire` may drop it.  `key_usage` also counts
   the keys of the old entries held in a valid rekey log (a block counts
   under its live key and, if another, its logged one): they may come back
   (rule 6), so their key must stay in the keyring until the log is gone.
5. Wrong use raises where it happens: ``ValueError`` for a range outside
   the image, ``io.UnsupportedOperation`` for a change to a read-only image
   or ``fileno`` of a sealed one, `SealedError` (one line naming the file and
   block) for anything the keyring or the bytes on disk do not allow.
6. Rekey is crash-safe.  It goes piece by piece (up to `PIECE_BLOCKS`
   blocks, 16 MiB: the log's write and the fsyncs per piece stay small next
   to re-sealing it): (a) under the lock, `RUN_BLOCKS` at a time, it reads
   the old entry and ciphertext of each block to re-seal, and decrypts it
   (a damaged block raises here, before anything changed); (b) writes the
   rekey log and fsyncs it (and the directory when it created the file),
   sealing the piece ahead meanwhile; (c) under the lock run by run, writes
   the new ciphertext, then entry, of each block whose entry is still the
   logged one (a block written or zeroed since is left alone: it is no
   longer what the log holds, and is under the active key or empty); (d)
   fsyncs data file and sidecar; (e) voids the log: zeroes its header in
   place and fsyncs it (a truncate would free what the next piece must
   allocate again).  A helper thread runs (d) and (e) while the next piece
   does (a), which only reads; the file is unlinked at the end (empty or
   void, a log is no log, so a lost unlink loses nothing).
   After a crash, a block of the logged piece is its old pair, its new pair
   or a later write's pair - each authenticates and holds the right
   plaintext - or torn, which fails authentication.  So a block that fails
   authentication and whose logged pair authenticates (under the old key,
   still in the keyring by rule 4) is read from the log: any open image
   does so when reading it (re-reading the log when the file changed), a
   writable open lays such pairs back over the torn blocks, fsyncs both
   files and deletes the log (with a warning saying what it did), and so
   does `rekey` first if a log was left by a rekey of this image that
   raised.  Only torn blocks are laid back, never the whole piece: a write
   to the piece after its log was written (the lock is per run, not per
   piece) must survive.  A log cut short, failing its CRC or of another
   uid was being written when the crash came, before its fsync, so its
   piece is untouched: it is deleted (with a warning).  Tests cut a rekey
   with `failpoint` at "rekey-log-synced", "rekey-data-written",
   "rekey-entries-written" (these two under the image lock) and
   "rekey-synced" (in the helper thread).

Example::

    with open_image(replicas / "disk.img", 1 << 30, kr, writable=True, create=True) as img:
        assert img.sealed  # the keyring has an active key
        img.pwrite(b"x" * 4096, 8192)
        img.rekey()  # after atrest.rotate: re-seal under the new key (rule 4)
"""

from __future__ import annotations

import collections
import io
import os
import struct
import sys
import threading
from array import array
from pathlib import Path
from typing import Callable, Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from nicsplit.core.fsutil import data_extents, fsync_dir, pwrite_all, pwrite_pieces, punch_hole
from nicsplit.storage.atrest import NONCE_SIZE, TAG_SIZE, Keyring
from nicsplit.storage.base import Image
from nicsplit.storage.rekey import RekeyLog, Rekeying, rekey_path
from nicsplit.storage.sealing import (
    AAD, BS, ENTRY, ENTRY_SIZE, HEADER, HEADER_SIZE, MAGIC, RUN_BLOCKS, U32, VERSION, ZERO_RUN, ZEROS, Ciphers,
    SealedError, nblocks, pread_into, scratch, tags_path,
)
from nicsplit.core.crc32 import crc32

__all__ = ["SealedImage", "SealedError"]

_IMAGE_INFO = b"nicsplit image block"
# `read_blocks` reads the entries of two blocks this close in one pread (the
# gap's entries ride along): 128 entries = one 4 KiB page of the sidecar.
_ENTRY_GAP = 128
_SLOT = BS + TAG_SIZE  # a block's ciphertext and its tag, as AES-GCM opens them in one buffer
ENTRY_KID = struct.Struct(">I")  # the key id that opens a sidecar entry


class _Retry(Exception):
    """A lock-free read saw a block mid-change; redo it under the lock (rule 2)."""


def _write_header(tfd: int, uid: bytes, size: int) -> None:
    head = HEADER.pack(MAGIC, VERSION, uid, size, BS)
    pwrite_all(tfd, (head + U32.pack(crc32(head))).ljust(HEADER_SIZE, b"\0"), 0)


class SealedImage(Rekeying, Image):
    """Ciphertext in the data file, key id, nonce and tag per block in the sidecar."""

    sealed = True

    def __init__(self, path: Path, fd: int, tfd: int, size: int, keyring: Keyring | None, *,
                 writable: bool) -> None:
        self.path = path
        self.size = size
        self.writable = writable
        self._fd = fd
        self._tfd = tfd
        self._lock = threading.Lock()
        # Held by `rekey` from writing a piece's log until the helper thread
        # has voided it, and by `key_usage`, which must never see a piece
        # re-sealed but not yet durable without its log.
        self._piece_lock = threading.Lock()
        self._rekey_lock = threading.Lock()  # one rekey at a time: they share the log file
        self._rpath = rekey_path(path)
        self._log_lock = threading.Lock()
        self._log_cache: tuple[tuple[int, int, int, int], RekeyLog] | None = None
        self.uid, self._stored = self._read_header()
        if keyring is None:
            raise SealedError(f"{path} is sealed (at-rest encrypted) but no at-rest keyring was given")
        if not keyring.ids():
            raise SealedError(f"{path} is sealed (at-rest encrypted) but the keyring {keyring.path} holds no keys")
        self.keyring = keyring
        self._ciphers = Ciphers(keyring, _IMAGE_INFO + self.uid)
        if writable:
            if os.fstat(fd).st_size != self._stored:
                os.ftruncate(fd, self._stored)  # a resize cut by a crash: the header says the size
            self._recover()
            if size != self._stored:
                self.resize(size)

    @classmethod
    def create(cls, path: Path, size: int, keyring: Keyring) -> "SealedImage":
        """A new, empty sealed image (``path`` must not exist; ``keyring`` has an active key)."""
        # The sidecar goes first (and durably): a crash before the data file
        # exists leaves nothing that opens as a plain image.
        uid = os.urandom(16)
        rekey_path(path).unlink(missing_ok=True)  # another image's (its uid would not match anyway)
        tfd = os.open(tags_path(path), os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _write_header(tfd, uid, size)
            os.ftruncate(tfd, HEADER_SIZE + nblocks(size) * ENTRY_SIZE)
            os.fsync(tfd)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, size)
                fsync_dir(path.parent)
                return cls(path, fd, tfd, size, keyring, writable=True)
            except BaseException:
                os.close(fd)
                raise
        except BaseException:
            os.close(tfd)
            raise

    def _read_header(self) -> tuple[bytes, int]:
        raw = os.pread(self._tfd, HEADER.size + U32.size, 0)
        where = f"{self.path} (sidecar {tags_path(self.path).name})"
        if len(raw) < HEADER.size + U32.size:
            raise SealedError(f"{where}: the sidecar header is truncated ({len(raw)} bytes)")
        magic, version, uid, size, bs = HEADER.unpack_from(raw)
        if magic != MAGIC:
            raise SealedError(f"{where}: the sidecar header has magic {magic!r}, not {MAGIC!r}")
        if U32.unpack_from(raw, HEADER.size)[0] != crc32(raw[:HEADER.size]):
            raise SealedError(f"{where}: the sidecar header fails its CRC")
        if version != VERSION:
            raise SealedError(f"{where}: sealed image version {version} not supported")
        if bs != BS:
            raise SealedError(f"{where}: block size {bs} not supported (only {BS})")
        return uid, size

    # -- reading -----------------------------------------------------------------------------

    def pread(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        if length == 0:
            return b""
        try:
            return self._read(offset, length, strict=False)
        except _Retry:
            with self._lock:
                return self._read(offset, length, strict=True)

    def _read(self, offset: int, length: int, strict: bool) -> bytes:
        end = offset + length
        parts = []
        for c0 in range(offset // BS, nblocks(end), RUN_BLOCKS):
            c1 = min(c0 + RUN_BLOCKS, nblocks(end))
            pt = self._decrypt_run(c0, c1, strict)
            base = c0 * BS
            parts.append(bytes(pt[max(offset, base) - base : min(end, c1 * BS) - base]))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _decrypt_run(self, c0: int, c1: int, strict: bool) -> memoryview:
        """The plaintext of blocks [c0, c1) (whole blocks, zeros past the stored
        size) in this thread's "pt" scratch.  A block that fails raises
        `_Retry` unless ``strict``, then `SealedError`."""
        stored = self._stored
        pt = scratch.get("pt", (c1 - c0) * BS)
        hi = min(c1, nblocks(stored))
        tags = b""
        if hi > c0:
            m = hi - c0
            tags = os.pread(self._tfd, m * ENTRY_SIZE, HEADER_SIZE + c0 * ENTRY_SIZE)
            if len(tags) < m * ENTRY_SIZE:  # a sidecar cut short: missing entries are unwritten
                tags += bytes(m * ENTRY_SIZE - len(tags))
            if tags.count(0) == len(tags):  # nothing written here: no data to read
                hi = c0
        if hi > c0:
            dlen = min(hi * BS, stored) - c0 * BS  # the last stored block may be short
            ct = scratch.get("ct", dlen)
            pread_into(self._fd, ct, c0 * BS)
            block, bview = scratch.block, scratch.block_view
            aad, uid, zeros = AAD.pack, self.uid, ZEROS
            last_kid, decrypt = 0, None
            o, blk = 0, c0
            for kid, nonce, tag in ENTRY.iter_unpack(tags):
                e = o + BS
                if not kid:
                    pt[o:e] = zeros
                else:
                    if kid != last_kid:
                        aes = self._ciphers.get(kid)
                        if aes is None:
                            if not strict:
                                raise _Retry
                            raise SealedError(f"block {blk} of {self.path} is sealed under "
                                              f"{self._ciphers.describe_missing(kid)}")
                        last_kid, decrypt = kid, aes.decrypt
                    try:
                        if e <= dlen:  # GCM wants ciphertext || tag in one buffer
                            bview[:BS] = ct[o:e]
                            bview[BS:] = tag
                            pt[o:e] = decrypt(nonce, block, aad(uid, blk))
                        else:  # the short last block
                            pt[o:dlen] = decrypt(nonce, bytes(ct[o:dlen]) + tag, aad(uid, blk))
                            pt[dlen:e] = zeros[dlen - o :]
                    except InvalidTag:
                        if not strict:
                            raise _Retry from None
                        n = min(e, dlen) - o
                        old = self._from_log(blk, n)  # torn by a crash in rekey (rule 6)
                        if old is None:
                            raise SealedError(f"block {blk} of {self.path} fails authentication: altered on "
                                              f"disk, torn by a crash, or sealed under another key") from None
                        pt[o : o + n] = old
                        pt[o + n : e] = zeros[n:]
                o = e
                blk += 1
        if hi < c1:
            lo = max(hi - c0, 0) * BS
            pt[lo:] = ZERO_RUN[: len(pt) - lo]
        return pt

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        self._check(offset, length)
        end = offset + length
        out: list[tuple[int, int]] = []
        for blk, n in self._runs(offset // BS, min(nblocks(end), nblocks(self._stored))):
            lo, hi = max(blk * BS, offset), min((blk + n) * BS, end, self._stored)
            if out and out[-1][0] + out[-1][1] == lo:
                out[-1] = (out[-1][0], hi - out[-1][0])
            else:
                out.append((lo, hi - lo))
        return out

    def _kids(self, b0: int, b1: int) -> array:
        """Key ids of blocks [b0, b1) as an array (one pread)."""
        raw = os.pread(self._tfd, (b1 - b0) * ENTRY_SIZE, HEADER_SIZE + b0 * ENTRY_SIZE)
        raw += bytes((b1 - b0) * ENTRY_SIZE - len(raw))
        a = array("I", raw)
        if sys.byteorder == "little":
            a.byteswap()
        return a[:: ENTRY_SIZE // 4]

    def _runs(self, b0: int, b1: int) -> Iterator[tuple[int, int]]:
        """(first block, count) of each run of blocks in [b0, b1) whose key
        id is non-zero; holes of the sidecar are skipped without reading."""
        if b1 <= b0:
            return
        step = 32768  # entries per read: 1 MiB
        for off, ln in data_extents(self._tfd, HEADER_SIZE + b0 * ENTRY_SIZE, (b1 - b0) * ENTRY_SIZE):
            e0 = max(b0, (off - HEADER_SIZE) // ENTRY_SIZE)
            e1 = min(b1, -(-(off + ln - HEADER_SIZE) // ENTRY_SIZE))
            start = -1
            for c0 in range(e0, e1, step):
                kids = self._kids(c0, min(c0 + step, e1))
                for i, kid in enumerate(kids):
                    if kid:
                        if start < 0:
                            start = c0 + i
                    elif start >= 0:
                        yield start, c0 + i - start
                        start = -1
            if start >= 0:
                yield start, e1 - start

    def key_usage(self) -> dict[int, int]:
        """Key id -> blocks sealed under it, live or in a valid rekey log (rule 4)."""
        counts: collections.Counter[int] = collections.Counter()
        with self._piece_lock:  # the log first: a piece is re-sealed only while its log is valid
            logged = self._logged()
            nb = nblocks(self._stored)
            for off, ln in data_extents(self._tfd, HEADER_SIZE, nb * ENTRY_SIZE):
                e0 = max(0, (off - HEADER_SIZE) // ENTRY_SIZE)
                e1 = min(nb, -(-(off + ln - HEADER_SIZE) // ENTRY_SIZE))
                for c0 in range(e0, e1, 32768):
                    counts.update(self._kids(c0, min(c0 + 32768, e1)))
            if logged is not None:
                live = self._kids(logged.first, logged.first + logged.count)
                for blk, kid in logged.kids():
                    if live[blk - logged.first] != kid:
                        counts[kid] += 1
        counts.pop(0, None)
        return dict(sorted(counts.items()))

    # -- writing -----------------------------------------------------------------------------

    def _sealing(self) -> tuple[int, AESGCM]:
        got = self._ciphers.active(fallback=True)
        if got is None:
            raise SealedError(f"{self.path} is sealed but the keyring {self.keyring.path} holds no key to seal "
                              f"new writes under")
        return got

    def _seal_run(self, c0: int, plain: memoryview, kid: int, aes: AESGCM) -> None:
        """Seal ``plain`` (whole blocks from block ``c0``; the last may be the
        short last block) and write it: data, then entries (rule 1)."""
        total = len(plain)
        n = nblocks(total)
        nonces = os.urandom(NONCE_SIZE * n)
        ct = scratch.get("ct", total)
        tags = bytearray(n * ENTRY_SIZE)
        pack_entry, aad, uid = ENTRY.pack_into, AAD.pack, self.uid
        o = 0
        for i in range(n):
            nonce = nonces[i * NONCE_SIZE : (i + 1) * NONCE_SIZE]
            sealed = aes.encrypt(nonce, plain[o : o + BS], aad(uid, c0 + i))
            m = len(sealed) - TAG_SIZE
            ct[o : o + m] = memoryview(sealed)[:m]
            pack_entry(tags, i * ENTRY_SIZE, kid, nonce, sealed[m:])
            o += BS
        pwrite_pieces(self._fd, ct, c0 * BS)
        pwrite_all(self._tfd, tags, HEADER_SIZE + c0 * ENTRY_SIZE)

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        self._check_writable("write")
        src = memoryview(data).cast("B")
        self._check(offset, len(src))
        if not src:
            return
        with self._lock:
            self._write_locked(src, offset)

    def _write_locked(self, src: memoryview, offset: int) -> None:
        kid, aes = self._sealing()
        end = offset + len(src)
        stored = self._stored
        for c0 in range(offset // BS, nblocks(end), RUN_BLOCKS):
            c1 = min(c0 + RUN_BLOCKS, nblocks(end))
            base, run_end = c0 * BS, min(c1 * BS, stored)
            lo, hi = max(offset, base), min(end, run_end)
            if lo == base and hi == run_end:  # whole blocks: seal straight from the caller's bytes
                self._seal_run(c0, src[lo - offset : hi - offset], kid, aes)
                continue
            stage = scratch.get("stage", run_end - base)
            if lo > base:  # read-modify-write of the first block
                first = min(BS, run_end - base)
                stage[:first] = self._decrypt_run(c0, c0 + 1, strict=True)[:first]
            if hi < run_end and (c1 - 1 > c0 or lo == base):  # ... and of the last one
                at = (c1 - 1) * BS - base
                stage[at:] = self._decrypt_run(c1 - 1, c1, strict=True)[: run_end - base - at]
            stage[lo - base : hi - base] = src[lo - offset : hi - offset]
            self._seal_run(c0, stage, kid, aes)

    # -- whole blocks in bulk (a distribution step) ---------------------------------------------

    def _written_entries(self, blocks: list[int], nb: int) -> list[tuple[int, int, bytes]]:
        """(index in ``blocks``, block, its tag entry) of each written block
        of ``blocks`` (ascending, distinct) below ``nb``: the entries of
        blocks within a page of each other come in one sidecar read; key id
        0 (or a sidecar cut short) is unwritten."""
        written: list[tuple[int, int, bytes]] = []
        i = 0
        while i < len(blocks):
            b0 = blocks[i]
            if b0 >= nb:
                break  # past the stored size: zeros
            j = i + 1
            while j < len(blocks) and blocks[j] < nb and blocks[j] - blocks[j - 1] <= _ENTRY_GAP and \
                    blocks[j] - b0 < RUN_BLOCKS:
                j += 1
            raw = os.pread(self._tfd, (blocks[j - 1] + 1 - b0) * ENTRY_SIZE, HEADER_SIZE + b0 * ENTRY_SIZE)
            for k in range(i, j):
                e = (blocks[k] - b0) * ENTRY_SIZE
                ent = raw[e : e + ENTRY_SIZE]
                if len(ent) == ENTRY_SIZE and ent[:4] != b"\0\0\0\0":
                    written.append((k, blocks[k], ent))
            i = j
        return written

    def read_blocks(self, blocks: list[int]) -> list[bytes | memoryview | None]:
        """`Image.read_blocks`: the entries of nearby blocks in one sidecar
        read, unwritten blocks (key id 0) as None without touching the data
        file, the ciphertext of each run of adjacent written blocks in one
        read, one AEAD call per written block.  A block that does not open
        (torn, mid-rekey, unknown key) is read the careful way (`pread`)."""
        nb = nblocks(self._stored)
        out: list[bytes | memoryview | None] = [None] * len(blocks)
        written = self._written_entries(blocks, nb)
        if not written:
            return out
        # The ciphertext of each run of adjacent written blocks is read with one
        # preadv into slots of BS + TAG_SIZE bytes, the tag from the sidecar
        # entry goes after it, and the block is opened in place (decrypt_into):
        # one buffer per call, no copy per block.
        buf = memoryview(bytearray(len(written) * _SLOT))
        aad, uid, stored = AAD.pack, self.uid, self._stored
        i = w = 0
        while i < len(written):
            j = i + 1
            while j < len(written) and written[j][1] == written[j - 1][1] + 1 and j - i < RUN_BLOCKS:
                j += 1
            c0 = written[i][1]
            if (written[j - 1][1] + 1) * BS > stored:  # the short last block: the careful way
                j -= 1
                if j == i:
                    k, blk, _ = written[i]
                    out[k] = self.pread(blk * BS, stored - blk * BS)
                    i += 1
                    continue
            n = j - i
            slots = [buf[(w + t) * _SLOT : (w + t) * _SLOT + BS] for t in range(n)]
            got = os.preadv(self._fd, slots, c0 * BS)
            for t in range(n):
                k, blk, ent = written[i + t]
                s0 = (w + t) * _SLOT
                kid = ENTRY_KID.unpack_from(ent)[0]
                aes = self._ciphers.get(kid)
                try:
                    if aes is None or got < (t + 1) * BS:
                        raise InvalidTag
                    buf[s0 + BS : s0 + _SLOT] = ent[16:32]
                    aes.decrypt_into(ent[4:16], buf[s0 : s0 + _SLOT], aad(uid, blk), buf[s0 : s0 + BS])
                    out[k] = buf[s0 : s0 + BS]
                except InvalidTag:
                    out[k] = self.pread(blk * BS, BS)  # retried under the lock; raises what it cannot read
            w += n
            i = j
        return out

    def write_blocks(self, items: list[tuple[int, bytes | memoryview | None]],
                     after: Callable[[], None] | None = None) -> None:
        """`Image.write_blocks`: each run of adjacent blocks is sealed block
        by block (nonces from one ``os.urandom`` per call) and written with
        one ``pwritev`` of the ciphertexts, then one ``pwrite`` of their
        entries (rule 1); runs of None are zeroed (`zero`)."""
        self._check_writable("write")
        stored = self._stored
        for blk, c in items:
            if blk * BS >= stored or (c is not None and len(c) != min(BS, stored - blk * BS)):
                raise ValueError(f"{self.path}: block {blk} given {len(c) if c is not None else 'zeros'} bytes, "
                                 f"not the block's {max(0, min(BS, stored - blk * BS))}")
        nonces = os.urandom(NONCE_SIZE * sum(c is not None for _, c in items))
        kid, aes = self._sealing()
        aad, uid, encrypt_into = AAD.pack, self.uid, aes.encrypt_into
        kid_bytes = ENTRY_KID.pack(kid)
        i = q = 0
        while i < len(items):
            j = i + 1
            zero = items[i][1] is None
            while j < len(items) and items[j][0] == items[j - 1][0] + 1 and (items[j][1] is None) == zero and \
                    j - i < RUN_BLOCKS:
                j += 1
            c0 = items[i][0]
            if zero:
                self.zero(c0 * BS, min(stored, items[j - 1][0] * BS + BS) - c0 * BS)
            elif j == i + 1:  # one block (random writes): no buffer to fill, no entry buffer
                nonce = nonces[q : q + NONCE_SIZE]
                q += NONCE_SIZE
                with self._lock:
                    sealed = aes.encrypt(nonce, items[i][1], aad(uid, c0))
                    m = len(sealed) - TAG_SIZE
                    pwrite_all(self._fd, memoryview(sealed)[:m], c0 * BS)
                    pwrite_all(self._tfd, ENTRY.pack(kid, nonce, sealed[m:]), HEADER_SIZE + c0 * ENTRY_SIZE)
            else:
                # Block k is sealed into ct[o : o + len + TAG_SIZE]: its tag lands
                # where block k + 1 goes and is copied into the entries before
                # block k + 1 overwrites it; the run's ciphertext is then contiguous.
                ct = scratch.get("seal", (j - i) * BS + TAG_SIZE)
                tags = bytearray((j - i) * ENTRY_SIZE)
                o = e = 0
                with self._lock:
                    for k in range(i, j):
                        blk, plain = items[k]
                        nonce = nonces[q : q + NONCE_SIZE]
                        q += NONCE_SIZE
                        m = len(plain)
                        encrypt_into(nonce, plain, aad(uid, blk), ct[o : o + m + TAG_SIZE])
                        tags[e : e + 4] = kid_bytes
                        tags[e + 4 : e + 16] = nonce
                        tags[e + 16 : e + 32] = ct[o + m : o + m + TAG_SIZE]
                        o += m
                        e += ENTRY_SIZE
                    pwrite_pieces(self._fd, ct[:o], c0 * BS)
                    pwrite_all(self._tfd, tags, HEADER_SIZE + c0 * ENTRY_SIZE)
            if after is not None:
                after()
            i = j

    # -- blocks as stored (a replica's undo entries of kind UNDO_IMAGE) -----------------------

    def read_stored_blocks(self, blocks: list[int]) -> list[tuple[bytes, memoryview] | None]:
        """(tag entry, ciphertext) of each of ``blocks`` (ascending,
        distinct) as stored, nothing opened: None for an unwritten block (key
        id 0).  Entries of nearby blocks come in one sidecar read, the
        ciphertext of each run of adjacent written blocks in one read.  What
        is returned authenticates only at this image's uid and block number
        (`write_stored_block` checks it)."""
        nb, stored = nblocks(self._stored), self._stored
        out: list[tuple[bytes, memoryview] | None] = [None] * len(blocks)
        written = self._written_entries(blocks, nb)
        i = 0
        while i < len(written):
            j = i + 1
            while j < len(written) and written[j][1] == written[j - 1][1] + 1 and j - i < RUN_BLOCKS:
                j += 1
            lo = written[i][1] * BS
            hi = min(stored, (written[j - 1][1] + 1) * BS)
            ct = memoryview(os.pread(self._fd, hi - lo, lo))
            if len(ct) < hi - lo:  # a data file cut short: the careful read says what is wrong
                ct = memoryview(bytes(ct) + bytes(hi - lo - len(ct)))
            for k, blk, ent in written[i:j]:
                o = blk * BS - lo
                out[k] = (ent, ct[o : o + min(BS, stored - blk * BS)])
            i = j
        return out

    def write_stored_block(self, blk: int, entry: bytes | memoryview, ct: bytes | memoryview) -> None:
        """Put back block ``blk`` as `read_stored_blocks` gave it (an entry of
        key id 0: zeroed), after checking that it opens here: a pair from
        another image, block or key raises `SealedError` and changes nothing.
        Data before entry (rule 1)."""
        self._check_writable("write")
        if len(entry) != ENTRY_SIZE or len(ct) > BS:
            raise SealedError(f"block {blk} of {self.path}: a stored block of {len(ct)} bytes does not fit here")
        n = min(BS, self._stored - blk * BS)
        kid, nonce, tag = ENTRY.unpack(bytes(entry))
        if not kid:
            self.zero(blk * BS, len(ct))  # ValueError past the end, like any write there
            return
        aes = self._ciphers.get(kid)
        if aes is None:
            raise SealedError(f"block {blk} of {self.path} was sealed under {self._ciphers.describe_missing(kid)}")
        try:
            plain = aes.decrypt(nonce, bytes(ct) + tag, AAD.pack(self.uid, blk))
        except InvalidTag:
            raise SealedError(f"block {blk} of {self.path}: the stored block to put back does not authenticate "
                              f"here (altered, or from another image or block)") from None
        if len(ct) != n:  # the image's short last block, resized since: its bytes, sealed at the new length
            self.pwrite(plain, blk * BS)
            return
        with self._lock:
            pwrite_all(self._fd, ct, blk * BS)
            pwrite_all(self._tfd, entry, HEADER_SIZE + blk * ENTRY_SIZE)

    def reseal_stored_block(self, blk: int, entry: bytes | memoryview, ct: bytes | memoryview
                            ) -> tuple[bytes, bytes]:
        """A stored block (`read_stored_blocks`) sealed again under the key new
        writes use, for the same place: (entry, ciphertext); the image itself
        is not changed (a replica's undo log re-keys its kept blocks with it)."""
        kid, nonce, tag = ENTRY.unpack(bytes(entry))
        aes = self._ciphers.get(kid)
        if aes is None:
            raise SealedError(f"block {blk} of {self.path} was sealed under {self._ciphers.describe_missing(kid)}")
        aad = AAD.pack(self.uid, blk)
        try:
            plain = aes.decrypt(nonce, bytes(ct) + tag, aad)
        except InvalidTag:
            raise SealedError(f"block {blk} of {self.path}: a kept stored block fails authentication") from None
        kid2, aes2 = self._sealing()
        nonce2 = os.urandom(NONCE_SIZE)
        sealed = aes2.encrypt(nonce2, plain, aad)
        return ENTRY.pack(kid2, nonce2, sealed[len(plain):]), sealed[: len(plain)]

    def zero(self, offset: int, length: int) -> None:
        self._check_writable("zero")
        self._check(offset, length)
        if not length:
            return
        end = offset + length
        with self._lock:
            stored = self._stored
            f0 = -(-offset // BS)
            f1 = nblocks(stored) if end >= stored else end // BS  # the short last block counts as whole
            if f1 <= f0:  # no whole block: one or two blocks partly
                mid = min(end, (offset // BS + 1) * BS)
                self._zero_part(offset, mid)
                if mid < end:
                    self._zero_part(mid, end)
                return
            if offset < f0 * BS:
                self._zero_part(offset, f0 * BS)
            if end > f1 * BS and f1 * BS < stored:
                self._zero_part(f1 * BS, end)
            # Entries first: a block whose data is punched under a live entry would fail (rule 1).
            punch_hole(self._tfd, HEADER_SIZE + f0 * ENTRY_SIZE, (f1 - f0) * ENTRY_SIZE)
            punch_hole(self._fd, f0 * BS, min(f1 * BS, stored) - f0 * BS)

    def _zero_part(self, lo: int, hi: int) -> None:
        """Zero [lo, hi), inside one block: nothing if the block is unwritten."""
        blk = lo // BS
        if not self._kids(blk, blk + 1)[0]:
            return
        n = min(BS, self._stored - blk * BS)
        block = bytearray(self._decrypt_run(blk, blk + 1, strict=True)[:n])
        block[lo - blk * BS : hi - blk * BS] = bytes(hi - lo)
        if block.count(0) == n:  # nothing left: clear it like a whole-block zero
            punch_hole(self._tfd, HEADER_SIZE + blk * ENTRY_SIZE, ENTRY_SIZE)
            punch_hole(self._fd, blk * BS, n)
        else:
            kid, aes = self._sealing()
            self._seal_run(blk, memoryview(block), kid, aes)

    def resize(self, new_size: int) -> None:
        """Grow or shrink.  The block that is the short last block before or
        after is re-sealed at its new length; a crash in between leaves that
        one block failing authentication (rule 1)."""
        self._check_writable("resize")
        if new_size < 0:
            raise ValueError(f"{self.path}: negative size {new_size}")
        with self._lock:
            old = self._stored
            if new_size == old:
                self.size = new_size
                return
            # The block whose length changes: the old short last block when
            # growing, the new short last block when shrinking.
            edge = (old // BS if old % BS else None) if new_size > old else \
                (new_size // BS if new_size % BS else None)
            keep = None
            if edge is not None and self._kids(edge, edge + 1)[0]:
                keep = bytes(self._decrypt_run(edge, edge + 1, strict=True))
            if new_size < old:
                os.ftruncate(self._tfd, HEADER_SIZE + nblocks(new_size) * ENTRY_SIZE)
                os.ftruncate(self._fd, new_size)
            else:
                os.ftruncate(self._fd, new_size)
                os.ftruncate(self._tfd, HEADER_SIZE + nblocks(new_size) * ENTRY_SIZE)
            _write_header(self._tfd, self.uid, new_size)
            self._stored = self.size = new_size
            if keep is not None and edge is not None:
                n = min(BS, new_size - edge * BS)
                kid, aes = self._sealing()
                self._seal_run(edge, memoryview(keep)[:n], kid, aes)


    def fsync(self) -> None:
        os.fsync(self._fd)
        os.fsync(self._tfd)

    def fileno(self) -> int:
        raise io.UnsupportedOperation(f"{self.path} is sealed: its data file holds ciphertext; "
                                      f"read it through the image")

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                os.close(self._tfd)
                self._fd = self._tfd = -1

