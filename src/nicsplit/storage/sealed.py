"""Disk images at rest: plain or sealed (AES-256-GCM per 4 KiB block), behind
one interface, and a small sealer for other blobs (the replica's undo log).

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

    rekey log (big-endian; one piece of at most `PIECE_BLOCKS` blocks)
      0  4s  magic b"NSRK"
      4  H   version (1)
      6  16s image uid (a log left by another image of that name is ignored)
     22  Q   size of the image in bytes when the log was written
     30  Q   first block of the piece
     38  I   blocks in the piece (n)
     42  I   CRC32 of bytes 0..41 and of everything after byte 45
     46      n entries of 32 bytes: the sidecar entry, as it was on disk, of
             each block the piece re-seals; all zeros for a block it leaves alone
             (unwritten, or already under the active key)
     46+32n  4096 bytes per non-zero entry, in block order: that block's
             ciphertext as it was on disk (the short last block zero-padded)
    A valid log is exactly that long, with the right CRC and uid.  An empty
    file, or one whose header is zeros (void: its piece is durable), is no
    log; anything else is a log torn by a crash while being written.

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
that would halve the throughput).  AES-GCM holds the GIL, so threads add no
crypto throughput; they do overlap the IO.
`rekey` writes each piece twice (log, then
in place) and fsyncs it; with the log's fsync overlapping the sealing and
the piece's fsync the next piece's reading, it runs at ~75-80% of a rekey
without the log (~290 against ~370 MiB/s on a 256 MiB image).

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

    kr = atrest.Keyring.load(atrest.keyring_path(data))
    with open_image(replicas / "disk.img", 1 << 30, kr, writable=True, create=True) as img:
        img.pwrite(b"x" * 4096, 8192)
        assert img.pread(8192, 4096) == b"x" * 4096 and img.extents(0, 1 << 30) == [(8192, 4096)]
        img.fsync()
    undo = BlobSealer(kr, b"replica undo")
    blob = undo.seal(old, aad=undo_offset.to_bytes(8, "big"))     # u32 key id, nonce, ciphertext, tag
    assert undo.open(blob, aad=undo_offset.to_bytes(8, "big")) == old
"""

from __future__ import annotations

import collections
import io
import logging
import os
import struct
import sys
import threading
import time
import zlib
from array import array
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from pathlib import Path
from typing import Callable, Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from nicsplit.storage.atrest import KEY_SIZE, NONCE_SIZE, TAG_SIZE, AtRestError, Keyring
from nicsplit.core.fsutil import data_extents, fsync_dir, pwrite_all, punch_hole

__all__ = [
    "BLOCK_SIZE", "HEADER_SIZE", "ENTRY_SIZE", "TAGS_SUFFIX", "REKEY_SUFFIX", "RUN_BLOCKS", "PIECE_BLOCKS",
    "SealedError", "Image", "PlainImage", "SealedImage", "open_image", "tags_path", "rekey_path", "BlobSealer",
]

log = logging.getLogger("nicsplit.storage.sealed")

BLOCK_SIZE = 4096  # the sealing unit: the page size, and what NBD clients write
BS = BLOCK_SIZE
TAGS_SUFFIX = ".tags"
MAGIC = b"NSSI"
VERSION = 1
HEADER_SIZE = 4096  # the header is alone in the sidecar's first page
# Entries of a whole run go in one syscall; 512 blocks = 2 MiB keeps an
# unaligned 1 MiB request in one run and each thread's scratch at 4-8 MiB.
RUN_BLOCKS = 512
# Blocks per rekey log (rule 6): 16 MiB keeps its write and four fsyncs a
# small part of re-sealing the piece, and its buffers at 2 x 16 MiB.
PIECE_BLOCKS = 4096
REKEY_SUFFIX = ".rekey"
_REFRESH_S = 1.0  # the keyring is re-read (stat) at most this often

_HEADER = struct.Struct(">4sH16sQI")
assert _HEADER.size == 34
_U32 = struct.Struct(">I")  # the header's CRC; a blob's key id
_ENTRY = struct.Struct(">I12s16s")  # key id, nonce, tag
ENTRY_SIZE = _ENTRY.size
assert ENTRY_SIZE == 32 and NONCE_SIZE == 12 and TAG_SIZE == 16
_AAD = struct.Struct(">16sQ")  # image uid, block number
_ZEROS = bytes(BS)
_ZERO_RUN = memoryview(bytes(RUN_BLOCKS * BS))  # reused: a fresh 2 MiB of zeros costs page faults
assert array("I").itemsize == 4  # key ids are read as an array("I") (`SealedImage._kids`)
_IMAGE_INFO = b"nicsplit image block"
_BLOB_INFO = b"nicsplit blob "
_LOG_MAGIC = b"NSRK"
_LOG_VERSION = 1
_LOG_HEAD = struct.Struct(">4sH16sQQI")  # magic, version, uid, image size, first block, blocks
_LOG_HEADER_SIZE = _LOG_HEAD.size + _U32.size  # then the CRC
assert _LOG_HEADER_SIZE == 46
_VOID = bytes(_LOG_HEADER_SIZE)  # a log whose header is zeros is no log (rule 6 (e))

