"""Stage 5, compress: zstd over the encoded records of one batch.

One call per batch (never per block), on the plaintext that
``frames.encode_records`` produced from the deduplicated records — so the
data has been fingerprinted before it is compressed (borg/restic order). The
result is kept only if it is smaller; otherwise the batch goes uncompressed
(``COMPRESS_NONE``) and costs nothing to decompress. The compression byte
travels in the envelope (see encrypt.py), so the appliance dispatches on data.

The zstd frame records its content size, which ``envelope.unseal`` checks
against ``MAX_PLAIN`` before decompressing (bomb guard).

Options: ``compress`` (default on), ``compress_level`` (default 1: at ~500
MB/s per core zstd -1 keeps up with a 1 MiB batch every 2 ms; higher levels
trade card CPU for wire bytes).

Example::

    c = Compressor(level=1)
    tag, payload = c.compress(plain)     # (COMPRESS_ZSTD | COMPRESS_NONE, bytes)

No queue: called synchronously by the pipeline when a batch closes.
"""

from __future__ import annotations

from dataclasses import dataclass

import zstandard

from nicsplit.wire.frames import COMPRESS_NONE, COMPRESS_ZSTD


@dataclass(frozen=True)
class CompressStats:
    enabled: bool
    level: int
    batches: int
    compressed: int  # batches sent compressed (the others did not shrink)
    bytes_in: int
    bytes_out: int


class Compressor:
    def __init__(self, *, level: int = 1, enabled: bool = True) -> None:
        if not -7 <= level <= 22:
            raise ValueError(f"compress_level {level} outside -7..22")
        self.level = level
        self.enabled = enabled
        self._z = zstandard.ZstdCompressor(level=level, write_content_size=True)
        self._batches = self._compressed = self._in = self._out = 0

    def compress(self, plain: bytes) -> tuple[int, bytes]:
        self._batches += 1
        self._in += len(plain)
        tag, payload = COMPRESS_NONE, plain
        if self.enabled and plain:
            z = self._z.compress(plain)
            if len(z) < len(plain):
                tag, payload = COMPRESS_ZSTD, z
                self._compressed += 1
        self._out += len(payload)
        return tag, payload

    def statistics(self) -> CompressStats:
        return CompressStats(self.enabled, self.level, self._batches, self._compressed, self._in, self._out)
