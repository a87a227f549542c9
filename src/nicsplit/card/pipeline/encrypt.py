"""Stage 6, encrypt: AES-256-GCM over the (compressed) batch payload, with the
batch header as associated data, producing the envelope ``Batch.body``.

Envelope (the layout ``envelope.seal`` writes and ``envelope.unseal`` opens;
docs/wire.md)::

    u8 compression | u8 cipher | 12-byte nonce | ciphertext || 16-byte tag

The AAD is ``frames.batch_aad(header)`` — protocol version, batch id, seq
range, time range and CG, i.e. the header with an empty body — so a body
replayed under another header, or a header edited in flight, fails the tag
at the appliance. The nonce is 96 random bits per batch (``os.urandom``).
Random nonces under one key are safe for 2**32 batches (NIST SP 800-38D);
a warning is logged at 2**31 so the key is rotated long before.

Without a key (``key=None``: tests and explicit "no encryption" setups only)
the cipher byte is 0 and the nonce all zero; an appliance configured with a
key refuses such bodies.

Options: the 32-byte batch key (``DATA/pki/batch.key``).

Example::

    e = Encryptor(key)
    body = e.seal(tag, payload, frames.batch_aad(header))

No queue: called synchronously by the pipeline when a batch closes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from nicsplit.wire.envelope import ENVELOPE as _ENVELOPE
from nicsplit.wire.frames import CIPHER_AES256GCM, CIPHER_NONE

log = logging.getLogger(__name__)
KEY_SIZE = 32
NONCE_WARN = 1 << 31


@dataclass(frozen=True)
class EncryptStats:
    cipher: str
    batches: int
    bytes_in: int
    bytes_out: int


class Encryptor:
    def __init__(self, key: bytes | None) -> None:
        if key is not None and len(key) != KEY_SIZE:
            raise ValueError(f"batch key must be {KEY_SIZE} bytes, not {len(key)}")
        self._aead = AESGCM(key) if key is not None else None
        self._batches = self._in = self._out = 0

    def seal(self, compression: int, payload: bytes, aad: bytes) -> bytes:
        self._batches += 1
        self._in += len(payload)
        if self._aead is None:
            body = _ENVELOPE.pack(compression, CIPHER_NONE, bytes(12)) + payload
        else:
            if self._batches == NONCE_WARN:
                log.warning("%d batches sealed under one key: rotate the batch key (random-nonce limit 2**32)", NONCE_WARN)
            nonce = os.urandom(12)
            body = _ENVELOPE.pack(compression, CIPHER_AES256GCM, nonce) + self._aead.encrypt(nonce, payload, aad)
        self._out += len(body)
        return body

    def statistics(self) -> EncryptStats:
        return EncryptStats("aes-256-gcm" if self._aead else "none", self._batches, self._in, self._out)