# Tests set this to cut a rekey where they like (rule 6): it is called with
# "rekey-log-synced", "rekey-data-written", "rekey-entries-written" or
# "rekey-synced", and whatever it raises ends the rekey there.
failpoint: Callable[[str], None] | None = None


def _fail(where: str) -> None:
    fp = failpoint
    if fp is not None:
        fp(where)


class SealedError(Exception):
    """A sealed image or blob that cannot be read or written as asked: one clear line."""


class _Retry(Exception):
    """A lock-free read saw a block mid-change; redo it under the lock (rule 2)."""


def tags_path(path: str | Path) -> Path:
    """The sidecar of image ``path`` (its existence makes the image sealed)."""
    path = Path(path)
    return path.with_name(path.name + TAGS_SUFFIX)


def rekey_path(path: str | Path) -> Path:
    """The rekey log of image ``path`` (rule 6); whoever deletes or moves an
    image deletes or moves this too."""
    path = Path(path)
    return path.with_name(path.name + REKEY_SUFFIX)


class _RekeyLog:
    """A valid rekey log, decoded: the old pair of each block its piece re-seals."""

    def __init__(self, first: int, count: int, size: int, entries: memoryview, ct: memoryview) -> None:
        self.first, self.count, self.size = first, count, size
        self.entries, self.ct = entries, ct
        self.slots: dict[int, int] = {}  # block -> its ciphertext's slot in ``ct``
        for i in range(count):
            if entries[i * ENTRY_SIZE : i * ENTRY_SIZE + 4] != b"\0\0\0\0":
                self.slots[first + i] = len(self.slots)

    def pair(self, blk: int) -> tuple[memoryview, memoryview] | None:
        """(old entry, old ciphertext zero-padded to BS) of ``blk``, or None if the log has none."""
        j = self.slots.get(blk)
        if j is None:
            return None
        i = blk - self.first
        return self.entries[i * ENTRY_SIZE : (i + 1) * ENTRY_SIZE], self.ct[j * BS : (j + 1) * BS]

    def kids(self) -> Iterator[tuple[int, int]]:
        """(block, old key id) of each block held."""
        for blk in self.slots:
            i = blk - self.first
            yield blk, _U32.unpack_from(self.entries, i * ENTRY_SIZE)[0]


def _log_head(uid: bytes, size: int, first: int, count: int, entries: memoryview, ct: memoryview) -> bytes:
    head = _LOG_HEAD.pack(_LOG_MAGIC, _LOG_VERSION, uid, size, first, count)
    return head + _U32.pack(zlib.crc32(ct, zlib.crc32(entries, zlib.crc32(head))))


def _decode_log(raw: bytes, uid: bytes) -> _RekeyLog | str | None:
    """The log in ``raw``; None if there is none (empty, or voided: its
    header zeroed); else why it is not a valid log of the image ``uid``."""
    view = memoryview(raw)
    if not view or view[:_LOG_HEADER_SIZE] == _VOID:
        return None
    if len(view) < _LOG_HEADER_SIZE:
        return f"cut short ({len(view)} bytes)"
    magic, version, log_uid, size, first, count = _LOG_HEAD.unpack_from(view)
    if magic != _LOG_MAGIC:
        return f"magic {magic!r}, not {_LOG_MAGIC!r}"
    ct_at = _LOG_HEADER_SIZE + count * ENTRY_SIZE
    if len(view) < ct_at:
        return f"cut short ({len(view)} bytes, {count} entries)"
    entries = view[_LOG_HEADER_SIZE:ct_at]
    held = sum(1 for i in range(0, len(entries), ENTRY_SIZE) if entries[i : i + 4] != b"\0\0\0\0")
    if len(view) != ct_at + held * BS:
        return f"{len(view)} bytes, not the {ct_at + held * BS} its {count} entries need"
    crc = zlib.crc32(view[ct_at:], zlib.crc32(entries, zlib.crc32(view[: _LOG_HEAD.size])))
    if _U32.unpack_from(view, _LOG_HEAD.size)[0] != crc:
        return "fails its CRC"
    if version != _LOG_VERSION:
        return f"version {version} not supported"
    if log_uid != uid:
        return "written for another image (another uid)"
    return _RekeyLog(first, count, size, entries, view[ct_at:])


# -- keys ------------------------------------------------------------------------------------


class _Ciphers:
    """The AES-GCM ciphers of one HKDF ``info`` under the keyring's keys,
    derived once per key id (ids are never reused and keys never change)."""

    def __init__(self, keyring: Keyring, info: bytes) -> None:
        self.keyring = keyring
        self._info = info
        self._by_id: dict[int, AESGCM] = {}
        self._refresh()

    def _refresh(self) -> None:
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
                self._refresh()  # perhaps added since we read the keyring
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
            self._refresh()
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


class _Scratch(threading.local):
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


