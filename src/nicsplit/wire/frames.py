"""Sans-IO codec of the card ↔ appliance protocol (frames, records, envelope).

Theory of operation
===================
This module never touches a socket, a file or a clock.  The IO loop does::

    dec = FrameDecoder()
    send(encode(Hello(card_id, PROTOCOL_VERSION, cgs)))
    loop:
        dec.receive_data(recv() or b"")        # b"" means EOF
        while (frame := dec.next_event()) is not NEED_DATA:
            handle(frame)                      # Hello / HelloAck / Batch / Ack / Error / Heartbeat

A batch travels as three nested layers, each tagged so the decoder dispatches
on data (borg/restic order)::

    records --encode_records--> plain --seal(compress, then AEAD)--> Batch.body
                                           aad = batch_aad(batch header)

Rules
-----
1. Every frame is a 16-byte header (``_HEADER``) plus a body of ``length``
   bytes whose CRC-32 (``zlib.crc32``, the IEEE polynomial; computed with zlib-ng) is in the header.
   All integers are big-endian (network order).  docs/wire.md lists every byte.
2. A header is checked the moment its bytes arrive: bad magic, unknown
   version, unknown type, non-zero flags or a body longer than ``max_body``
   (default 16 MiB) raise `FrameError` *before* the body is buffered.
3. `FrameError` = the peer broke the protocol: drop the connection.  It is
   sticky: every later call on the decoder raises it again.  Misuse by our own
   caller (encoding an invalid frame) raises `ValueError`.
4. Buffered input is bounded: after ``next_event()`` returned NEED_DATA the
   unconsumed input is shorter than ``16 + max_body`` bytes.  The IO loop must
   drain ``next_event()`` after every ``receive_data()``.
5. Decoding is total: any byte string yields frames or `FrameError`, never
   another exception (fuzzed in tests/unit/test_frames_fuzz.py).  Trailing
   bytes inside a body, bad UTF-8, out-of-range values are `FrameError`.
6. The CRC catches framing bugs, not attackers: TLS protects the link and the
   AEAD tag protects a batch body end to end (card → journal).
7. ``batch_aad`` binds the batch header (id, CG, seq range, time range) to its
   sealed body, so a body replayed under another header fails its tag.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable, Iterable, Union

import xxhash

from nicsplit.core.records import BLOCK_SIZE, Op
from nicsplit.core.crc32 import crc32

__all__ = [
    "PROTOCOL_VERSION", "MAGIC", "MAX_BODY", "MAX_PLAIN", "FP_SIZE",
    "Hello", "HelloAck", "Batch", "Ack", "Error", "Heartbeat", "Frame", "FrameType",
    "ErrorCode", "FrameError", "FrameDecoder", "NEED_DATA", "DecoderStatistics",
    "encode", "batch_aad", "Record", "encode_records", "decode_records", "encode_record",
    "decode_record", "decode_record_split", "RECORD_HEAD", "RECORD_HEAD_SIZE", "REF_SIZE", "fingerprint", "expand", "block_spans",
    "COMPRESS_NONE", "COMPRESS_ZSTD", "CIPHER_NONE", "CIPHER_AES256GCM",
]

PROTOCOL_VERSION = 1
MAGIC = b"NSPF"
# 16 MiB: a batch of 4096 blocks of 4 KiB; large enough to amortise one fsync
# per batch, small enough that a connection buffers at most one such body.
MAX_BODY = 16 * 1024 * 1024
# Plaintext of one batch after decompression.  zstd at its best packs far more
# than 4:1, so a bound is needed against decompression bombs; 64 MiB = 4x
# MAX_BODY, and the card caps its batches' plaintext at this size too.
MAX_PLAIN = 64 * 1024 * 1024
FP_SIZE = 16  # xxh3-128 digest
MAX_STRING = 4096  # identities, CG names and error messages
MAX_CGS = 4096  # CGs named in one Hello / HelloAck


class FrameType:
    HELLO = 1
    HELLO_ACK = 2
    BATCH = 3
    ACK = 4
    ERROR = 5
    HEARTBEAT = 6


class ErrorCode:
    """``Error.code`` values (the sender drops the connection after most)."""

    PROTOCOL = 1  # malformed frame or frame out of order
    VERSION = 2  # protocol version not supported
    UNAUTHENTICATED = 3  # batch body failed its AEAD tag / wrong cipher
    BAD_BATCH = 4  # batch authenticated but its content is invalid
    UNKNOWN_CG = 5  # batch for a CG not named in Hello / not valid
    INTERNAL = 6  # the appliance failed (journal IO): retry elsewhere / later
    SHUTDOWN = 7  # the peer is stopping; reconnect later


# -- frame header -------------------------------------------------------------

_HEADER = struct.Struct(
    ">"
    "4s"  # magic: b"NSPF"
    "B"  # version: frame format version, PROTOCOL_VERSION
    "B"  # type: FrameType
    "H"  # flags: none defined in version 1, must be 0
    "I"  # length: body bytes that follow, <= max_body
    "I"  # crc: zlib.crc32 of the body
)
assert _HEADER.size == 16

# -- bodies -------------------------------------------------------------------
# Strings are a u16 byte length followed by UTF-8 (`_STR_LEN`).
_STR_LEN = struct.Struct(">H")  # byte length of the UTF-8 string that follows
assert _STR_LEN.size == 2
_U16 = struct.Struct(">H")  # a count or a version
assert _U16.size == 2
_U32 = struct.Struct(">I")  # a count
assert _U32.size == 4
_U64 = struct.Struct(">Q")  # a sequence number (HelloAck resume entries)
assert _U64.size == 8

_BATCH_HEAD = struct.Struct(
    ">"
    "Q"  # batch_id: card-assigned, unique per card incarnation (not per CG)
    "Q"  # first_seq: CG sequence of the first write the batch covers (>= 1)
    "Q"  # last_seq: CG sequence of the last write it covers (>= first_seq)
    "Q"  # t_first_ns: timestamp of the first write (ns since the epoch)
    "Q"  # t_last_ns: timestamp of the last write (>= t_first_ns)
)  # followed by: cg (string), then the sealed body up to the end of the frame
assert _BATCH_HEAD.size == 40

_ACK_HEAD = struct.Struct(
    ">"
    "Q"  # batch_id: the Batch acknowledged
    "Q"  # last_seq: every write of the CG up to here is held (durable if flag)
    "B"  # durable: 1 = fsynced in the journal, 0 = received only
    "I"  # known count: 16-byte fingerprints that follow the cg string
)  # followed by: cg (string), known count x 16 bytes
assert _ACK_HEAD.size == 21

_ERROR_HEAD = struct.Struct(">H")  # code: ErrorCode; followed by message (string)
assert _ERROR_HEAD.size == 2

_HEARTBEAT = struct.Struct(">q")  # time_ns: sender's wall clock, ns since the epoch
assert _HEARTBEAT.size == 8

# -- records ------------------------------------------------------------------

RECORD_HEAD = struct.Struct(
    ">"
    "Q"  # seq: CG sequence number (>= 1)
    "Q"  # io_id: host IO id, for logs (the request id of STYLE rule 6)
    "Q"  # vdisk_id: datastore vdisk id
    "B"  # op: nicsplit.core.records.Op (1 write, 2 zero, 3 trim, 4 barrier)
    "B"  # flags: nicsplit.core.records.WFlag (1 = FUA, 2 = GAP); the journal adds RFLAG_IN_WINDOW
    "Q"  # offset: virtual byte offset in the vdisk
    "Q"  # length: bytes covered by the op
    "q"  # time_ns: when the write entered the splitter (ns since the epoch)
    "I"  # nrefs: (block index, fingerprint) pairs that follow
    "I"  # data_len: bytes of data after the refs
)  # followed by: nrefs x _REF, data_len bytes of data
assert RECORD_HEAD.size == 58

_REF = struct.Struct(
    ">"
    "I"  # block: 4 KiB block index within the record (ascending, unique)
    "16s"  # fp: xxh3-128 fingerprint of that block, held by the appliance
)
assert _REF.size == 20

RECORD_HEAD_SIZE = RECORD_HEAD.size  # a record's data starts at RECORD_HEAD_SIZE + nrefs * REF_SIZE
REF_SIZE = _REF.size

_RECORDS_COUNT = struct.Struct(">I")  # number of records in the plaintext
assert _RECORDS_COUNT.size == 4
REF, RECORDS_COUNT = _REF, _RECORDS_COUNT  # for the card's own record encoder (card/pipeline/encode.py)

# -- envelope -------------------------------------------------------------------

COMPRESS_NONE = 0
COMPRESS_ZSTD = 1
CIPHER_NONE = 0
CIPHER_AES256GCM = 1
# The envelope's layout, `seal` and `unseal`: nicsplit.wire.envelope.


class FrameError(Exception):
    """The peer broke the protocol (bad framing, bad value, bad tag): drop
    the connection."""


# -- frames -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """Card → appliance, first frame: who I am, which CGs I will ship."""

    card_id: str
    version: int
    cgs: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class HelloAck:
    """Appliance → card, answer to Hello.  ``resume[cg]`` is the last durable
    sequence the appliance holds for each CG of the Hello; the card resumes
    after it (0 = nothing yet)."""

    appliance_id: str
    version: int
    resume: dict[str, int]


@dataclass(frozen=True, slots=True)
class Batch:
    """Card → appliance: the writes ``first_seq..last_seq`` of one CG.  ``body``
    is ``seal(encode_records(...), key, batch_aad(batch))``."""

    batch_id: int
    cg: str
    first_seq: int
    last_seq: int
    t_first_ns: int
    t_last_ns: int
    body: bytes


@dataclass(frozen=True, slots=True)
class Ack:
    """Appliance → card: the batch is held (``durable``: fsynced).  ``known``
    lists fingerprints of data blocks the appliance now holds for this CG; the
    card may send them by reference from now on."""

    batch_id: int
    cg: str
    last_seq: int
    durable: bool
    known: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class Error:
    """Either way: why the sender is about to drop the connection."""

    code: int
    message: str


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Either way, when idle: I am alive."""

    time_ns: int


