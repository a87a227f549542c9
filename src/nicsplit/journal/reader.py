"""Reading records back from a journal's segments: the at-rest cipher of each
sealed segment, `JournalFiles` (the open files a `Journal` reads and writes
through), and `SegmentReader` for readers that must not share the writer's
`Journal` (the PIT reader, the distributor).

Rules
-----
1. Every record read checks its entry CRC and goes through
   `nicsplit.journal.format.open_record_payload`, the one place that
   decrypts; a sealed record is returned only if its GCM tag verifies.
2. Readers open segments read-only, take no lock and write nothing; they
   read only where a scan (`nicsplit.journal.scan`) found a committed entry.
3. A sealed segment's key comes from the keyring on first need (cached per
   segment); a keyring rotated since it was read is re-read once before a
   key id is called unknown.

Example::

    r = SegmentReader(journal_dir)            # the data directory's keyring
    rec = r.read_record(head.segment, head.pos)
    r.close()
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from nicsplit.journal.format import (
    CARRIED_NAME, CARRY, CARRY_SEGMENT, SEGMENT_HEAD, JournalCorrupt, JournalError, open_carried, parse_segment_head,
    read_payloads_at, read_record_at, seg_name, seg_number,
)
from nicsplit.storage import atrest
from nicsplit.storage.durable import DurableFile
from nicsplit.storage.segments import SegmentStore
from nicsplit.wire.frames import Record

__all__ = ["AUTO", "SegmentCiphers", "JournalFiles", "SegmentReader", "segment_key_ids"]

# `keyring=AUTO`: the keyring of the data directory the journal is in
# (DATA/appliance/at-rest.key), if there is one.
AUTO = "auto"

# Decrypted records kept for block reads of sealed segments (a reference
# needs its whole record decrypted): 16 MiB = one full batch of records.
SEALED_CACHE_BYTES = 16 << 20


class SegmentCiphers:
    """The AES-GCM cipher of each sealed segment of one journal, derived from
    the keyring on first need (cached per segment).  ``keyring``: a
    `atrest.Keyring`, None (no keys: sealed segments cannot be read), or
    `AUTO` (the data directory's keyring, looked up on first need)."""

    def __init__(self, path: Path, keyring: "atrest.Keyring | None | str") -> None:
        self.path = path
        self._keyring = keyring
        self._by_seg: dict[int, tuple[int, AESGCM]] = {}
        self._lock = threading.Lock()

    @property
    def keyring(self) -> "atrest.Keyring | None":
        """The keyring (AUTO resolved; None when there is none yet)."""
        if self._keyring == AUTO:
            try:
                kr = atrest.keyring_for_journal(self.path)
            except atrest.AtRestError as e:
                raise JournalError(f"journal {self.path}: {e}") from None
            if kr is not None:
                self._keyring = kr
            return kr
        return self._keyring  # type: ignore[return-value]

    def for_segment(self, seg: int, key_id: int) -> AESGCM | None:
        """The cipher of segment ``seg`` sealed under ``key_id`` (None: clear)."""
        if not key_id:
            return None
        with self._lock:
            c = self._by_seg.get(seg)
            if c is not None and c[0] == key_id:
                return c[1]
        kr = self.keyring
        if kr is None:
            raise JournalError(f"journal {self.path}: {seg_name(seg)} is sealed with at-rest key {key_id} "
                               f"and no keyring was found (DATA/appliance/{atrest.KEYRING_NAME})")
        try:
            if not kr.has(key_id):
                kr.refresh()  # rotated since we read it?
            key = kr.key(key_id)
        except atrest.AtRestError as e:
            raise JournalError(f"journal {self.path}: {seg_name(seg)} is sealed with at-rest key {key_id}: {e}") from None
        cipher = atrest.segment_cipher(key, seg)
        with self._lock:
            self._by_seg[seg] = (key_id, cipher)
        return cipher


class JournalFiles:
    """The open files of one `Journal` (segments, carried.blk) in its store,
    the at-rest key of each segment, and a small cache of decrypted records.
    Not thread-safe: the `Journal` calls it under its lock."""

    def __init__(self, path: Path, store: SegmentStore, readonly: bool,
                 keyring: "atrest.Keyring | None | str") -> None:
        self.path = path
        self.store = store
        self.readonly = readonly
        self.ciphers = SegmentCiphers(path, keyring)
        self.keys: dict[int, int] = {}  # segment -> at-rest key id (0 = clear)
        self._files: dict[int, DurableFile] = {}  # segment (CARRY_SEGMENT: carried.blk) -> open file
        self._sealed: OrderedDict[tuple[int, int], bytes] = OrderedDict()  # (seg, pos) -> record data
        self._sealed_bytes = 0

    def handle(self, seg: int) -> DurableFile:
        """Segment ``seg``, opened on first use (writable unless read-only)."""
        f = self._files.get(seg)
        if f is None:
            f = self._files[seg] = self.store.open(seg_name(seg), readonly=self.readonly)
        return f

    def add(self, seg: int, f: DurableFile, key_id: int) -> None:
        """A segment the writer just created, sealed under ``key_id``."""
        self._files[seg] = f
        self.keys[seg] = key_id

    def cipher(self, seg: int) -> AESGCM | None:
        key_id = self.keys.get(seg)
        if key_id is None:  # a segment recovery did not read (read-only open of a growing journal)
            where = f"journal {self.path}: {seg_name(seg)}"
            key_id, why = parse_segment_head(self.handle(seg).pread(0, SEGMENT_HEAD.size), seg, where)
            if why:
                raise JournalCorrupt(f"{where}: {why}")
            self.keys[seg] = key_id
        return self.ciphers.for_segment(seg, key_id)

    def read_entry(self, seg: int, pos: int) -> Record:
        """The record whose entry starts at (segment, offset), CRC-checked
        (and decrypted when its segment is sealed)."""
        return read_record_at(self.handle(seg).pread, self.cipher(seg), pos,
                              f"journal {self.path}: {seg_name(seg)} offset {pos}")

    def sealed_data(self, seg: int, pos: int) -> bytes:
        """The data of the sealed record at (segment, offset), decrypted (cached)."""
        key = (seg, pos)
        data = self._sealed.get(key)
        if data is not None:
            self._sealed.move_to_end(key)
            return data
        data = self.read_entry(seg, pos).data
        self._sealed[key] = data
        self._sealed_bytes += len(data)
        while self._sealed_bytes > SEALED_CACHE_BYTES and len(self._sealed) > 1:
            _, old = self._sealed.popitem(last=False)
            self._sealed_bytes -= len(old)
        return data

    def carried(self) -> DurableFile:
        """carried.blk, opened on first use (a writer creates it)."""
        f = self._files.get(CARRY_SEGMENT)
        if f is None:
            if not self.readonly and not self.store.exists(CARRIED_NAME):
                f = self.store.create(CARRIED_NAME)
            else:
                f = self.store.open(CARRIED_NAME, readonly=self.readonly)
            self._files[CARRY_SEGMENT] = f
        return f

    def carried_is_new(self) -> bool:
        """Whether carried.blk does not exist yet (its name must be made durable)."""
        return CARRY_SEGMENT not in self._files and not self.store.exists(CARRIED_NAME)

    def read_carried(self, off: int, fp: bytes) -> bytes:
        """The plain block ``fp`` carried at offset ``off`` of carried.blk."""
        f = self.carried()
        head = f.pread(off, CARRY.size)
        stored = f.pread(off + CARRY.size, CARRY.unpack(head)[3])
        return open_carried(head, stored, fp, lambda key_id: self.ciphers.for_segment(CARRY_SEGMENT, key_id),
                            f"journal {self.path}: {CARRIED_NAME} offset {off}")

    def forget(self, segs: set[int]) -> None:
        """Close and forget segments that are gone (trimmed or cut)."""
        for s in segs:
            f = self._files.pop(s, None)
            if f is not None:
                f.close()
            self.keys.pop(s, None)
        for k in [k for k in self._sealed if k[0] in segs]:
            self._sealed_bytes -= len(self._sealed.pop(k))

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


class SegmentReader:
    """Committed records of a journal read at (segment, entry offset) through
    our own read-only descriptors — for readers that must not share the
    writer's `Journal` (PIT reader, distributor).  Entry CRC checked, sealed
    records decrypted (`read_record_at`).  Thread-safe."""

    def __init__(self, path: str | Path, keyring: "atrest.Keyring | None | str" = AUTO) -> None:
        self.path = Path(path)
        self._ciphers = SegmentCiphers(self.path, keyring)
        self._fds: dict[int, tuple[int, AESGCM | None]] = {}
        self._lock = threading.Lock()

    def _segment(self, seg: int) -> tuple[int, AESGCM | None]:
        with self._lock:
            got = self._fds.get(seg)
        if got is not None:
            return got
        p = self.path / seg_name(seg)
        try:
            fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise JournalError(f"journal {self.path}: cannot open {seg_name(seg)}: {e.strerror or e}") from None
        try:
            where = f"journal {self.path}: {seg_name(seg)}"
            key_id, why = parse_segment_head(os.pread(fd, SEGMENT_HEAD.size, 0), seg, where)
            if why:
                raise JournalCorrupt(f"{where}: {why}")
            cipher = self._ciphers.for_segment(seg, key_id)
        except BaseException:
            os.close(fd)
            raise
        with self._lock:
            if seg in self._fds:  # another thread won the race
                os.close(fd)
                return self._fds[seg]
            self._fds[seg] = (fd, cipher)
        return fd, cipher

    def read_record(self, seg: int, pos: int) -> Record:
        fd, cipher = self._segment(seg)
        return read_record_at(lambda off, n: os.pread(fd, n, off), cipher, pos,
                              f"journal {self.path}: {seg_name(seg)} offset {pos}")

    def read_records(self, seg: int, positions: list[int], end: int) -> list[Record]:
        """The records whose entries start at ``positions`` (ascending) of one
        segment, with one ``pread`` from the first up to ``end`` (an upper
        bound of the last entry's end; anything past it is read on its own):
        the records of one distribution step lie back to back, and a syscall
        per entry head and payload cost more than the bytes."""
        fd, cipher = self._segment(seg)
        base = positions[0]
        buf = memoryview(os.pread(fd, max(0, end - base), base))
        top = base + len(buf)

        def pread(off: int, n: int) -> bytes | memoryview:
            return buf[off - base : off - base + n] if off + n <= top else os.pread(fd, n, off)

        return [read_record_at(pread, cipher, pos, f"journal {self.path}: {seg_name(seg)} offset {pos}")
                for pos in positions]

    def read_payloads(self, seg: int, positions: list[int], end: int) -> list[tuple[int, bytes] | None]:
        """(seq, payload) of the records at ``positions`` like `read_records`
        (one pread up to ``end``), without building records
        (`format.read_payload_at`); None for a record with references or one
        that reaches past ``end`` (read those with `read_record`)."""
        fd, cipher = self._segment(seg)
        base = positions[0]
        buf = memoryview(os.pread(fd, max(0, end - base), base))
        return read_payloads_at(buf, base, cipher, positions, f"journal {self.path}: {seg_name(seg)}")

    def close(self) -> None:
        with self._lock:
            for fd, _ in self._fds.values():
                os.close(fd)
            self._fds.clear()


def segment_key_ids(journal_dir: str | Path) -> tuple[dict[int, int], list[str]]:
    """({key id: segments sealed with it}, [segments whose header is
    unreadable]) of one journal, from the segment headers alone (no lock:
    safe while the appliance runs).  Key id 0 counts segments in clear."""
    jd = Path(journal_dir)
    use: dict[int, int] = {}
    bad: list[str] = []
    for p in sorted(jd.iterdir()) if jd.is_dir() else []:
        n = seg_number(p.name)
        if n is None:
            continue
        with open(p, "rb") as f:
            head = f.read(SEGMENT_HEAD.size)
        try:
            key_id, why = parse_segment_head(head, n, f"journal {jd}: {p.name}")
        except JournalCorrupt:
            why = "unsupported header"
        if why:
            bad.append(p.name)
            continue
        use[key_id] = use.get(key_id, 0) + 1
    return use, bad
