"""The sealed body of a batch frame: compress (zstd, kept only if smaller),
then encrypt with the batch key (AES-256-GCM, the batch header as
associated data: `nicsplit.wire.frames.batch_aad`). docs/wire.md lists every
byte; the card builds the same envelope in its pipeline stages
(card/pipeline/compress.py, encrypt.py) and the appliance opens it here.

    body = seal(encode_records(records), key, batch_aad(head))
    plain = unseal(batch.body, key, batch_aad(batch))    # FrameError if altered
"""

from __future__ import annotations

import os
import struct

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from nicsplit.wire.frames import CIPHER_AES256GCM, CIPHER_NONE, COMPRESS_NONE, COMPRESS_ZSTD, MAX_PLAIN, FrameError

__all__ = ["seal", "unseal", "ENVELOPE"]

ENVELOPE = struct.Struct(
    ">"
    "B"  # compression: 0 none, 1 zstd (applied first)
    "B"  # cipher: 0 none (nonce all zero, no tag), 1 AES-256-GCM
    "12s"  # nonce: random 96-bit GCM nonce
)  # followed by: ciphertext || 16-byte tag (cipher 1), or the plaintext (cipher 0)
assert ENVELOPE.size == 14
_TAG_SIZE = 16
_KEY_SIZE = 32


def seal(plain: bytes, key: bytes | None, aad: bytes, *, compress: bool = True) -> bytes:
    """Compress (zstd, kept only if smaller) then encrypt (AES-256-GCM with a
    random nonce and ``aad``; no encryption when ``key`` is None)."""
    if len(plain) > MAX_PLAIN:
        raise ValueError(f"plaintext of {len(plain)} bytes exceeds MAX_PLAIN ({MAX_PLAIN})")
    comp = COMPRESS_NONE
    payload = bytes(plain)
    if compress and plain:
        z = zstandard.ZstdCompressor(level=1, write_content_size=True).compress(plain)
        if len(z) < len(plain):
            comp, payload = COMPRESS_ZSTD, z
    if key is None:
        return ENVELOPE.pack(comp, CIPHER_NONE, bytes(12)) + payload
    if len(key) != _KEY_SIZE:
        raise ValueError(f"AES-256 key must be {_KEY_SIZE} bytes, not {len(key)}")
    nonce = os.urandom(12)
    return ENVELOPE.pack(comp, CIPHER_AES256GCM, nonce) + AESGCM(key).encrypt(nonce, payload, aad)


def unseal(body: bytes, key: bytes | None, aad: bytes) -> bytes:
    """Inverse of `seal`.  FrameError on a failed tag, a cipher that does not
    match the key (a configured key refuses plaintext bodies: no downgrade),
    an unknown tag byte, or a decompressed size above MAX_PLAIN."""
    if len(body) < ENVELOPE.size:
        raise FrameError(f"sealed body of {len(body)} bytes is shorter than its {ENVELOPE.size}-byte envelope")
    comp, cipher, nonce = ENVELOPE.unpack_from(body, 0)
    payload = memoryview(body)[ENVELOPE.size :]
    if comp not in (COMPRESS_NONE, COMPRESS_ZSTD):
        raise FrameError(f"unknown compression {comp}")
    if cipher == CIPHER_NONE:
        if key is not None:
            raise FrameError("unencrypted batch refused: this side requires AES-256-GCM")
        if nonce != bytes(12):
            raise FrameError("unencrypted batch with a non-zero nonce")
        data = bytes(payload)
    elif cipher == CIPHER_AES256GCM:
        if key is None:
            raise FrameError("encrypted batch but no batch key is configured")
        if len(payload) < _TAG_SIZE:
            raise FrameError("encrypted batch shorter than its tag")
        try:
            data = AESGCM(key).decrypt(nonce, bytes(payload), aad)
        except InvalidTag:
            raise FrameError("batch failed authentication (AES-GCM tag mismatch: wrong key, tampered body or header)") from None
    else:
        raise FrameError(f"unknown cipher {cipher}")
    if comp == COMPRESS_NONE:
        if len(data) > MAX_PLAIN:
            raise FrameError(f"plaintext of {len(data)} bytes exceeds {MAX_PLAIN}")
        return data
    try:
        size = zstandard.frame_content_size(data)
        if size > MAX_PLAIN:
            raise FrameError(f"zstd frame declares {size} bytes, above the limit of {MAX_PLAIN}")
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=MAX_PLAIN)
    except zstandard.ZstdError as e:
        raise FrameError(f"bad zstd data: {e}") from None
    if size >= 0 and len(out) != size:
        raise FrameError(f"zstd frame declared {size} bytes but held {len(out)}")
    return out
