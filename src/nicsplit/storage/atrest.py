"""At-rest encryption of journal records: the appliance's keyring and the
per-segment record cipher.

Layout::

    DATA/appliance/at-rest.key        the keyring (JSON, mode 0600)
    DATA/appliance/at-rest.key.lock   flock for read-modify-write of the keyring

Theory of operation
===================
A journal segment written with encryption names the key it uses (a key id in
its header, docs/journal.md §1).  Its RECORD entries keep the wire record
head (seq, vdisk, offset, length, op, flags, time) in clear — the read-only
scanners index the journal without a key — and carry the rest (references
and data) sealed with AES-256-GCM; the head, the entry's size and tag and
the entry's offset are the associated data, so a changed head, a moved entry
or a flipped ciphertext byte fails authentication.

Keys: the keyring holds numbered 32-byte keys and says which one is
*active* (new segments use it; none = new segments are written in clear).
The cipher of a segment is AES-256-GCM under
``HKDF-SHA256(key, info="nicsplit journal segment" || u64 segment number)``,
so one key never encrypts more than the records of one segment number of
each journal, and every record has a fresh random 96-bit nonce (stored with
it).  Random nonces need no state that a crash or a cut tail could rewind;
per-segment subkeys keep the number of messages per GCM key some thousands
(a 64 MiB segment of 4 KiB records: 16,384), far below the 2**32 limit for
random nonces, whatever the appliance's lifetime.

Rules
-----
1. Keys are only added (`rotate`) or removed (`retire`), never changed; ids
   are never reused (``next_id``).  A key may be retired only when it is not
   active and no segment uses it (`retire` checks the segment headers given
   to it; the CLI passes every journal's).
2. The keyring file is replaced atomically (tmp, fsync, rename, fsync dir)
   under an flock and is created with mode 0600; a keyring readable by group
   or others is refused.
3. A running writer re-reads the keyring (when its stat changes) before it
   creates a segment, so a rotation takes effect at each journal's next
   segment; if the file became unreadable it keeps the keys it has.

Example::

    kr = Keyring.create(Layout(data).keyring)                 # key 1, active
    new = rotate(kr.path)                                      # key 2, active
    segment_cipher(kr.key(1), 7).decrypt(nonce, sealed, aad)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from nicsplit.core.fsutil import atomic_write
from nicsplit.core.layout import KEYRING_NAME, Layout

__all__ = [
    "KEYRING_NAME", "KEY_SIZE", "NONCE_SIZE", "TAG_SIZE", "AtRestError", "Key", "Keyring", "segment_cipher",
    "keyring_path", "keyring_for_journal", "keyring_for_images", "keyring_in", "new_active", "rotate", "retire", "ensure",
]

KEYRING_VERSION = 1
KEY_SIZE = 32  # AES-256
NONCE_SIZE = 12  # GCM's 96-bit nonce, random per record
TAG_SIZE = 16  # GCM tag, full length
_HKDF_INFO = b"nicsplit journal segment"


class AtRestError(Exception):
    """The keyring cannot be read, written or changed as asked (one clear line)."""


@dataclass(frozen=True, slots=True)
class Key:
    id: int
    key: bytes
    created: float  # wall clock when it was added


def segment_cipher(key: bytes, segment: int) -> AESGCM:
    """The AES-256-GCM cipher of one segment number under ``key``."""
    sub = HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None,
               info=_HKDF_INFO + segment.to_bytes(8, "big")).derive(key)
    return AESGCM(sub)


def keyring_path(data: str | Path) -> Path:
    """Where the appliance of data directory ``data`` keeps its keyring (`Layout.keyring`)."""
    return Layout(data).keyring


class Keyring:
    """The keys of one appliance, loaded from its keyring file."""

    def __init__(self, path: Path, keys: dict[int, Key], active: int | None, next_id: int,
                 stamp: tuple[int, int, int] | None) -> None:
        self.path = path
        self._keys = keys
        self._active = active
        self._next_id = next_id
        self._stamp = stamp  # (inode, size, mtime_ns) of the file we read
        self._lock = threading.Lock()

    # -- reading -----------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> "Keyring":
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise AtRestError(f"cannot read the at-rest keyring {path}: {e.strerror or e}") from None
        try:
            st = os.fstat(fd)
            if st.st_mode & 0o077:
                raise AtRestError(f"at-rest keyring {path} is accessible by group or others "
                                  f"(mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 it")
            raw = b""
            while chunk := os.read(fd, 1 << 16):
                raw += chunk
        finally:
            os.close(fd)
        keys, active, next_id = _parse(path, raw)
        return cls(path, keys, active, next_id, (st.st_ino, st.st_size, st.st_mtime_ns))

    def refresh(self) -> bool:
        """Re-read the file if it changed since it was read; True if it did."""
        try:
            st = os.stat(self.path)
        except OSError as e:
            raise AtRestError(f"cannot read the at-rest keyring {self.path}: {e.strerror or e}") from None
        if (st.st_ino, st.st_size, st.st_mtime_ns) == self._stamp:
            return False
        new = Keyring.load(self.path)
        with self._lock:
            self._keys, self._active, self._next_id, self._stamp = new._keys, new._active, new._next_id, new._stamp
        return True

    @property
    def active(self) -> int | None:
        """The key id new segments use; None = new segments are in clear."""
        return self._active

    @property
    def next_id(self) -> int:
        return self._next_id

    def ids(self) -> list[int]:
        return sorted(self._keys)

    def keys(self) -> list[Key]:
        return [self._keys[i] for i in sorted(self._keys)]

    def has(self, key_id: int) -> bool:
        return key_id in self._keys

    def key(self, key_id: int) -> bytes:
        k = self._keys.get(key_id)
        if k is None:
            raise AtRestError(f"at-rest key {key_id} is not in the keyring {self.path} "
                              f"(it holds {', '.join(map(str, self.ids())) or 'no keys'})")
        return k.key

    # -- creating and changing (CLI, appliance start) -----------------------------------

    @classmethod
    def create(cls, path: str | Path) -> "Keyring":
        """A new keyring file with key 1 active; refuses to replace one."""
        path = Path(path)
        with _locked(path):
            if path.exists():
                raise AtRestError(f"at-rest keyring {path} already exists")
            _store(path, {1: Key(1, os.urandom(KEY_SIZE), time.time())}, 1, 2)
        return cls.load(path)


def _parse(path: Path, raw: bytes) -> tuple[dict[int, Key], int | None, int]:
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise AtRestError(f"at-rest keyring {path} is unreadable ({e})") from None
    try:
        if doc.get("version") != KEYRING_VERSION:
            raise AtRestError(f"at-rest keyring {path}: version {doc.get('version')!r} not supported")
        keys: dict[int, Key] = {}
        for k in doc["keys"]:
            key = bytes.fromhex(k["key"])
            kid = int(k["id"])
            if len(key) != KEY_SIZE or not 1 <= kid < 2**32 or kid in keys:
                raise AtRestError(f"at-rest keyring {path}: key {kid} is malformed (or listed twice)")
            keys[kid] = Key(kid, key, float(k["created"]))
        active = doc["active"]
        active = None if active is None else int(active)
        next_id = int(doc["next_id"])
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise AtRestError(f"at-rest keyring {path} is malformed ({type(e).__name__}: {e})") from None
    if active is not None and active not in keys:
        raise AtRestError(f"at-rest keyring {path}: active key {active} is not in it")
    if keys and next_id <= max(keys):
        raise AtRestError(f"at-rest keyring {path}: next_id {next_id} would reuse a key id")
    return keys, active, next_id


def _store(path: Path, keys: dict[int, Key], active: int | None, next_id: int) -> None:
    doc = {"version": KEYRING_VERSION, "active": active, "next_id": next_id,
           "keys": [{"id": k.id, "key": k.key.hex(), "created": k.created} for k in
                    (keys[i] for i in sorted(keys))]}
    atomic_write(path, json.dumps(doc, indent=1).encode(), 0o600)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def rotate(path: str | Path) -> tuple[int, int | None]:
    """Add a new key and make it active (creating the keyring with key 1 when
    there is none); returns (new id, previously active id)."""
    path = Path(path)
    with _locked(path):
        if not path.exists():
            _store(path, {1: Key(1, os.urandom(KEY_SIZE), time.time())}, 1, 2)
            return 1, None
        kr = Keyring.load(path)
        keys = {k.id: k for k in kr.keys()}
        new = kr.next_id
        if new >= 2**32:
            raise AtRestError(f"at-rest keyring {path}: key ids are exhausted")
        keys[new] = Key(new, os.urandom(KEY_SIZE), time.time())
        _store(path, keys, new, new + 1)
        return new, kr.active


def retire(path: str | Path, key_id: int, in_use: dict[int, int]) -> None:
    """Remove key ``key_id``; ``in_use`` maps key id → what it still seals
    (journal segments, image blocks, undo entries of the whole appliance).  Refuses the active key and used keys."""
    path = Path(path)
    with _locked(path):
        kr = Keyring.load(path)
        if not kr.has(key_id):
            raise AtRestError(f"at-rest key {key_id} is not in the keyring {path}")
        if kr.active == key_id:
            raise AtRestError(f"at-rest key {key_id} is the active key; rotate first")
        if in_use.get(key_id):
            raise AtRestError(f"at-rest key {key_id} still encrypts {in_use[key_id]} journal segment(s), image "
                              f"block(s) or undo entries; it can be retired once retention has removed those "
                              f"segments and the running appliance has re-sealed the images")
        keys = {k.id: k for k in kr.keys() if k.id != key_id}
        _store(path, keys, kr.active, kr.next_id)


def ensure(path: str | Path, enabled: bool) -> Keyring | None:
    """Make the keyring say what ``[appliance] at_rest_encryption`` says (at
    appliance start): enabled → a keyring with an active key (created, or
    its newest key activated); disabled → no active key (existing keys stay
    for reading).  Returns the keyring, or None when there is none."""
    path = Path(path)
    with _locked(path):
        if not path.exists():
            if not enabled:
                return None
            _store(path, {1: Key(1, os.urandom(KEY_SIZE), time.time())}, 1, 2)
            return Keyring.load(path)
        kr = Keyring.load(path)
        want = (kr.active if kr.active is not None else (max(kr.ids()) if kr.ids() else None)) if enabled else None
        if enabled and want is None:  # every key was retired while encryption was off
            want = kr.next_id
            keys = {k.id: k for k in kr.keys()}
            keys[want] = Key(want, os.urandom(KEY_SIZE), time.time())
            _store(path, keys, want, want + 1)
        elif want != kr.active:
            _store(path, {k.id: k for k in kr.keys()}, want, kr.next_id)
        else:
            return kr
        return Keyring.load(path)


# -- discovery for journals ----------------------------------------------------------------

# The discovery goes by the names `Layout` gives the directories, relative to
# the appliance directory (tests place that anywhere, not only DATA/appliance).
_NAMES = Layout(".")
_cache: dict[Path, Keyring] = {}
_cache_lock = threading.Lock()


def keyring_for_journal(journal_dir: str | Path) -> Keyring | None:
    """The keyring of the appliance a journal belongs to
    (``DATA/appliance/journal/<cg>`` → ``DATA/appliance/at-rest.key``), or
    None when there is none.  One object per keyring file per process,
    refreshed when the file changed."""
    jd = Path(journal_dir)
    if jd.parent.name != _NAMES.journals.name:
        return None
    return keyring_in(jd.parent.parent)


def keyring_for_images(image_dir: str | Path) -> Keyring | None:
    """The keyring for the images of a CG's replica or base directory
    (``DATA/appliance/{replicas,base}/<cg>`` → ``DATA/appliance/at-rest.key``)."""
    d = Path(image_dir)
    if d.parent.name not in (_NAMES.replicas.name, _NAMES.bases.name):
        return None
    return keyring_in(d.parent.parent)


def new_active(kr: Keyring | None, seen: int | None) -> int | None:
    """The keyring's active key id when it is not ``seen`` (the file is
    re-read first), else None: what re-sealers use to act once per rotation."""
    if kr is None:
        return None
    kr.refresh()
    return kr.active if kr.active is not None and kr.active != seen else None


def keyring_in(appliance_dir: str | Path) -> Keyring | None:
    """The keyring file of ``DATA/appliance`` (cached as above), or None."""
    path = Path(appliance_dir) / KEYRING_NAME
    if not path.exists():
        return None
    key = path.resolve()
    with _cache_lock:
        kr = _cache.get(key)
        if kr is None:
            kr = _cache[key] = Keyring.load(path)
            return kr
    kr.refresh()
    return kr
