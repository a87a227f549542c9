"""Re-sealing a sealed image under the active key, crash-safe behind the
rekey log (rule 6 of `nicsplit.storage.sealed`), and reading that log back
after a crash.  `SealedImage` gets these methods from `Rekeying`.

Layout of the rekey log ``disk.img.rekey`` (only while `rekey` runs, or
after a crash in it)::

    big-endian; one piece of at most `PIECE_BLOCKS` blocks
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

Speed: `rekey` writes each piece twice (log, then in place) and fsyncs it;
with the log's fsync overlapping the sealing and the piece's fsync the next
piece's reading, it runs at ~75-80% of a rekey without the log (~290
against ~370 MiB/s on a 256 MiB image).

The protocol, step by step, is rule 6 of `nicsplit.storage.sealed`; tests
cut it with `failpoint` at "rekey-log-synced", "rekey-data-written",
"rekey-entries-written" (these two under the image lock) and
"rekey-synced" (in the helper thread).
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from array import array
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from pathlib import Path
from typing import Callable, Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from nicsplit.core.fsutil import fsync_dir, pwrite_all
from nicsplit.storage.atrest import NONCE_SIZE
from nicsplit.storage.sealing import (
    AAD, BS, ENTRY, ENTRY_SIZE, HEADER_SIZE, RUN_BLOCKS, U32, Ciphers, SealedError, describe_blocks, nblocks,
    pread_into, scratch,
)
from nicsplit.core.crc32 import crc32

__all__ = ["PIECE_BLOCKS", "REKEY_SUFFIX", "rekey_path", "RekeyLog", "decode_log", "Rekeying"]

log = logging.getLogger("nicsplit.storage.rekey")

# Blocks per rekey log (rule 6): 16 MiB keeps its write and four fsyncs a
# small part of re-sealing the piece, and its buffers at 2 x 16 MiB.
PIECE_BLOCKS = 4096
REKEY_SUFFIX = ".rekey"
_LOG_MAGIC = b"NSRK"
_LOG_VERSION = 1
_LOG_HEAD = struct.Struct(">4sH16sQQI")  # magic, version, uid, image size, first block, blocks
_LOG_HEADER_SIZE = _LOG_HEAD.size + U32.size  # then the CRC
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


def rekey_path(path: str | Path) -> Path:
    """The rekey log of image ``path`` (rule 6); whoever deletes or moves an
    image deletes or moves this too."""
    path = Path(path)
    return path.with_name(path.name + REKEY_SUFFIX)


class RekeyLog:
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
            yield blk, U32.unpack_from(self.entries, i * ENTRY_SIZE)[0]


def log_head(uid: bytes, size: int, first: int, count: int, entries: memoryview, ct: memoryview) -> bytes:
    head = _LOG_HEAD.pack(_LOG_MAGIC, _LOG_VERSION, uid, size, first, count)
    return head + U32.pack(crc32(ct, crc32(entries, crc32(head))))


def decode_log(raw: bytes, uid: bytes) -> RekeyLog | str | None:
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
    crc = crc32(view[ct_at:], crc32(entries, crc32(view[: _LOG_HEAD.size])))
    if U32.unpack_from(view, _LOG_HEAD.size)[0] != crc:
        return "fails its CRC"
    if version != _LOG_VERSION:
        return f"version {version} not supported"
    if log_uid != uid:
        return "written for another image (another uid)"
    return RekeyLog(first, count, size, entries, view[ct_at:])



class RekeyJob:
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



class Rekeying:
    """The rekey of a `SealedImage` and its recovery from the rekey log
    (rule 6), as methods of the image: they work on its files and locks."""

    path: Path
    uid: bytes
    _fd: int
    _tfd: int
    _stored: int
    _lock: threading.Lock
    _piece_lock: threading.Lock
    _rekey_lock: threading.Lock
    _log_lock: threading.Lock
    _log_cache: tuple[tuple[int, int, int, int], RekeyLog] | None
    _rpath: Path
    _ciphers: Ciphers

    # What the image provides (`SealedImage`); annotations only, so they shadow nothing.
    _check_writable: Callable[[str], None]
    _sealing: Callable[[], tuple[int, AESGCM]]
    _kids: Callable[[int, int], array]
    _runs: Callable[[int, int], Iterator[tuple[int, int]]]
    fsync: Callable[[], None]

    # -- the rekey log (rule 6) ----------------------------------------------------------------

    def _logged(self) -> RekeyLog | None:
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
                got = decode_log(self._rpath.read_bytes(), self.uid)
            except FileNotFoundError:
                return None
            if not isinstance(got, RekeyLog):
                return None  # void, being written, or left by a crash while it was: its piece is untouched
            self._log_cache = (key, got)
            return got

    def _open_pair(self, blk: int, entry: bytes | memoryview, ct: bytes | memoryview, n: int) -> bytes | None:
        """The plaintext of block ``blk`` (``n`` bytes) from an entry and its
        ciphertext, or None if they do not authenticate (or the key is gone)."""
        kid, nonce, tag = ENTRY.unpack(entry)
        aes = self._ciphers.get(kid) if kid else None
        if aes is None:
            return None
        try:
            return aes.decrypt(nonce, bytes(ct[:n]) + tag, AAD.pack(self.uid, blk))
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
        got = decode_log(raw, self.uid)
        if isinstance(got, str):
            log.warning("%s: deleted the rekey log %s: %s; a crash came while it was being written, before "
                        "rekey touched its piece", self.path, self._rpath.name, got)
        elif got is not None:
            restored: list[int] = []
            failed: list[int] = []
            nb = nblocks(self._stored)
            for blk in got.slots:
                if blk >= nb:
                    continue  # cut off by a resize since
                n = min(BS, self._stored - blk * BS)
                live = os.pread(self._tfd, ENTRY_SIZE, HEADER_SIZE + blk * ENTRY_SIZE).ljust(ENTRY_SIZE, b"\0")
                kid = U32.unpack_from(live)[0]
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
                        len(restored), self._rpath.name, f" ({describe_blocks(restored)})" if restored else "",
                        f"; {len(failed)} block(s) authenticate neither live nor from the log, left as they are "
                        f"({describe_blocks(failed)})" if failed else "")
        self._rpath.unlink(missing_ok=True)
        if got is not None:  # else an unlink lost in a crash loses nothing
            fsync_dir(self._rpath.parent)
        with self._log_lock:
            self._log_cache = None

    def rekey(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Re-seal every block not under the active key (rule 4), piece by
        piece behind the rekey log (rule 6), at most `RUN_BLOCKS` at a time
        under the lock; ``progress(block reached, blocks)`` after each piece.
        Returns the blocks rewritten."""
        self._check_writable("rekey")
        with self._rekey_lock:
            return self._rekey(progress)

    def _rekey(self, progress: Callable[[int, int], None] | None) -> int:
        self._ciphers.refresh()  # a rotation just made must count
        with self._piece_lock, self._lock:
            self._recover()  # the log of a rekey of this image that raised
        rewritten = 0
        job = RekeyJob()
        try:
            first_pass = True
            while True:
                with self._lock:
                    kid, aes = self._sealing()
                total = nblocks(self._stored)
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

    def _rekey_piece(self, p0: int, p1: int, kid: int, aes: AESGCM, job: RekeyJob) -> tuple[int, int]:
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
                hi = min(r0 + RUN_BLOCKS, p1, nblocks(stored))
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
                    pread_into(self._tfd, old, HEADER_SIZE + b0 * ENTRY_SIZE)
                    pread_into(self._fd, cts[s * BS : (s + j - i) * BS], b0 * BS)  # zeros past the end
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
            job.write(log_head(self.uid, stored, p0, p1 - p0, ents, cts[: m * BS]), ents, cts[: m * BS])
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
        pack_entry, aad, uid, encrypt = ENTRY.pack_into, AAD.pack, self.uid, aes.encrypt
        for s, blk in enumerate(held):
            o, n = s * BS, short.get(blk, BS)
            nonce = nonces[s * NONCE_SIZE : (s + 1) * NONCE_SIZE]
            sealed = encrypt(nonce, work[o : o + n], aad(uid, blk))
            work[o : o + n] = memoryview(sealed)[:n]
            pack_entry(new_ents, s * ENTRY_SIZE, kid, nonce, sealed[n:])

    def _open_run(self, b0: int, entries: memoryview, ct: memoryview, out: memoryview) -> None:
        """Decrypt consecutive blocks from ``b0`` (their entries, and their
        ciphertext in whole-block slots) into ``out``; `SealedError` if one fails."""
        block, bview = scratch.block, scratch.block_view
        aad, uid, stored = AAD.pack, self.uid, self._stored
        last_kid, decrypt = 0, None
        o, blk = 0, b0
        for kid, nonce, tag in ENTRY.iter_unpack(entries):
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