Frame = Union[Hello, HelloAck, Batch, Ack, Error, Heartbeat]


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


# -- encoding -------------------------------------------------------------------


def _u(value: int, bits: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < (1 << bits):
        raise ValueError(f"{what} {value!r} out of range for an unsigned {bits}-bit field")
    return value


def _s64(value: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not -(1 << 63) <= value < (1 << 63):
        raise ValueError(f"{what} {value!r} out of range for a signed 64-bit field")
    return value


def _str(s: str, what: str, *, empty: bool = False) -> bytes:
    if not isinstance(s, str):
        raise ValueError(f"{what} must be a str, not {type(s).__name__}")
    b = s.encode("utf-8")
    if len(b) > MAX_STRING or (not b and not empty):
        raise ValueError(f"{what} {s[:40]!r}: must be 1..{MAX_STRING} UTF-8 bytes")
    return _STR_LEN.pack(len(b)) + b


def batch_aad(b: Batch) -> bytes:
    """The batch header as AEAD associated data: protocol version byte, the
    40-byte ``_BATCH_HEAD`` and the CG string, exactly as on the wire."""
    return bytes((PROTOCOL_VERSION,)) + _batch_head(b)


def _batch_head(b: Batch) -> bytes:
    if b.first_seq < 1 or b.last_seq < b.first_seq:
        raise ValueError(f"batch {b.batch_id}: bad seq range {b.first_seq}..{b.last_seq}")
    if b.t_last_ns < b.t_first_ns:
        raise ValueError(f"batch {b.batch_id}: t_last_ns before t_first_ns")
    return _BATCH_HEAD.pack(
        _u(b.batch_id, 64, "batch_id"), _u(b.first_seq, 64, "first_seq"), _u(b.last_seq, 64, "last_seq"),
        _u(b.t_first_ns, 64, "t_first_ns"), _u(b.t_last_ns, 64, "t_last_ns"),
    ) + _str(b.cg, "cg")


def _handshake_head_bytes(what: str, id_field: str, sender: str, version: int, n: int) -> bytes:
    """Sender id, version and CG count: how HELLO and HELLO_ACK both begin."""
    if n > MAX_CGS:
        raise ValueError(f"{what} names {n} CGs; at most {MAX_CGS}")
    return _str(sender, id_field) + _U16.pack(_u(version, 16, "version")) + _U16.pack(n)


def _encode_body(frame: Frame) -> tuple[int, bytes]:
    if isinstance(frame, Batch):
        return FrameType.BATCH, _batch_head(frame) + bytes(frame.body)
    if isinstance(frame, Ack):
        for fp in frame.known:
            if not isinstance(fp, bytes) or len(fp) != FP_SIZE:
                raise ValueError(f"ack {frame.batch_id}: known fingerprints must be {FP_SIZE} bytes")
        head = _ACK_HEAD.pack(_u(frame.batch_id, 64, "batch_id"), _u(frame.last_seq, 64, "last_seq"),
                              1 if frame.durable else 0, _u(len(frame.known), 32, "known count"))
        return FrameType.ACK, head + _str(frame.cg, "cg") + b"".join(frame.known)
    if isinstance(frame, Heartbeat):
        return FrameType.HEARTBEAT, _HEARTBEAT.pack(_s64(frame.time_ns, "time_ns"))
    if isinstance(frame, Hello):
        if len(set(frame.cgs)) != len(frame.cgs):  # the decoder refuses it: never send it
            raise ValueError(f"hello: a CG is named twice in {list(frame.cgs)[:8]}")
        parts = [_handshake_head_bytes("hello", "card_id", frame.card_id, frame.version, len(frame.cgs))]
        parts += [_str(cg, "cg") for cg in frame.cgs]
        return FrameType.HELLO, b"".join(parts)
    if isinstance(frame, HelloAck):
        parts = [_handshake_head_bytes("hello-ack", "appliance_id", frame.appliance_id, frame.version,
                                       len(frame.resume))]
        for cg, seq in frame.resume.items():
            parts += [_str(cg, "cg"), _U64.pack(_u(seq, 64, f"resume[{cg}]"))]
        return FrameType.HELLO_ACK, b"".join(parts)
    if isinstance(frame, Error):
        return FrameType.ERROR, _ERROR_HEAD.pack(_u(frame.code, 16, "code")) + _str(frame.message, "message", empty=True)
    raise ValueError(f"not a frame: {type(frame).__name__}")


def encode(frame: Frame) -> bytes:
    """The bytes of one frame (header + body).  ValueError if the frame is
    invalid or its body exceeds MAX_BODY."""
    ftype, body = _encode_body(frame)
    if len(body) > MAX_BODY:
        raise ValueError(f"{type(frame).__name__} body of {len(body)} bytes exceeds MAX_BODY ({MAX_BODY})")
    return _HEADER.pack(MAGIC, PROTOCOL_VERSION, ftype, 0, len(body), crc32(body)) + body


# -- decoding -------------------------------------------------------------------


class _Reader:
    """Cursor over one frame body; every failure is a FrameError."""

    __slots__ = ("buf", "pos", "what")

    def __init__(self, buf: memoryview, what: str) -> None:
        self.buf, self.pos, self.what = buf, 0, what

    def take(self, n: int) -> memoryview:
        if n > len(self.buf) - self.pos:
            raise FrameError(f"{self.what}: truncated (need {n} bytes at offset {self.pos}, body is {len(self.buf)})")
        v = self.buf[self.pos : self.pos + n]
        self.pos += n
        return v

    def unpack(self, s: struct.Struct) -> tuple:
        return s.unpack(self.take(s.size))

    def string(self, field: str, *, empty: bool = False) -> str:
        (n,) = self.unpack(_STR_LEN)
        if n > MAX_STRING or (n == 0 and not empty):
            raise FrameError(f"{self.what}: {field} length {n} outside 1..{MAX_STRING}")
        try:
            return str(self.take(n), "utf-8")
        except UnicodeDecodeError:
            raise FrameError(f"{self.what}: {field} is not valid UTF-8") from None

    def rest(self) -> bytes:
        v = bytes(self.buf[self.pos :])
        self.pos = len(self.buf)
        return v

    def end(self) -> None:
        if self.pos != len(self.buf):
            raise FrameError(f"{self.what}: {len(self.buf) - self.pos} trailing bytes in body")


def _handshake_head(r: _Reader, id_field: str) -> tuple[str, int, int]:
    """(sender id, version, CG count): how HELLO and HELLO_ACK both begin."""
    sender = r.string(id_field)
    (version,) = r.unpack(_U16)
    (n,) = r.unpack(_U16)
    if n > MAX_CGS:
        raise FrameError(f"{r.what}: {n} CGs, at most {MAX_CGS}")
    return sender, version, n


def _decode_body(ftype: int, body: memoryview) -> Frame:
    if ftype == FrameType.BATCH:
        r = _Reader(body, "batch")
        batch_id, first, last, t_first, t_last = r.unpack(_BATCH_HEAD)
        cg = r.string("cg")
        if first < 1 or last < first:
            raise FrameError(f"batch {batch_id}: bad seq range {first}..{last}")
        if t_last < t_first:
            raise FrameError(f"batch {batch_id}: bad time range {t_first}..{t_last}")
        return Batch(batch_id, cg, first, last, t_first, t_last, r.rest())
    if ftype == FrameType.ACK:
        r = _Reader(body, "ack")
        batch_id, last, durable, n = r.unpack(_ACK_HEAD)
        if durable > 1:
            raise FrameError(f"ack {batch_id}: durable flag {durable} is not 0 or 1")
        cg = r.string("cg")
        raw = r.take(n * FP_SIZE)
        r.end()
        # one C call for the batch's fingerprints (the card decodes one per
        # block it shipped), not a generator step and two objects per block
        known = struct.unpack(f"{FP_SIZE}s" * n, raw) if n else ()
        return Ack(batch_id, cg, last, bool(durable), known)
    if ftype == FrameType.HEARTBEAT:
        r = _Reader(body, "heartbeat")
        (t,) = r.unpack(_HEARTBEAT)
        r.end()
        return Heartbeat(t)
    if ftype == FrameType.HELLO:
        r = _Reader(body, "hello")
        card_id, version, n = _handshake_head(r, "card_id")
        cgs = tuple(r.string("cg") for _ in range(n))
        r.end()
        if len(set(cgs)) != len(cgs):
            raise FrameError("hello: a CG is named twice")
        return Hello(card_id, version, cgs)
    if ftype == FrameType.HELLO_ACK:
        r = _Reader(body, "hello-ack")
        appliance_id, version, n = _handshake_head(r, "appliance_id")
        resume: dict[str, int] = {}
        for _ in range(n):
            cg = r.string("cg")
            if cg in resume:
                raise FrameError(f"hello-ack: CG {cg!r} named twice")
            (resume[cg],) = r.unpack(_U64)
        r.end()
        return HelloAck(appliance_id, version, resume)
    if ftype == FrameType.ERROR:
        r = _Reader(body, "error")
        (code,) = r.unpack(_ERROR_HEAD)
        message = r.string("message", empty=True)
        r.end()
        return Error(code, message)
    raise FrameError(f"unknown frame type {ftype}")  # unreachable: the header check refuses it


_TYPES = frozenset(range(FrameType.HELLO, FrameType.HEARTBEAT + 1))
_PARTS_MIN = 64 * 1024  # a body this long, not yet all here, is assembled from its chunks


@dataclass(frozen=True, slots=True)
class DecoderStatistics:
    frames: int  # frames returned by next_event()
    bytes: int  # bytes received
    buffered: int  # received but not yet consumed


class FrameDecoder:
    """Bytes in, frames out.  See the module rules (bounded, sticky errors)."""

    def __init__(self, *, max_body: int = MAX_BODY) -> None:
        if not 0 < max_body <= 0xFFFFFFFF:
            raise ValueError(f"max_body {max_body} outside 1..2**32-1")
        self.max_body = max_body
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._error: FrameError | None = None
        self._frames = 0
        self._bytes = 0
        # A large body arriving in many chunks is kept as the chunks and
        # joined once complete: appended to ``_buf`` it was copied again at
        # every growth of the bytearray (a 135 KB batch in 16 KB TLS records
        # cost 210 against 113 us to decode here).
        self._parts: list[bytes] | None = None
        self._have = 0  # body bytes in _parts
        self._head: tuple[int, int, int] = (0, 0, 0)  # ftype, length, crc of the frame in _parts

    def receive_data(self, data: bytes) -> None:
        """Feed received bytes; ``b""`` means the peer closed its side."""
        if self._error is not None:
            raise self._error
        if self._eof:
            raise ValueError("receive_data() after EOF")
        if not data:
            self._eof = True
            return
        self._bytes += len(data)
        if self._parts is not None:
            need = self._head[1] - self._have
            if len(data) <= need:
                self._parts.append(bytes(data))  # no copy of a bytes object
                self._have += len(data)
                return
            self._parts.append(bytes(data[:need]))
            self._have += need
            data = data[need:]  # the next frames: into _buf, which is empty while parts are kept
        if self._pos:
            del self._buf[: self._pos]  # at most once per receive (rule 4 keeps it short)
            self._pos = 0
        self._buf += data

    def next_event(self) -> Frame | _NeedData:
        """The next complete frame, or NEED_DATA.  Raises FrameError (sticky)."""
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except FrameError as e:
            self._error = e
            self._buf = bytearray()
            self._pos = 0
            self._parts, self._have = None, 0
            raise

    def _next(self) -> Frame | _NeedData:
        if self._parts is not None:
            ftype, length, crc = self._head
            if self._have < length:
                if self._eof:
                    raise FrameError(f"connection closed in the middle of a frame "
                                     f"({_HEADER.size + self._have} of {_HEADER.size + length} bytes)")
                return NEED_DATA
            body = b"".join(self._parts)
            self._parts, self._have = None, 0
            return self._frame(ftype, crc, memoryview(body))
        avail = len(self._buf) - self._pos
        if avail < _HEADER.size:
            # Refuse a wrong magic as soon as its bytes are here.
            have = bytes(self._buf[self._pos : self._pos + min(avail, 4)])
            if not MAGIC.startswith(have):
                raise FrameError(f"bad magic {have!r}: not a nicsplit frame stream")
            if self._eof and avail:
                raise FrameError(f"connection closed in the middle of a frame header ({avail} bytes)")
            return NEED_DATA
        magic, version, ftype, flags, length, crc = _HEADER.unpack_from(self._buf, self._pos)
        if magic != MAGIC:
            raise FrameError(f"bad magic {magic!r}: not a nicsplit frame stream")
        if version != PROTOCOL_VERSION:
            raise FrameError(f"frame version {version} not supported (this side speaks {PROTOCOL_VERSION})")
        if ftype not in _TYPES:
            raise FrameError(f"unknown frame type {ftype}")
        if flags:
            raise FrameError(f"frame flags {flags:#x} set; none are defined in version {PROTOCOL_VERSION}")
        if length > self.max_body:
            raise FrameError(f"frame body of {length} bytes exceeds the limit of {self.max_body}")
        if avail < _HEADER.size + length:
            if self._eof:
                raise FrameError(f"connection closed in the middle of a frame ({avail} of {_HEADER.size + length} bytes)")
            if length >= _PARTS_MIN:  # the rest of a large body: kept as chunks (see __init__)
                start = self._pos + _HEADER.size
                self._parts = [bytes(self._buf[start:])]
                self._have = len(self._parts[0])
                self._head = (ftype, length, crc)
                self._buf.clear()
                self._pos = 0
            return NEED_DATA
        start = self._pos + _HEADER.size
        body = memoryview(self._buf)[start : start + length]
        try:
            frame = self._frame(ftype, crc, body)
        finally:
            body.release()
        self._pos = start + length
        if self._pos == len(self._buf):
            self._buf.clear()  # fully consumed: O(1), no memmove
            self._pos = 0
        return frame

    def _frame(self, ftype: int, crc: int, body: memoryview) -> Frame:
        if crc32(body) != crc:
            raise FrameError(f"frame type {ftype}: body CRC mismatch")
        frame = _decode_body(ftype, body)
        self._frames += 1
        return frame

    def statistics(self) -> DecoderStatistics:
        return DecoderStatistics(self._frames, self._bytes, len(self._buf) - self._pos + self._have
                                 + (_HEADER.size if self._parts is not None else 0))


# -- records -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Record:
    """One write-like IO of a CG, as shipped in a batch and kept in the journal.

    For WRITE, ``refs`` lists blocks sent by reference and ``data`` holds the
    other blocks' bytes, in block order (see `expand`).  ZERO, TRIM and BARRIER
    carry neither.  Block i covers ``[i*4096, min((i+1)*4096, length))``."""

    seq: int
    io_id: int
    vdisk_id: int
    op: int
    flags: int
    offset: int
    length: int
    time_ns: int
    data: bytes = b""
    refs: tuple[tuple[int, bytes], ...] = ()


_OPS = frozenset(int(o) for o in Op)


def block_spans(length: int) -> int:
    """Number of 4 KiB blocks (the last possibly partial) in ``length`` bytes."""
    return (length + BLOCK_SIZE - 1) // BLOCK_SIZE


def _block_len(length: int, i: int) -> int:
    return min(BLOCK_SIZE, length - i * BLOCK_SIZE)


def _check_record(r: Record, err: Callable[[str], Exception]) -> None:
    if r.op not in _OPS:
        raise err(f"record seq {r.seq}: unknown op {r.op}")
    if r.seq < 1:
        raise err(f"record seq {r.seq}: sequence numbers start at 1")
    if r.op != Op.WRITE:
        if r.data or r.refs:
            raise err(f"record seq {r.seq}: op {Op(r.op).name} carries no data or refs")
        return
    nblocks = block_spans(r.length)
    ref_bytes = 0
    prev = -1
    for block, fp in r.refs:
        if not prev < block < nblocks:
            raise err(f"record seq {r.seq}: ref block {block} out of order or outside 0..{nblocks - 1}")
        if len(fp) != FP_SIZE:
            raise err(f"record seq {r.seq}: fingerprint of {len(fp)} bytes, not {FP_SIZE}")
        prev = block
        ref_bytes += _block_len(r.length, block)
    if len(r.data) != r.length - ref_bytes:
        raise err(f"record seq {r.seq}: {len(r.data)} data bytes, expected {r.length - ref_bytes} "
                  f"(length {r.length} minus {len(r.refs)} blocks by reference)")


def encode_record(r: Record) -> bytes:
    """One record in the wire layout (also the journal RECORD entry payload)."""
    _check_record(r, ValueError)
    try:  # struct checks every range; the per-field checks below only name the culprit
        head = RECORD_HEAD.pack(r.seq, r.io_id, r.vdisk_id, r.op, r.flags, r.offset, r.length, r.time_ns,
                                len(r.refs), len(r.data))
    except struct.error:
        head = RECORD_HEAD.pack(
            _u(r.seq, 64, "seq"), _u(r.io_id, 64, "io_id"), _u(r.vdisk_id, 64, "vdisk_id"), _u(r.op, 8, "op"),
            _u(r.flags, 8, "flags"), _u(r.offset, 64, "offset"), _u(r.length, 64, "length"),
            _s64(r.time_ns, "time_ns"), len(r.refs), _u(len(r.data), 32, "data length"),
        )
    if not r.refs:
        return b"".join((head, r.data))
    return b"".join([head, *(_REF.pack(b, fp) for b, fp in r.refs), r.data])


def decode_record(buf: bytes | memoryview, pos: int = 0) -> tuple[Record, int]:
    """Decode one record at ``buf[pos:]``; returns it and the offset after it."""
    mv = memoryview(buf)
    if len(mv) - pos < RECORD_HEAD.size:
        raise FrameError(f"record at offset {pos}: truncated header")
    seq, io_id, vdisk_id, op, flags, offset, length, time_ns, nrefs, data_len = RECORD_HEAD.unpack_from(mv, pos)
    pos += RECORD_HEAD.size
    if nrefs * _REF.size + data_len > len(mv) - pos:
        raise FrameError(f"record seq {seq}: {nrefs} refs and {data_len} data bytes run past the end")
    refs = tuple((b, bytes(fp)) for b, fp in _REF.iter_unpack(mv[pos : pos + nrefs * _REF.size])) if nrefs else ()
    pos += nrefs * _REF.size
    data = bytes(mv[pos : pos + data_len])
    pos += data_len
    rec = Record(seq, io_id, vdisk_id, op, flags, offset, length, time_ns, data, refs)
    _check_record(rec, FrameError)
    return rec, pos


def decode_record_split(head: bytes | memoryview, body: bytes) -> Record:
    """A record whose head (RECORD_HEAD_SIZE bytes) and the rest (refs, then
    data) are separate buffers — a sealed journal entry decrypts to the rest.
    A record without refs keeps ``body`` itself as its data: no copy."""
    if len(head) != RECORD_HEAD.size:
        raise FrameError(f"record head of {len(head)} bytes, not {RECORD_HEAD.size}")
    seq, io_id, vdisk_id, op, flags, offset, length, time_ns, nrefs, data_len = RECORD_HEAD.unpack(head)
    if nrefs * _REF.size + data_len != len(body):
        raise FrameError(f"record seq {seq}: {nrefs} refs and {data_len} data bytes do not fill {len(body)} bytes")
    if nrefs:
        mv = memoryview(body)
        refs = tuple((b, bytes(fp)) for b, fp in _REF.iter_unpack(mv[: nrefs * _REF.size]))
        data = bytes(mv[nrefs * _REF.size :])
    else:
        refs, data = (), body
    rec = Record(seq, io_id, vdisk_id, op, flags, offset, length, time_ns, data, refs)
    _check_record(rec, FrameError)
    return rec


def encode_records(records: Iterable[Record]) -> bytes:
    """The plaintext of a batch: a u32 count, then the records in order."""
    parts = [encode_record(r) for r in records]
    return _RECORDS_COUNT.pack(len(parts)) + b"".join(parts)


def decode_records(b: bytes | memoryview) -> list[Record]:
    """Inverse of `encode_records`; FrameError on anything malformed.  Record
    order is not checked here (the appliance checks it against the batch)."""
    mv = memoryview(b)
    if len(mv) < _RECORDS_COUNT.size:
        raise FrameError("records: truncated count")
    (n,) = _RECORDS_COUNT.unpack_from(mv, 0)
    if n > (len(mv) - _RECORDS_COUNT.size) // RECORD_HEAD.size:
        raise FrameError(f"records: count {n} cannot fit in {len(mv)} bytes")
    pos = _RECORDS_COUNT.size
    out = []
    for _ in range(n):
        rec, pos = decode_record(mv, pos)
        out.append(rec)
    if pos != len(mv):
        raise FrameError(f"records: {len(mv) - pos} trailing bytes after {n} records")
    return out


def fingerprint(block: bytes | memoryview) -> bytes:
    """16-byte xxh3-128 digest of a block (card dedup, appliance block index).
    Not cryptographic: a collision needs ~2**64 blocks by chance, and only an
    authenticated card can send blocks at all."""
    return xxhash.xxh3_128_digest(block)


def expand(record: Record, lookup: Callable[[bytes], bytes]) -> bytes:
    """The full payload of a WRITE record (b"" for other ops): blocks in
    ``refs`` come from ``lookup(fp)``, the others from ``data`` in order."""
    if record.op != Op.WRITE:
        return b""
    if not record.refs:
        return record.data
    out = bytearray()
    refs = dict(record.refs)
    dpos = 0
    for i in range(block_spans(record.length)):
        n = _block_len(record.length, i)
        fp = refs.get(i)
        if fp is None:
            out += record.data[dpos : dpos + n]
            dpos += n
        else:
            block = lookup(fp)
            if len(block) != n:
                raise FrameError(f"record seq {record.seq}: block {i} by reference is {len(block)} bytes, expected {n}")
            out += block
    return bytes(out)
