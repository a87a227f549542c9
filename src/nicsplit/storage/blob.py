"""Small byte strings sealed at rest (the replica's undo entries), under the
same keyring as the sealed images but with a cipher of their own purpose.

Example::

    undo = BlobSealer(kr, b"replica undo")
    blob = undo.seal(old, aad=undo_offset.to_bytes(8, "big"))     # u32 key id, nonce, ciphertext, tag
    assert undo.open(blob, aad=undo_offset.to_bytes(8, "big")) == old
"""

from __future__ import annotations

import os
from typing import Any

from cryptography.exceptions import InvalidTag

from nicsplit.storage.atrest import NONCE_SIZE, TAG_SIZE, Keyring
from nicsplit.storage.sealing import U32, Ciphers, SealedError

__all__ = ["BlobSealer"]

_BLOB_INFO = b"nicsplit blob "


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
        self._ciphers = None if keyring is None else Ciphers(keyring, _BLOB_INFO + purpose)

    @staticmethod
    def overhead(sealed: bool) -> int:
        """Bytes a blob adds to its data."""
        return BlobSealer.SEALED_OVERHEAD if sealed else BlobSealer.CLEAR_OVERHEAD

    @property
    def sealing(self) -> bool:
        """Whether `seal` encrypts now (the keyring has an active key)."""
        return self._ciphers is not None and self._ciphers.active(fallback=False) is not None

    def sealing_cipher(self) -> tuple[int, Any] | None:
        """(key id, AES-GCM cipher) that `seal` uses now, or None (in clear):
        for callers that seal many blobs at once (`seal_into`)."""
        return None if self._ciphers is None else self._ciphers.active(fallback=False)

    @staticmethod
    def seal_into(kid: int, aes: Any, nonce: bytes, data: bytes | bytearray | memoryview,
                  aad: bytes | memoryview, out: memoryview) -> None:
        """`seal` with the cipher of `sealing_cipher` and a fresh ``nonce``,
        into ``out`` (exactly ``len(data) + SEALED_OVERHEAD`` bytes), byte
        for byte the blob `seal` would return: no intermediate copies."""
        U32.pack_into(out, 0, kid)
        out[BlobSealer.HEAD : BlobSealer.HEAD + NONCE_SIZE] = nonce
        aes.encrypt_into(nonce, data, aad, out[BlobSealer.HEAD + NONCE_SIZE :])

    def seal(self, data: bytes | bytearray | memoryview, aad: bytes) -> bytes:
        got = None if self._ciphers is None else self._ciphers.active(fallback=False)
        if got is None:
            return b"".join((U32.pack(0), data))
        kid, aes = got
        nonce = os.urandom(NONCE_SIZE)
        return b"".join((U32.pack(kid), nonce, aes.encrypt(nonce, data, aad)))

    def open(self, blob: bytes | bytearray | memoryview, aad: bytes) -> bytes:
        view = memoryview(blob)
        what = f"sealed {self.purpose.decode(errors='replace')} blob"
        if len(view) < self.HEAD:
            raise SealedError(f"{what} of {len(view)} bytes is truncated")
        kid = U32.unpack_from(view)[0]
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