_scratch = _Scratch()


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` from ``offset``; bytes past the end of the file read as zeros."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            view[got:] = bytes(len(view) - got)
            return
        got += n


# -- the interface -------------------------------------------------------------------------------


class Image:
    """A disk image of ``size`` bytes; see the module docstring."""

    path: Path
    size: int
    sealed: bool
    writable: bool

    def pread(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes from ``offset``; never written, zeroed
        and punched ranges read as zeros."""
        raise NotImplementedError

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        raise NotImplementedError

    def zero(self, offset: int, length: int) -> None:
        """Make the range read as zeros, deallocating the whole blocks in it."""
        raise NotImplementedError

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """(offset, length) of the ranges within the request that may hold
        data, merged, in order; everything else reads as zeros."""
        raise NotImplementedError

    def resize(self, new_size: int) -> None:
        """Grow (new space reads zeros) or shrink the image."""
        raise NotImplementedError

    def fsync(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def fileno(self) -> int:
        raise NotImplementedError

    def key_usage(self) -> dict[int, int]:
        """Key id -> number of blocks sealed under it ({} when plain)."""
        return {}

    def rekey(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Re-seal every block not under the active key; blocks rewritten (0 when plain)."""
        return 0

    def __enter__(self) -> "Image":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path} size={self.size}>"

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"{self.path}: range {offset}+{length} is outside the image (size {self.size})")

    def _check_writable(self, what: str) -> None:
        if not self.writable:
            raise io.UnsupportedOperation(f"{self.path}: cannot {what}: the image is open read-only")


def open_image(path: str | Path, size: int, keyring: Keyring | None, *, writable: bool,
               create: bool = False) -> Image:
    """The image at ``path`` of ``size`` bytes.

    A missing image is created when ``create`` (sealed when ``keyring`` has an
    active key, else plain); an existing one is sealed iff its sidecar
    exists.  Writable: an image of another size is resized to ``size``.
    Read-only: ``size`` is what the reader sees (past the stored size: zeros).
    """
    path = Path(path)
    if size < 0:
        raise ValueError(f"{path}: negative size {size}")
    if create and not writable:
        raise ValueError(f"{path}: create needs writable=True")
    tpath = tags_path(path)
    if create and not os.path.lexists(path):
        return _create(path, tpath, size, keyring)
    fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
    try:
        try:
            tfd = os.open(tpath, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        except FileNotFoundError:
            img: Image = PlainImage(path, fd, size, writable=writable)
        else:
            try:
                img = SealedImage(path, fd, tfd, size, keyring, writable=writable)
            except BaseException:
                os.close(tfd)
                raise
    except BaseException:
        os.close(fd)
        raise
    return img


def _create(path: Path, tpath: Path, size: int, keyring: Keyring | None) -> Image:
    if keyring is not None and keyring.active is not None:
        # The sidecar goes first (and durably): a crash before the data file
        # exists leaves nothing that opens as a plain image.
        uid = os.urandom(16)
        rekey_path(path).unlink(missing_ok=True)  # another image's (its uid would not match anyway)
        tfd = os.open(tpath, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _write_header(tfd, uid, size)
            os.ftruncate(tfd, HEADER_SIZE + _nblocks(size) * ENTRY_SIZE)
            os.fsync(tfd)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, size)
                fsync_dir(path.parent)
                return SealedImage(path, fd, tfd, size, keyring, writable=True)
            except BaseException:
                os.close(fd)
                raise
        except BaseException:
            os.close(tfd)
            raise
    tpath.unlink(missing_ok=True)  # left by a sealed create that crashed before its data file
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        fsync_dir(path.parent)
        return PlainImage(path, fd, size, writable=True)
    except BaseException:
        os.close(fd)
        raise


def _nblocks(size: int) -> int:
    return -(-size // BS)


def _blocks(blks: list[int]) -> str:
    """Block numbers for a log line: the first few."""
    return ", ".join(map(str, blks[:8])) + (", ..." if len(blks) > 8 else "")


def _write_header(tfd: int, uid: bytes, size: int) -> None:
    head = _HEADER.pack(MAGIC, VERSION, uid, size, BS)
    pwrite_all(tfd, (head + _U32.pack(zlib.crc32(head))).ljust(HEADER_SIZE, b"\0"), 0)


# -- plain ---------------------------------------------------------------------------------------


class PlainImage(Image):
    """A raw sparse file: plaintext at its offsets."""

    sealed = False

    def __init__(self, path: Path, fd: int, size: int, *, writable: bool) -> None:
        self.path = path
        self.size = size
        self.writable = writable
        self._fd = fd
        self._lock = threading.Lock()
        if writable and os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)

    def pread(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        b = os.pread(self._fd, length, offset)
        while len(b) < length:  # a short read: EOF (read-only, stored size smaller), or a signal
            more = os.pread(self._fd, length - len(b), offset + len(b))
            if not more:
                return b + bytes(length - len(b))
            b += more
        return b

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        self._check_writable("write")
        self._check(offset, len(data))
        pwrite_all(self._fd, data, offset)

    def zero(self, offset: int, length: int) -> None:
        self._check_writable("zero")
        self._check(offset, length)
        punch_hole(self._fd, offset, length)

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        self._check(offset, length)
        return data_extents(self._fd, offset, length)

    def resize(self, new_size: int) -> None:
        self._check_writable("resize")
        if new_size < 0:
            raise ValueError(f"{self.path}: negative size {new_size}")
        with self._lock:
            os.ftruncate(self._fd, new_size)
            self.size = new_size

    def fsync(self) -> None:
        os.fsync(self._fd)

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


# -- sealed --------------------------------------------------------------------------------------


class _RekeyJob:
    """What one `SealedImage.rekey` call keeps from piece to piece: the log
    file, buffers for one piece, and the helper thread that runs the fsyncs
    (they release the GIL; the AEAD calls of this thread hold it)."""

    def __init__(self) -> None:
        self.lfd = -1
        self.new_file = False  # the directory entry is to be fsynced with the first log
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="nicsplit-rekey")
        self.pending: Future[None] | None = None  # the last piece's (d) and (e)

    def open(self, rpath: Path) -> None:
        flags = os.O_RDWR | os.O_CLOEXEC
        try:
            self.lfd = os.open(rpath, flags | os.O_CREAT | os.O_EXCL, 0o600)
            self.new_file = True
        except FileExistsError:
            self.lfd = os.open(rpath, flags | os.O_TRUNC)  # a void log whose unlink a crash lost
        # the old entries and their ciphertext (the log), plaintext then new ciphertext, new entries
        self.ents = memoryview(bytearray(PIECE_BLOCKS * ENTRY_SIZE))
        self.cts = memoryview(bytearray(PIECE_BLOCKS * BS))
        self.work = memoryview(bytearray(PIECE_BLOCKS * BS))
        self.new_ents = memoryview(bytearray(PIECE_BLOCKS * ENTRY_SIZE))

    def write(self, head: bytes, ents: memoryview, cts: memoryview) -> None:
        """Write a piece's log over the void one (rule 6 (b)), in one syscall
        but for a short write: no new allocation to commit when it fsyncs."""
        length = len(head) + len(ents) + len(cts)
        if os.fstat(self.lfd).st_size > length:
            os.ftruncate(self.lfd, length)
        parts: list[bytes | memoryview] = [head, ents, cts]
        at = 0
        while parts:
            n = os.pwritev(self.lfd, parts, at)
            at += n
            while parts and n >= len(parts[0]):
                n -= len(parts.pop(0))
            if parts:
                parts[0] = memoryview(parts[0])[n:]

    def sync(self, parent: Path) -> None:
        os.fsync(self.lfd)
        if self.new_file:
            fsync_dir(parent)
            self.new_file = False

    def settle(self) -> None:
        """Wait for the last piece's (d) and (e); raise what they raised."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def close(self) -> bool:
        """Wait for the helper, close the log; whether the last piece settled."""
        self.pool.shutdown()
        ok = self.pending is None or self.pending.exception() is None
        self.pending = None
        if self.lfd >= 0:
            os.close(self.lfd)
            self.lfd = -1
            return ok
        return False


class SealedImage(Image):
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
        self._log_cache: tuple[tuple[int, int, int, int], _RekeyLog] | None = None
        self.uid, self._stored = self._read_header()
        if keyring is None:
            raise SealedError(f"{path} is sealed (at-rest encrypted) but no at-rest keyring was given")
        if not keyring.ids():
            raise SealedError(f"{path} is sealed (at-rest encrypted) but the keyring {keyring.path} holds no keys")
        self.keyring = keyring
        self._ciphers = _Ciphers(keyring, _IMAGE_INFO + self.uid)
        if writable:
            if os.fstat(fd).st_size != self._stored:
                os.ftruncate(fd, self._stored)  # a resize cut by a crash: the header says the size
            self._recover()
            if size != self._stored:
                self.resize(size)

    def _read_header(self) -> tuple[bytes, int]:
        raw = os.pread(self._tfd, _HEADER.size + _U32.size, 0)
        where = f"{self.path} (sidecar {tags_path(self.path).name})"
        if len(raw) < _HEADER.size + _U32.size:
            raise SealedError(f"{where}: the sidecar header is truncated ({len(raw)} bytes)")
        magic, version, uid, size, bs = _HEADER.unpack_from(raw)
        if magic != MAGIC:
            raise SealedError(f"{where}: the sidecar header has magic {magic!r}, not {MAGIC!r}")
        if _U32.unpack_from(raw, _HEADER.size)[0] != zlib.crc32(raw[:_HEADER.size]):
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
        for c0 in range(offset // BS, _nblocks(end), RUN_BLOCKS):
            c1 = min(c0 + RUN_BLOCKS, _nblocks(end))
            pt = self._decrypt_run(c0, c1, strict)
            base = c0 * BS
            parts.append(bytes(pt[max(offset, base) - base : min(end, c1 * BS) - base]))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _decrypt_run(self, c0: int, c1: int, strict: bool) -> memoryview:
        """The plaintext of blocks [c0, c1) (whole blocks, zeros past the stored
        size) in this thread's "pt" scratch.  A block that fails raises
        `_Retry` unless ``strict``, then `SealedError`."""
        stored = self._stored
        pt = _scratch.get("pt", (c1 - c0) * BS)
        hi = min(c1, _nblocks(stored))
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
            ct = _scratch.get("ct", dlen)
            _pread_into(self._fd, ct, c0 * BS)
            block, bview = _scratch.block, _scratch.block_view
            aad, uid, zeros = _AAD.pack, self.uid, _ZEROS
            last_kid, decrypt = 0, None
            o, blk = 0, c0
            for kid, nonce, tag in _ENTRY.iter_unpack(tags):
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
            pt[lo:] = _ZERO_RUN[: len(pt) - lo]
        return pt

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        self._check(offset, length)
        end = offset + length
        out: list[tuple[int, int]] = []
        for blk, n in self._runs(offset // BS, min(_nblocks(end), _nblocks(self._stored))):
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
            nb = _nblocks(self._stored)
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

    # -- the rekey log (rule 6) ----------------------------------------------------------------

    def _logged(self) -> _RekeyLog | None:
        """The valid rekey log of this image, or None; re-read only when the file changed."""
        try:
            st = os.stat(self._rpath)
        except FileNotFoundError:
            return None
        if not st.st_size:
            return None
        key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        with self._log_lock:
            if self._log_cache is not None and self._log_cache[0] == key:
                return self._log_cache[1]
            try:
                got = _decode_log(self._rpath.read_bytes(), self.uid)
            except FileNotFoundError:
                return None
            if not isinstance(got, _RekeyLog):
                return None  # void, being written, or left by a crash while it was: its piece is untouched
            self._log_cache = (key, got)
            return got

    def _open_pair(self, blk: int, entry: bytes | memoryview, ct: bytes | memoryview, n: int) -> bytes | None:
        """The plaintext of block ``blk`` (``n`` bytes) from an entry and its
        ciphertext, or None if they do not authenticate (or the key is gone)."""
        kid, nonce, tag = _ENTRY.unpack(entry)
        aes = self._ciphers.get(kid) if kid else None
        if aes is None:
            return None
        try:
            return aes.decrypt(nonce, bytes(ct[:n]) + tag, _AAD.pack(self.uid, blk))
        except InvalidTag:
            return None

    def _from_log(self, blk: int, n: int) -> bytes | None:
        """The plaintext of ``blk`` from the rekey log, if it holds a pair for it that authenticates."""
        logged = self._logged()
        got = None if logged is None else logged.pair(blk)
        return None if got is None else self._open_pair(blk, got[0], got[1], n)

    def _recover(self) -> None:
        """Lay the logged pair back over each torn block of the rekey log's
        piece, fsync, delete the log (rule 6).  Writable images only; at open,
        or under both locks."""
        try:
            raw = self._rpath.read_bytes()
        except FileNotFoundError:
            return
        got = _decode_log(raw, self.uid)
        if isinstance(got, str):
            log.warning("%s: deleted the rekey log %s: %s; a crash came while it was being written, before "
                        "rekey touched its piece", self.path, self._rpath.name, got)
        elif got is not None:
            restored: list[int] = []
            failed: list[int] = []
            nb = _nblocks(self._stored)
            for blk in got.slots:
                if blk >= nb:
                    continue  # cut off by a resize since
                n = min(BS, self._stored - blk * BS)
                live = os.pread(self._tfd, ENTRY_SIZE, HEADER_SIZE + blk * ENTRY_SIZE).ljust(ENTRY_SIZE, b"\0")
                kid = _U32.unpack_from(live)[0]
                if not kid:
                    continue  # zeroed since
                if self._ciphers.get(kid) is None:
                    failed.append(blk)  # not a tear by rekey (both its keys are held): leave it be
                    continue
                ct = os.pread(self._fd, n, blk * BS)
                if self._open_pair(blk, live, ct, n) is not None:
                    continue  # old, re-sealed, or written since: all hold the right plaintext
                pair = got.pair(blk)
                assert pair is not None
                entry, old = pair
                if self._open_pair(blk, entry, old, n) is None:
                    failed.append(blk)
                    continue
                pwrite_all(self._fd, old[:n], blk * BS)
                pwrite_all(self._tfd, entry, HEADER_SIZE + blk * ENTRY_SIZE)
                restored.append(blk)
            os.fsync(self._fd)
            os.fsync(self._tfd)
            log.warning("%s: recovered a rekey cut by a crash in blocks %d..%d: %d torn block(s) laid back from "
                        "%s under their old key%s%s", self.path, got.first, got.first + got.count - 1,
                        len(restored), self._rpath.name, f" ({_blocks(restored)})" if restored else "",
                        f"; {len(failed)} block(s) authenticate neither live nor from the log, left as they are "
                        f"({_blocks(failed)})" if failed else "")
        self._rpath.unlink(missing_ok=True)
        if got is not None:  # else an unlink lost in a crash loses nothing
            fsync_dir(self._rpath.parent)
        with self._log_lock:
            self._log_cache = None

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
        n = _nblocks(total)
        nonces = os.urandom(NONCE_SIZE * n)
        ct = _scratch.get("ct", total)
        tags = bytearray(n * ENTRY_SIZE)
        pack_entry, aad, uid = _ENTRY.pack_into, _AAD.pack, self.uid
        o = 0
        for i in range(n):
            nonce = nonces[i * NONCE_SIZE : (i + 1) * NONCE_SIZE]
            sealed = aes.encrypt(nonce, plain[o : o + BS], aad(uid, c0 + i))
            m = len(sealed) - TAG_SIZE
            ct[o : o + m] = memoryview(sealed)[:m]
            pack_entry(tags, i * ENTRY_SIZE, kid, nonce, sealed[m:])
            o += BS
        pwrite_all(self._fd, ct, c0 * BS)
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
        for c0 in range(offset // BS, _nblocks(end), RUN_BLOCKS):
            c1 = min(c0 + RUN_BLOCKS, _nblocks(end))
            base, run_end = c0 * BS, min(c1 * BS, stored)
            lo, hi = max(offset, base), min(end, run_end)
            if lo == base and hi == run_end:  # whole blocks: seal straight from the caller's bytes
                self._seal_run(c0, src[lo - offset : hi - offset], kid, aes)
                continue
            stage = _scratch.get("stage", run_end - base)
            if lo > base:  # read-modify-write of the first block
                first = min(BS, run_end - base)
                stage[:first] = self._decrypt_run(c0, c0 + 1, strict=True)[:first]
            if hi < run_end and (c1 - 1 > c0 or lo == base):  # ... and of the last one
                at = (c1 - 1) * BS - base
                stage[at:] = self._decrypt_run(c1 - 1, c1, strict=True)[: run_end - base - at]
            stage[lo - base : hi - base] = src[lo - offset : hi - offset]
            self._seal_run(c0, stage, kid, aes)

    def zero(self, offset: int, length: int) -> None:
        self._check_writable("zero")
        self._check(offset, length)
        if not length:
            return
        end = offset + length
        with self._lock:
            stored = self._stored
            f0 = -(-offset // BS)
            f1 = _nblocks(stored) if end >= stored else end // BS  # the short last block counts as whole
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
                os.ftruncate(self._tfd, HEADER_SIZE + _nblocks(new_size) * ENTRY_SIZE)
                os.ftruncate(self._fd, new_size)
            else:
                os.ftruncate(self._fd, new_size)
                os.ftruncate(self._tfd, HEADER_SIZE + _nblocks(new_size) * ENTRY_SIZE)
            _write_header(self._tfd, self.uid, new_size)
            self._stored = self.size = new_size
            if keep is not None and edge is not None:
                n = min(BS, new_size - edge * BS)
                kid, aes = self._sealing()
                self._seal_run(edge, memoryview(keep)[:n], kid, aes)

    def rekey(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Re-seal every block not under the active key (rule 4), piece by
        piece behind the rekey log (rule 6), at most `RUN_BLOCKS` at a time
        under the lock; ``progress(block reached, blocks)`` after each piece.
        Returns the blocks rewritten."""
        self._check_writable("rekey")
        with self._rekey_lock:
            return self._rekey(progress)

    def _rekey(self, progress: Callable[[int, int], None] | None) -> int:
        self._ciphers._refresh()  # a rotation just made must count
        with self._piece_lock, self._lock:
            self._recover()  # the log of a rekey of this image that raised
        rewritten = 0
        job = _RekeyJob()
        try:
            first_pass = True
            while True:
                with self._lock:
                    kid, aes = self._sealing()
                total = _nblocks(self._stored)
                skipped = 0
                # The scan takes no lock; each piece is looked at again under it.
                for p0, p1 in self._pieces(kid, total):
                    if job.lfd < 0:
                        job.open(self._rpath)
                    done, left = self._rekey_piece(p0, p1, kid, aes, job)
                    rewritten += done
                    skipped += left
                    if progress is not None and first_pass:
                        progress(p1, total)
                job.settle()
                with self._lock:
                    rotated = self._sealing()[0] != kid
                # Blocks written since their piece was logged were left alone;
                # they are under the active key unless the keyring rotated again.
                if not skipped and not rotated:
                    break
                first_pass = False
        except BaseException:
            job.close()  # the log stays: the next writable open or rekey recovers from it
            raise
        if job.close():
            self._rpath.unlink(missing_ok=True)  # void by now: an unlink lost in a crash loses nothing
        self.fsync()
        if progress is not None:
            progress(total, total)
        return rewritten

    def _pieces(self, kid: int, total: int) -> Iterator[tuple[int, int]]:
        """[first, end) of each piece to rekey: at most `PIECE_BLOCKS` blocks,
        starting and ending with a block neither empty nor under ``kid``."""
        p0 = last = -1
        for start, count in self._runs(0, total):
            for c0 in range(start, start + count, 32768):
                kids = self._kids(c0, min(c0 + 32768, start + count))
                if kids.count(kid) == len(kids):
                    continue  # a rekey that is done or resumed: nothing to look at block by block
                for i, k in enumerate(kids):
                    if k and k != kid:
                        if p0 >= 0 and c0 + i >= p0 + PIECE_BLOCKS:
                            yield p0, last + 1
                            p0 = -1
                        if p0 < 0:
                            p0 = c0 + i
                        last = c0 + i
        if p0 >= 0:
            yield p0, last + 1

    def _rekey_piece(self, p0: int, p1: int, kid: int, aes: AESGCM, job: _RekeyJob) -> tuple[int, int]:
        """Rekey blocks [p0, p1) as rule 6 says; (blocks re-sealed, blocks left
        alone because they changed after the log).  Steps (d) and (e) are left
        to the helper thread, which releases the piece lock when done."""
        ents, cts, work, new_ents = job.ents[: (p1 - p0) * ENTRY_SIZE], job.cts, job.work, job.new_ents
        ents[:] = bytes(len(ents))
        held: list[int] = []  # the blocks logged, in order: slot j of the buffers is block held[j]'s
        short: dict[int, int] = {}  # the short last block -> its length
        # (a) the old pairs, and their plaintext (a damaged block fails here,
        # before anything changed); only reads, so the last piece's (d) and (e) go on meanwhile
        for r0 in range(p0, p1, RUN_BLOCKS):
            with self._lock:
                stored = self._stored
                hi = min(r0 + RUN_BLOCKS, p1, _nblocks(stored))
                kids = self._kids(r0, hi) if hi > r0 else array("I")
                i = 0
                while i < len(kids):
                    if not kids[i] or kids[i] == kid:
                        i += 1
                        continue
                    j = i
                    while j < len(kids) and kids[j] and kids[j] != kid:
                        j += 1
                    b0, b1, s = r0 + i, r0 + j, len(held)
                    old = ents[(b0 - p0) * ENTRY_SIZE : (b1 - p0) * ENTRY_SIZE]
                    _pread_into(self._tfd, old, HEADER_SIZE + b0 * ENTRY_SIZE)
                    _pread_into(self._fd, cts[s * BS : (s + j - i) * BS], b0 * BS)  # zeros past the end
                    self._open_run(b0, old, cts[s * BS :], work[s * BS :])
                    held.extend(range(b0, b1))
                    if b1 * BS > stored:
                        short[b1 - 1] = stored - (b1 - 1) * BS
                    i = j
        if not held:
            return 0, 0  # all written or zeroed since the scan
        m = len(held)
        job.settle()  # the last piece durable and its log void: the log file is free
        self._piece_lock.acquire()
        try:
            # (b) the log, durable before any block of the piece changes: the
            # helper fsyncs it while this thread seals the piece ahead (in
            # ``work``, over the plaintext), out of the lock
            job.write(_log_head(self.uid, stored, p0, p1 - p0, ents, cts[: m * BS]), ents, cts[: m * BS])
            synced = job.pool.submit(job.sync, self._rpath.parent)
            try:
                self._seal_ahead(held, short, work, new_ents, kid, aes)
            finally:
                futures_wait((synced,))
            synced.result()
            _fail("rekey-log-synced")
            # (c) write the new pairs of the blocks still as logged, run by run under the lock
            rewritten = skipped = 0
            for s0 in range(0, m, RUN_BLOCKS):
                s1 = min(s0 + RUN_BLOCKS, m)
                lo = held[s0]
                with self._lock:
                    stored = self._stored
                    live = os.pread(self._tfd, (held[s1 - 1] + 1 - lo) * ENTRY_SIZE, HEADER_SIZE + lo * ENTRY_SIZE)

                    def same(blk: int) -> bool:
                        at, i = (blk - lo) * ENTRY_SIZE, (blk - p0) * ENTRY_SIZE
                        return blk * BS < stored and live[at : at + ENTRY_SIZE] == ents[i : i + ENTRY_SIZE]

                    s = s0
                    while s < s1:
                        if not same(held[s]):
                            skipped += 1
                            s += 1
                            continue
                        e = s + 1
                        while e < s1 and held[e] == held[e - 1] + 1 and same(held[e]):
                            e += 1
                        b0 = held[s]
                        pwrite_all(self._fd, work[s * BS : (e - 1) * BS + short.get(held[e - 1], BS)], b0 * BS)
                        _fail("rekey-data-written")
                        pwrite_all(self._tfd, new_ents[s * ENTRY_SIZE : e * ENTRY_SIZE],
                                    HEADER_SIZE + b0 * ENTRY_SIZE)
                        _fail("rekey-entries-written")
                        rewritten += e - s
                        s = e
            # (d) and (e), while this thread reads the next piece
            job.pending = job.pool.submit(self._finish_piece, job.lfd)
        except BaseException:
            self._piece_lock.release()
            raise
        return rewritten, skipped

    def _finish_piece(self, lfd: int) -> None:
        """(d) the new pairs durable, then (e) the log void: its header zeroed
        in place (cheaper than a truncate, which frees what the next piece
        allocates again); then the piece lock, taken by `_rekey_piece`, is free."""
        try:
            os.fsync(self._fd)
            os.fsync(self._tfd)
            _fail("rekey-synced")
            pwrite_all(lfd, _VOID, 0)
            os.fdatasync(lfd)
        finally:
            self._piece_lock.release()

    def _seal_ahead(self, held: list[int], short: dict[int, int], work: memoryview, new_ents: memoryview,
                    kid: int, aes: AESGCM) -> None:
        """Seal the plaintext of the blocks ``held`` (slot by slot in ``work``)
        in place, and their new entries into ``new_ents``."""
        nonces = os.urandom(NONCE_SIZE * len(held))
        pack_entry, aad, uid, encrypt = _ENTRY.pack_into, _AAD.pack, self.uid, aes.encrypt
        for s, blk in enumerate(held):
            o, n = s * BS, short.get(blk, BS)
            nonce = nonces[s * NONCE_SIZE : (s + 1) * NONCE_SIZE]
            sealed = encrypt(nonce, work[o : o + n], aad(uid, blk))
            work[o : o + n] = memoryview(sealed)[:n]
            pack_entry(new_ents, s * ENTRY_SIZE, kid, nonce, sealed[n:])

    def _open_run(self, b0: int, entries: memoryview, ct: memoryview, out: memoryview) -> None:
        """Decrypt consecutive blocks from ``b0`` (their entries, and their
        ciphertext in whole-block slots) into ``out``; `SealedError` if one fails."""
        block, bview = _scratch.block, _scratch.block_view
        aad, uid, stored = _AAD.pack, self.uid, self._stored
        last_kid, decrypt = 0, None
        o, blk = 0, b0
        for kid, nonce, tag in _ENTRY.iter_unpack(entries):
            if kid != last_kid:
                aes = self._ciphers.get(kid)
                if aes is None:
                    raise SealedError(f"block {blk} of {self.path} is sealed under "
                                      f"{self._ciphers.describe_missing(kid)}")
                last_kid, decrypt = kid, aes.decrypt
            n = min(BS, stored - blk * BS)
            try:
                if n == BS:  # GCM wants ciphertext || tag in one buffer
                    bview[:BS] = ct[o : o + BS]
                    bview[BS:] = tag
                    out[o : o + BS] = decrypt(nonce, block, aad(uid, blk))
                else:  # the short last block
                    out[o : o + n] = decrypt(nonce, bytes(ct[o : o + n]) + tag, aad(uid, blk))
            except InvalidTag:
                raise SealedError(f"block {blk} of {self.path} fails authentication: altered on disk, torn by a "
                                  f"crash, or sealed under another key") from None
            o += BS
            blk += 1

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


# -- blobs ---------------------------------------------------------------------------------------


class BlobSealer:
    """Seals small byte strings (undo entries) under the keyring's active key.

    A blob is ``u32 key id || nonce (12) || ciphertext || tag (16)``, or,
    when there is no active key, ``u32 0 || data`` in clear (and such blobs
    stay readable after encryption is turned on).  The cipher of key K is
    AES-256-GCM under ``HKDF-SHA256(K, info=b"nicsplit blob " || purpose)``;
    ``aad`` (e.g. where the blob is stored) must be given again to open it.
    """

    HEAD = 4
    SEALED_OVERHEAD = HEAD + NONCE_SIZE + TAG_SIZE
    CLEAR_OVERHEAD = HEAD
    assert SEALED_OVERHEAD == 32

    def __init__(self, keyring: Keyring | None, purpose: bytes) -> None:
        self.purpose = purpose
        self._ciphers = None if keyring is None else _Ciphers(keyring, _BLOB_INFO + purpose)

    @staticmethod
    def overhead(sealed: bool) -> int:
        """Bytes a blob adds to its data."""
        return BlobSealer.SEALED_OVERHEAD if sealed else BlobSealer.CLEAR_OVERHEAD

    @property
    def sealing(self) -> bool:
        """Whether `seal` encrypts now (the keyring has an active key)."""
        return self._ciphers is not None and self._ciphers.active(fallback=False) is not None

    def seal(self, data: bytes | bytearray | memoryview, aad: bytes) -> bytes:
        got = None if self._ciphers is None else self._ciphers.active(fallback=False)
        if got is None:
            return b"".join((_U32.pack(0), data))
        kid, aes = got
        nonce = os.urandom(NONCE_SIZE)
        return b"".join((_U32.pack(kid), nonce, aes.encrypt(nonce, data, aad)))

    def open(self, blob: bytes | bytearray | memoryview, aad: bytes) -> bytes:
        view = memoryview(blob)
        what = f"sealed {self.purpose.decode(errors='replace')} blob"
        if len(view) < self.HEAD:
            raise SealedError(f"{what} of {len(view)} bytes is truncated")
        kid = _U32.unpack_from(view)[0]
        if not kid:
            return bytes(view[self.HEAD :])
        if self._ciphers is None:
            raise SealedError(f"{what} is sealed under at-rest key {kid} but no at-rest keyring was given")
        aes = self._ciphers.get(kid)
        if aes is None:
            raise SealedError(f"{what} is sealed under {self._ciphers.describe_missing(kid)}")
        if len(view) < self.SEALED_OVERHEAD:
            raise SealedError(f"{what} of {len(view)} bytes is truncated")
        try:
            return aes.decrypt(view[self.HEAD : self.HEAD + NONCE_SIZE], view[self.HEAD + NONCE_SIZE :], aad)
        except InvalidTag:
            raise SealedError(f"{what} fails authentication: altered on disk, or sealed under another key "
                              f"or for another place") from None
