"""Sans-IO NBD codec: the server (fixed newstyle handshake + transmission) and a small client.

Theory of operation
===================
This module never touches a socket.  The IO loop owns the socket and does::

    conn = ServerConnection(provider)
    send(conn.data_to_send())                  # greeting
    loop:
        conn.receive_data(recv() or b"")      # b"" means EOF
        while (ev := conn.next_event()) is not NEED_DATA:
            handle(ev)                         # Negotiated / Request / Disconnect / Closed
        send(conn.data_to_send())             # handshake replies, if any
    # transmission replies: send(conn.reply_ok(h)), send(conn.reply_read(h, off, data)), ...

Rules
-----
1. Phases: ``handshake`` -> ``transmission`` -> ``closed``.  The only ways
   forward are OPT_GO (ACK) / OPT_EXPORT_NAME (=> ``Negotiated``), OPT_ABORT
   or EOF (=> ``Closed``), NBD_CMD_DISC (=> ``Disconnect``).  A terminal event
   is returned again by every later ``next_event()``.
2. Handshake replies are queued and drained with ``data_to_send()``;
   transmission replies are *returned* by ``reply_*()`` because the server
   completes requests out of order and sends each reply itself.
3. Every request is validated here, in the order nbdkit uses (read-only,
   command/range, flags, payload size, capability, meta context), so the IO
   layer only executes valid requests and echoes ``Request.error`` otherwise.
   A rejected WRITE still has its payload consumed (streamed and dropped).
4. ``RemoteProtocolError`` = the peer broke framing; it closes this
   connection only and is sticky.  ``LocalProtocolError`` = our caller misused
   the codec.  Bad *requests* are never exceptions: they are errno replies.
5. Buffered input is bounded.  After ``next_event()`` returned NEED_DATA the
   unconsumed input is smaller than the frame being waited for, i.e. at most
   ``max(16 + max_option_length, 28 + _SINK_THRESHOLD)`` bytes.  Payloads
   that are large (writes >= _SINK_THRESHOLD) are copied once into their own
   exactly sized buffer ("sink"); payloads we reject (bad writes, oversize
   options) go to a discarding sink and are never stored.  The IO layer may
   lend the sink (``lend``: e.g. space in the splitter's ring, so the payload
   is received where it is published) and may receive the peer's bytes
   straight into it (``sink_buffer`` / ``sink_received``: recv_into, no copy
   through the input buffer).  A lent sink is told as bytes land
   (``filled``), travels on the Request (``lease``) and is handed back by
   ``abandon_sink`` when the payload never completes; releasing it is the
   IO layer's job.
6. The input buffer is a ``bytearray`` plus a read offset; it is compacted in
   ``receive_data()`` (at most once per receive), never per request, so
   pipelined requests in one segment cost no memmove.

See docs/wire-nbd.md for the option/command table and errno choices.
"""

from __future__ import annotations

import errno as _errno
import struct
from dataclasses import dataclass, field
from typing import Callable, Protocol

__all__ = [
    "MAX_PAYLOAD", "ExportInfo", "ExportProvider", "Negotiated", "Request", "PayloadSink", "StartTLS",
    "TLS_OFF", "TLS_ON", "TLS_REQUIRE",
    "Disconnect", "Closed", "NEED_DATA", "RemoteProtocolError",
    "LocalProtocolError", "ServerConnection", "ConnectionStatistics",
    "errno_to_nbd", "transmission_flags", "ClientConnection", "ExportReady", "Reply",
]

# ---------------------------------------------------------------------------
# Constants (values from docs: /work/shared/reference/nbd-protocol.md)
# ---------------------------------------------------------------------------

MAX_PAYLOAD = 32 * 1024 * 1024  # 32 MiB: the spec's recommended max for clients that don't ask

# TLS modes of ServerConnection (spec "TLS support"): NOTLS, SELECTIVETLS with
# no TLS-only export (STARTTLS offered), FORCEDTLS.
TLS_OFF, TLS_ON, TLS_REQUIRE = "off", "on", "require"

NBDMAGIC = 0x4E42444D41474943                # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054                # "IHAVEOPT"
NBD_OPT_REPLY_MAGIC = 0x0003E889045565A9
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_STRUCTURED_REPLY_MAGIC = 0x668E33EF

# handshake flags (server) / client flags
NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_NO_ZEROES = 1 << 1
_KNOWN_CLIENT_FLAGS = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES

# transmission flags
NBD_FLAG_HAS_FLAGS = 1 << 0
NBD_FLAG_READ_ONLY = 1 << 1
NBD_FLAG_SEND_FLUSH = 1 << 2
NBD_FLAG_SEND_FUA = 1 << 3
NBD_FLAG_ROTATIONAL = 1 << 4
NBD_FLAG_SEND_TRIM = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6
NBD_FLAG_SEND_DF = 1 << 7
NBD_FLAG_CAN_MULTI_CONN = 1 << 8
NBD_FLAG_SEND_RESIZE = 1 << 9
NBD_FLAG_SEND_CACHE = 1 << 10
NBD_FLAG_SEND_FAST_ZERO = 1 << 11

# options
NBD_OPT_EXPORT_NAME = 1
NBD_OPT_ABORT = 2
NBD_OPT_LIST = 3
NBD_OPT_STARTTLS = 5
NBD_OPT_INFO = 6
NBD_OPT_GO = 7
NBD_OPT_STRUCTURED_REPLY = 8
NBD_OPT_LIST_META_CONTEXT = 9
NBD_OPT_SET_META_CONTEXT = 10
NBD_OPT_EXTENDED_HEADERS = 11   # experimental; answered with ERR_UNSUP

# option reply types
NBD_REP_ACK = 1
NBD_REP_SERVER = 2
NBD_REP_INFO = 3
NBD_REP_META_CONTEXT = 4
_REP_ERR = 1 << 31
NBD_REP_ERR_UNSUP = _REP_ERR + 1
NBD_REP_ERR_POLICY = _REP_ERR + 2
NBD_REP_ERR_INVALID = _REP_ERR + 3
NBD_REP_ERR_PLATFORM = _REP_ERR + 4
NBD_REP_ERR_TLS_REQD = _REP_ERR + 5
NBD_REP_ERR_UNKNOWN = _REP_ERR + 6
NBD_REP_ERR_SHUTDOWN = _REP_ERR + 7
NBD_REP_ERR_BLOCK_SIZE_REQD = _REP_ERR + 8
NBD_REP_ERR_TOO_BIG = _REP_ERR + 9

# NBD_REP_INFO types
NBD_INFO_EXPORT = 0
NBD_INFO_NAME = 1
NBD_INFO_DESCRIPTION = 2
NBD_INFO_BLOCK_SIZE = 3

# commands
NBD_CMD_READ = 0
NBD_CMD_WRITE = 1
NBD_CMD_DISC = 2
NBD_CMD_FLUSH = 3
NBD_CMD_TRIM = 4
NBD_CMD_CACHE = 5
NBD_CMD_WRITE_ZEROES = 6
NBD_CMD_BLOCK_STATUS = 7

# command flags
NBD_CMD_FLAG_FUA = 1 << 0
NBD_CMD_FLAG_NO_HOLE = 1 << 1
NBD_CMD_FLAG_DF = 1 << 2
NBD_CMD_FLAG_REQ_ONE = 1 << 3
NBD_CMD_FLAG_FAST_ZERO = 1 << 4

# structured replies
NBD_REPLY_FLAG_DONE = 1 << 0
NBD_REPLY_TYPE_NONE = 0
NBD_REPLY_TYPE_OFFSET_DATA = 1
NBD_REPLY_TYPE_OFFSET_HOLE = 2
NBD_REPLY_TYPE_BLOCK_STATUS = 5
NBD_REPLY_TYPE_ERROR = (1 << 15) + 1
NBD_REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# base:allocation status flags
NBD_STATE_HOLE = 1 << 0
NBD_STATE_ZERO = 1 << 1

# NBD errno values (wire values, not necessarily the host's errno numbers)
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108
_NBD_ERRNOS = frozenset((NBD_EPERM, NBD_EIO, NBD_ENOMEM, NBD_EINVAL, NBD_ENOSPC,
                         NBD_EOVERFLOW, NBD_ENOTSUP, NBD_ESHUTDOWN))

BASE_ALLOCATION = "base:allocation"
_BASE_ALLOCATION_B = BASE_ALLOCATION.encode()
BASE_ALLOCATION_ID = 1           # context ids are opaque; nbdkit also uses 1

# Spec: strings SHOULD be <= 256 and MUST be <= 4096 bytes (error messages too).
_MAX_STRING = 4096
# Writes of at least this size get their own exactly-sized buffer instead of
# waiting whole in the input buffer: 64 KiB is one typical socket read, so
# smaller writes usually arrive with their header and are sliced out in one copy.
_SINK_THRESHOLD = 64 * 1024
# Compact the input buffer once this many consumed bytes sit at its front
# (or when it is fully consumed, which is an O(1) clear).
_COMPACT_AT = 256 * 1024

_POSIX_TO_NBD = {
    _errno.EPERM: NBD_EPERM, _errno.EACCES: NBD_EPERM, _errno.EROFS: NBD_EPERM,
    _errno.EIO: NBD_EIO,
    _errno.ENOMEM: NBD_ENOMEM,
    _errno.EINVAL: NBD_EINVAL,
    _errno.ENOSPC: NBD_ENOSPC, _errno.EDQUOT: NBD_ENOSPC, _errno.EFBIG: NBD_ENOSPC,
    _errno.EOVERFLOW: NBD_EOVERFLOW,
    _errno.ENOTSUP: NBD_ENOTSUP, _errno.EOPNOTSUPP: NBD_ENOTSUP,
    _errno.ESHUTDOWN: NBD_ESHUTDOWN,
}


def errno_to_nbd(posix_errno: int) -> int:
    """Map a host errno to its NBD wire value (EDQUOT/EFBIG -> ENOSPC as the
    spec asks, EROFS/EACCES -> EPERM); anything unknown becomes NBD_EIO."""
    return _POSIX_TO_NBD.get(posix_errno, NBD_EIO)


# ---------------------------------------------------------------------------
# Wire layouts (all big-endian)
# ---------------------------------------------------------------------------

_GREETING = struct.Struct(
    ">Q"   # NBDMAGIC
    "Q"    # IHAVEOPT
    "H"    # handshake flags
)
assert _GREETING.size == 18

_CLIENT_FLAGS = struct.Struct(">I")  # client flags
assert _CLIENT_FLAGS.size == 4

_OPTION = struct.Struct(
    ">Q"   # IHAVEOPT
    "I"    # option
    "I"    # length of option data
)
assert _OPTION.size == 16

_OPTION_REPLY = struct.Struct(
    ">Q"   # NBD_OPT_REPLY_MAGIC
    "I"    # option being answered
    "I"    # reply type
    "I"    # length of reply data
)
assert _OPTION_REPLY.size == 20

_EXPORT_NAME_REPLY = struct.Struct(
    ">Q"   # export size
    "H"    # transmission flags
)
assert _EXPORT_NAME_REPLY.size == 10
_ZEROES_124 = bytes(124)

_INFO_EXPORT = struct.Struct(
    ">H"   # NBD_INFO_EXPORT
    "Q"    # export size
    "H"    # transmission flags
)
assert _INFO_EXPORT.size == 12

_INFO_BLOCK_SIZE = struct.Struct(
    ">H"   # NBD_INFO_BLOCK_SIZE
    "I"    # minimum block size
    "I"    # preferred block size
    "I"    # maximum payload size
)
assert _INFO_BLOCK_SIZE.size == 14

_U16 = struct.Struct(">H")  # a length / count / info type
assert _U16.size == 2
_U32 = struct.Struct(">I")  # a length / count / context id
assert _U32.size == 4

_REQUEST = struct.Struct(
    ">I"   # NBD_REQUEST_MAGIC
    "H"    # command flags
    "H"    # command type
    "Q"    # handle (cookie), opaque
    "Q"    # offset
    "I"    # length
)
assert _REQUEST.size == 28

_SIMPLE_REPLY = struct.Struct(
    ">I"   # NBD_SIMPLE_REPLY_MAGIC
    "I"    # error (NBD errno, 0 = success)
    "Q"    # handle
)
assert _SIMPLE_REPLY.size == 16

_CHUNK = struct.Struct(
    ">I"   # NBD_STRUCTURED_REPLY_MAGIC
    "H"    # reply flags (DONE)
    "H"    # reply type
    "Q"    # handle
    "I"    # payload length
)
assert _CHUNK.size == 20

_CHUNK_OFFSET_DATA = struct.Struct(
    ">IHHQI"  # chunk header as _CHUNK
    "Q"       # offset of the data
)
assert _CHUNK_OFFSET_DATA.size == 28

_CHUNK_ERROR = struct.Struct(
    ">IHHQI"  # chunk header as _CHUNK
    "I"       # NBD errno
    "H"       # message length (message follows)
)
assert _CHUNK_ERROR.size == 26

_CHUNK_BLOCK_STATUS = struct.Struct(
    ">IHHQI"  # chunk header as _CHUNK
    "I"       # metadata context id (descriptors follow)
)
assert _CHUNK_BLOCK_STATUS.size == 24

_EXTENT = struct.Struct(
    ">I"   # extent length
    "I"    # status flags
)
assert _EXTENT.size == 8


# ---------------------------------------------------------------------------
# Exports, events, errors
# ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ExportInfo:
    name: str
    size: int
    readonly: bool = False
    description: str = ""
    min_block: int = 1
    pref_block: int = 4096
    max_block: int = MAX_PAYLOAD
    can_flush: bool = True
    can_fua: bool = True
    can_trim: bool = True
    can_zero: bool = True
    can_fast_zero: bool = True
    can_multi_conn: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.size < 1 << 63:
            raise ValueError(f"export {self.name!r}: size {self.size} out of range")


class ExportProvider(Protocol):
    def lookup(self, name: str) -> ExportInfo | None: ...   # "" = default export
    def list_exports(self) -> list[ExportInfo]: ...


@dataclass(frozen=True, slots=True)
class Negotiated:
    """Handshake done; transmission starts with this export."""
    export: ExportInfo
    structured: bool
    meta_contexts: dict[int, str] = field(default_factory=dict)  # id -> name
    flags: int = 0  # transmission flags that were advertised


@dataclass(slots=True)  # not frozen: a frozen dataclass costs ~1 µs to build, on every IO
class Request:
    """One transmission request.  ``error != 0``: already rejected by the
    codec with that NBD errno; reply with it and do nothing else."""
    handle: int
    cmd: int
    flags: int
    offset: int
    length: int
    data: bytes | memoryview | None
    error: int = 0
    lease: object = None  # the lent sink ``data`` lives in (`PayloadSink`); the IO layer releases it


class PayloadSink(Protocol):
    """A destination for one write's payload, lent by the IO layer (``lend``)."""
    buf: memoryview   # writable, exactly the payload's length: the codec writes the payload here
    data: memoryview  # what the Request carries (the same bytes; may be read-only)

    def filled(self, n: int) -> None: ...  # the first n bytes of buf hold the payload (called as they land)


@dataclass(frozen=True, slots=True)
class StartTLS:
    """NBD_OPT_STARTTLS was acknowledged: send ``data_to_send()`` in the clear,
    run the TLS handshake as the server, then call ``tls_started()``; until
    then ``next_event()`` returns NEED_DATA (any input is a protocol error)."""


@dataclass(frozen=True, slots=True)
class Disconnect:
    """NBD_CMD_DISC: finish in-flight requests, then close."""


@dataclass(frozen=True, slots=True)
class Closed:
    """The peer ended the connection without NBD_CMD_DISC (OPT_ABORT or EOF)."""
    reason: str


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


class RemoteProtocolError(Exception):
    """The peer broke the protocol; close this connection."""


class LocalProtocolError(Exception):
    """The caller misused the codec."""


@dataclass(frozen=True, slots=True)
class ConnectionStatistics:
    phase: str
    buffered: int          # received but not yet consumed bytes
    buffer_size: int       # len of the input bytearray (consumed prefix included)
    sink_size: int         # bytes allocated for a large write payload in flight
    requests: int          # Request events produced
    rejected: int          # ... of which had error != 0
    discarded_bytes: int   # payload bytes dropped without buffering


def transmission_flags(export: ExportInfo, structured: bool) -> int:
    """Transmission flags for *export*.  Like nbdkit -r, a read-only export
    advertises no FUA/TRIM/WRITE_ZEROES/FAST_ZERO (FUA is about persisting
    writes; the write-like commands still get EPERM, FUA gets EINVAL)."""
    f = NBD_FLAG_HAS_FLAGS
    if export.readonly:
        f |= NBD_FLAG_READ_ONLY
    if export.can_flush:
        f |= NBD_FLAG_SEND_FLUSH
    if export.can_fua and not export.readonly:
        f |= NBD_FLAG_SEND_FUA
    if export.can_trim and not export.readonly:
        f |= NBD_FLAG_SEND_TRIM
    if export.can_zero and not export.readonly:
        f |= NBD_FLAG_SEND_WRITE_ZEROES
        if export.can_fast_zero:   # spec: FAST_ZERO MUST be clear without WRITE_ZEROES
            f |= NBD_FLAG_SEND_FAST_ZERO
    if structured:                 # spec: DF MUST be clear without structured replies
        f |= NBD_FLAG_SEND_DF
    if export.can_multi_conn:
        f |= NBD_FLAG_CAN_MULTI_CONN
    return f


def _allowed_cmd_flags(flags: int) -> tuple[int, ...]:
    """Per-command allowed flag mask, indexed by command (0..7), computed once
    per connection from the advertised transmission flags."""
    # Spec: with SEND_FUA the server MUST accept FUA on every command (nbdkit does too).
    fua = NBD_CMD_FLAG_FUA if flags & NBD_FLAG_SEND_FUA else 0
    allowed = [fua] * 8
    if flags & NBD_FLAG_SEND_DF:
        allowed[NBD_CMD_READ] |= NBD_CMD_FLAG_DF
    allowed[NBD_CMD_WRITE_ZEROES] |= NBD_CMD_FLAG_NO_HOLE
    if flags & NBD_FLAG_SEND_FAST_ZERO:
        allowed[NBD_CMD_WRITE_ZEROES] |= NBD_CMD_FLAG_FAST_ZERO
    allowed[NBD_CMD_BLOCK_STATUS] |= NBD_CMD_FLAG_REQ_ONE
    return tuple(allowed)


# range-checked commands; the value is the errno for an out-of-range request
_RANGE_ERRNO = {
    NBD_CMD_READ: NBD_EINVAL, NBD_CMD_WRITE: NBD_ENOSPC, NBD_CMD_TRIM: NBD_EINVAL,
    NBD_CMD_CACHE: NBD_EINVAL, NBD_CMD_WRITE_ZEROES: NBD_ENOSPC,
    NBD_CMD_BLOCK_STATUS: NBD_EINVAL,
}
_WRITE_LIKE = frozenset((NBD_CMD_WRITE, NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES))


# ---------------------------------------------------------------------------
# The connection
# ---------------------------------------------------------------------------

class ServerConnection:
    """Server side of one NBD connection.  See the module docstring."""

    def __init__(self, provider: ExportProvider, *, max_payload: int = MAX_PAYLOAD,
                 max_option_length: int = 65536, max_options: int = 0, tls: str = TLS_OFF) -> None:
        if not 1 <= max_payload < 1 << 32:
            raise ValueError("max_payload must fit the 32-bit request length")
        if tls not in (TLS_OFF, TLS_ON, TLS_REQUIRE):
            raise ValueError(f"tls must be {TLS_OFF!r}, {TLS_ON!r} or {TLS_REQUIRE!r}, not {tls!r}")
        self._provider = provider
        self._max_payload = max_payload
        self._max_option_length = max_option_length
        self._max_options = max_options   # 0 = no limit
        self._n_options = 0
        self._tls = tls                   # off: NOTLS; on: STARTTLS offered; require: FORCEDTLS
        self._tls_active = False
        self._tls_pending = False         # STARTTLS acked, waiting for tls_started()
        self._fixed_newstyle = False
        self.phase = "handshake"

        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._out: list[bytes] = [_GREETING.pack(NBDMAGIC, IHAVEOPT,
                                                 NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES)]
        self._error: RemoteProtocolError | None = None
        self._terminal: Disconnect | Closed | None = None

        # sink: a payload streamed past the input buffer (None = discard)
        self._sink: bytearray | memoryview | None = None
        self._lent: PayloadSink | None = None  # the sink, when the IO layer lent it
        # lend(handle, offset, length, flags) -> PayloadSink | None: a buffer
        # for a valid write's payload of at least _SINK_THRESHOLD bytes.
        self.lend: Callable[[int, int, int, int], PayloadSink | None] | None = None
        self._sink_fill = 0
        self._sink_left = 0
        self._after_sink: Callable[[], object] | None = None

        # handshake state
        self._got_client_flags = False
        self._no_zeroes = False
        self._structured = False
        self._meta_export: str | None = None   # canonical export name of the SET
        self._meta: dict[int, str] = {}

        # transmission state (filled by _enter_transmission)
        self._export: ExportInfo | None = None
        self._size = 0
        self._readonly = False
        self._allowed: tuple[int, ...] = ()
        self._caps_ok: tuple[bool, ...] = ()

        self._n_requests = 0
        self._n_rejected = 0
        self._n_discarded = 0

    # -- input -------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; ``b""`` signals EOF."""
        if self._error is not None:
            raise self._error
        if not data:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError("receive_data() after EOF")
        if self._terminal is not None:
            return  # connection is over; drop (never buffer) trailing bytes
        buf = self._buf
        # Compact: O(1) when all consumed, otherwise only after a big prefix.
        if self._pos:
            if self._pos == len(buf):
                buf.clear()
                self._pos = 0
            elif self._pos >= _COMPACT_AT:
                del buf[:self._pos]
                self._pos = 0
        # Stream straight into (or past) a sink if nothing is queued before it.
        if self._sink_left and self._pos == len(buf):
            n = min(self._sink_left, len(data))
            with memoryview(data) as mv:
                self._sink_take(mv[:n])
                if n < len(mv):
                    buf += mv[n:]
            return
        buf += data

    def _sink_take(self, chunk) -> None:
        n = len(chunk)
        if self._sink is None:
            self._n_discarded += n
        else:
            self._sink[self._sink_fill:self._sink_fill + n] = chunk
            self._sink_fill += n
            if self._lent is not None:
                self._lent.filled(self._sink_fill)
        self._sink_left -= n

    def _start_sink(self, size: int, keep: bool, after: Callable[[], object],
                    lent: PayloadSink | None = None) -> None:
        if lent is not None:
            if len(lent.buf) != size:
                raise LocalProtocolError(f"lent sink of {len(lent.buf)} bytes for a {size}-byte payload")
            self._sink = lent.buf
        else:
            self._sink = bytearray(size) if keep else None
        self._lent = lent
        self._sink_fill = 0
        self._sink_left = size
        self._after_sink = after

    def sink_buffer(self, limit: int) -> memoryview | None:
        """Where the peer's next bytes may be received directly (at most
        ``limit``): the unfilled part of the payload being streamed, when
        nothing is buffered before it; else None (use ``receive_data``).
        Report what landed there with ``sink_received``."""
        if not self._sink_left or self._sink is None or self._pos != len(self._buf) or self._error is not None:
            return None
        f = self._sink_fill
        sink = self._sink
        mv = sink if type(sink) is memoryview else memoryview(sink)
        return mv[f:f + min(self._sink_left, limit)]

    def sink_received(self, n: int) -> None:
        """``n`` bytes from the peer were written into ``sink_buffer()``."""
        if self._error is not None:
            raise self._error
        if not 0 <= n <= self._sink_left or self._sink is None:
            raise LocalProtocolError(f"sink_received({n}) with {self._sink_left} bytes of payload expected")
        self._sink_fill += n
        self._sink_left -= n
        if self._lent is not None:
            self._lent.filled(self._sink_fill)

    def abandon_sink(self) -> PayloadSink | None:
        """The lent sink of a payload that will not complete (the peer is
        gone, or broke framing): the codec forgets it; the caller releases it."""
        lent, self._lent = self._lent, None
        if lent is not None:
            self._sink = None
        return lent

    # -- events ------------------------------------------------------------

    def unparsed(self) -> int:
        """Bytes received and not yet parsed (more requests may wait in them)."""
        return len(self._buf) - self._pos

    def next_event(self):
        """Return the next event, or NEED_DATA."""
        if self._error is not None:
            raise self._error
        if self._terminal is not None:
            return self._terminal
        try:
            if self._after_sink is not None:
                if self._sink_left:
                    avail = len(self._buf) - self._pos
                    if avail:
                        n = min(avail, self._sink_left)
                        with memoryview(self._buf) as mv:
                            self._sink_take(mv[self._pos:self._pos + n])
                        self._pos += n
                    if self._sink_left:
                        if self._eof:
                            raise RemoteProtocolError(
                                f"truncated payload at EOF ({self._sink_left} bytes missing)")
                        return NEED_DATA
                after, self._after_sink = self._after_sink, None
                ev = after()
                if ev is not None:
                    return ev
            if self._export is not None:
                return self._next_request()
            if self._tls_pending:
                if len(self._buf) - self._pos:
                    raise RemoteProtocolError("data after NBD_OPT_STARTTLS before the TLS handshake")
                return NEED_DATA
            return self._next_handshake()
        except RemoteProtocolError as exc:
            self._fail(exc)
            raise

    def _fail(self, exc: RemoteProtocolError) -> None:
        self._error = exc
        self.phase = "closed"
        self._buf = bytearray()
        self._pos = 0
        self._sink = None

    def _finish(self, ev):
        self._terminal = ev
        self.phase = "closed"
        self._buf = bytearray()
        self._pos = 0
        return ev

    def _at_eof(self, what: str):
        """Nothing parseable is buffered: clean Closed at a boundary, else truncated."""
        if not self._eof:
            return NEED_DATA
        if len(self._buf) - self._pos:
            raise RemoteProtocolError(f"truncated {what} at EOF")
        return self._finish(Closed("eof"))

    # -- transmission (hot path) -----------------------------------------------

    def _next_request(self):
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < 28:
            return self._at_eof("request header")
        magic, flags, cmd, handle, offset, length = _REQUEST.unpack_from(buf, pos)
        if magic != NBD_REQUEST_MAGIC:
            raise RemoteProtocolError(f"bad request magic 0x{magic:08x}")
        if cmd == NBD_CMD_DISC:
            self._pos = pos + 28
            return self._finish(Disconnect())
        err = self._validate(cmd, flags, offset, length)
        if cmd != NBD_CMD_WRITE:
            self._pos = pos + 28
            self._n_requests += 1
            if err:
                self._n_rejected += 1
            return Request(handle, cmd, flags, offset, length, None, err)
        # WRITE: the payload follows the header.
        if err or length >= _SINK_THRESHOLD:
            self._pos = pos + 28
            req = Request(handle, cmd, flags, offset, length, None, err)
            if err:   # consume and drop the payload, never store it
                self._start_sink(length, False, self._rejected_write_done(req))
            else:
                lend = self.lend
                self._start_sink(length, True, self._big_write_done(req),
                                 lend(handle, offset, length, flags) if lend is not None else None)
            return self.next_event()
        end = pos + 28 + length
        if len(buf) < end:
            if self._eof:
                raise RemoteProtocolError("truncated write payload at EOF")
            return NEED_DATA
        with memoryview(buf) as mv:
            data = bytes(mv[pos + 28:end])  # the one unavoidable copy
        self._pos = end
        self._n_requests += 1
        return Request(handle, cmd, flags, offset, length, data, 0)

    def _rejected_write_done(self, req: Request):
        def done():
            self._n_requests += 1
            self._n_rejected += 1
            return req
        return done

    def _big_write_done(self, req: Request):
        def done():
            data, self._sink = self._sink, None
            self._n_requests += 1
            lent, self._lent = self._lent, None
            if lent is not None:
                return Request(req.handle, req.cmd, req.flags, req.offset, req.length, lent.data, 0, lent)
            return Request(req.handle, req.cmd, req.flags, req.offset, req.length,
                           memoryview(data), 0)
        return done

    def _validate(self, cmd: int, flags: int, offset: int, length: int) -> int:
        """NBD errno for a request, 0 if valid.  Check order mirrors nbdkit 1.32
        (server/protocol.c validate_request) so both servers agree."""
        if self._readonly and cmd in _WRITE_LIKE:
            return NBD_EPERM
        range_err = _RANGE_ERRNO.get(cmd)
        if range_err is not None:
            # nbdkit treats a zero length as out of range too.
            if length == 0 or offset + length > self._size:
                return range_err
        elif cmd == NBD_CMD_FLUSH:
            if offset or length:
                return NBD_EINVAL
        else:
            return NBD_EINVAL  # unknown command
        if flags & ~self._allowed[cmd]:
            return NBD_EINVAL
        if length > self._max_payload and (cmd == NBD_CMD_READ or cmd == NBD_CMD_WRITE):
            return NBD_EINVAL
        if not self._caps_ok[cmd]:
            return NBD_EINVAL  # command not advertised (CACHE, or flush/trim/zero off)
        if cmd == NBD_CMD_BLOCK_STATUS and not self._meta:
            return NBD_EINVAL
        return 0

    def _enter_transmission(self, export: ExportInfo) -> Negotiated:
        flags = transmission_flags(export, self._structured)
        if self._meta_export != export.name:
            self._meta = {}   # contexts were selected for another export
        self._export = export
        self._size = export.size
        self._readonly = export.readonly
        self._allowed = _allowed_cmd_flags(flags)
        caps = [True] * 8
        caps[NBD_CMD_FLUSH] = export.can_flush
        caps[NBD_CMD_TRIM] = export.can_trim
        caps[NBD_CMD_CACHE] = False
        caps[NBD_CMD_WRITE_ZEROES] = export.can_zero
        self._caps_ok = tuple(caps)
        self.phase = "transmission"
        return Negotiated(export, self._structured, dict(self._meta), flags)

    # -- handshake -------------------------------------------------------------

    def _next_handshake(self):
        while True:
            buf = self._buf
            pos = self._pos
            avail = len(buf) - pos
            if not self._got_client_flags:
                if avail < 4:
                    return self._at_eof("client flags")
                (cflags,) = _CLIENT_FLAGS.unpack_from(buf, pos)
                self._pos = pos + 4
                if cflags & ~_KNOWN_CLIENT_FLAGS:
                    raise RemoteProtocolError(f"unknown client flags 0x{cflags:08x}")
                self._got_client_flags = True
                self._no_zeroes = bool(cflags & NBD_FLAG_C_NO_ZEROES)
                self._fixed_newstyle = bool(cflags & NBD_FLAG_C_FIXED_NEWSTYLE)
                if self._tls == TLS_REQUIRE and not self._fixed_newstyle:
                    # TLS needs fixed newstyle (spec); without it no option could be refused.
                    raise RemoteProtocolError("TLS is required but the client is not fixed newstyle")
                continue
            if avail < 16:
                return self._at_eof("option header")
            magic, opt, length = _OPTION.unpack_from(buf, pos)
            if magic != IHAVEOPT:
                raise RemoteProtocolError(f"bad option magic 0x{magic:016x}")
            self._n_options += 1
            if self._max_options and self._n_options > self._max_options:
                # nbdkit's rule too: the handshake is bounded work for the server.
                raise RemoteProtocolError(f"more than {self._max_options} options in the handshake")
            if length > self._max_option_length:
                if opt == NBD_OPT_EXPORT_NAME:
                    raise RemoteProtocolError("NBD_OPT_EXPORT_NAME name too long")
                # Drop the payload as it streams past, then say TOO_BIG.
                self._pos = pos + 16
                self._start_sink(length, False, self._too_big_done(opt))
                return self.next_event()
            if avail < 16 + length:
                if self._eof:
                    raise RemoteProtocolError("truncated option at EOF")
                return NEED_DATA
            data = bytes(buf[pos + 16:pos + 16 + length])
            self._pos = pos + 16 + length
            ev = self._handle_option(opt, data)
            if ev is not None:
                return ev

    def _too_big_done(self, opt: int):
        def done():
            self._reply(opt, NBD_REP_ERR_TOO_BIG, b"option too long")
            return None
        return done

    def _reply(self, opt: int, rtype: int, data: bytes = b"") -> None:
        self._out.append(_OPTION_REPLY.pack(NBD_OPT_REPLY_MAGIC, opt, rtype, len(data)))
        if data:
            self._out.append(data)

    def _handle_option(self, opt: int, data: bytes):
        if opt == NBD_OPT_STARTTLS:
            return self._opt_starttls(data)
        if self._tls == TLS_REQUIRE and not self._tls_active and opt != NBD_OPT_ABORT:
            if opt == NBD_OPT_EXPORT_NAME:   # it has no error reply: the spec says terminate
                raise RemoteProtocolError("NBD_OPT_EXPORT_NAME without TLS, and TLS is required")
            self._reply(opt, NBD_REP_ERR_TLS_REQD, b"TLS is required: send NBD_OPT_STARTTLS first")
            return None
        if opt == NBD_OPT_EXPORT_NAME:
            try:
                name = data.decode()
            except UnicodeDecodeError:
                raise RemoteProtocolError("NBD_OPT_EXPORT_NAME: name is not UTF-8") from None
            export = self._provider.lookup(name)
            if export is None:
                # No error reply exists for EXPORT_NAME: spec says terminate.
                raise RemoteProtocolError(f"NBD_OPT_EXPORT_NAME: unknown export {name!r}")
            ev = self._enter_transmission(export)
            self._out.append(_EXPORT_NAME_REPLY.pack(export.size, ev.flags))
            if not self._no_zeroes:
                self._out.append(_ZEROES_124)
            return ev
        if opt == NBD_OPT_ABORT:
            self._reply(opt, NBD_REP_ACK)  # spec: ignore any data sent with ABORT
            return self._finish(Closed("abort"))
        if opt == NBD_OPT_LIST:
            if data:
                self._reply(opt, NBD_REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")
                return None
            for export in self._provider.list_exports():
                name = export.name.encode()
                self._reply(opt, NBD_REP_SERVER,
                            _U32.pack(len(name)) + name + export.description.encode())
            self._reply(opt, NBD_REP_ACK)
            return None
        if opt == NBD_OPT_INFO or opt == NBD_OPT_GO:
            return self._opt_info_go(opt, data)
        if opt == NBD_OPT_STRUCTURED_REPLY:
            if data:
                self._reply(opt, NBD_REP_ERR_INVALID, b"option takes no data")
            elif self._structured:
                self._reply(opt, NBD_REP_ERR_INVALID, b"structured replies already negotiated")
            else:
                self._structured = True
                self._reply(opt, NBD_REP_ACK)
            return None
        if opt == NBD_OPT_LIST_META_CONTEXT or opt == NBD_OPT_SET_META_CONTEXT:
            self._opt_meta(opt, data)
            return None
        self._reply(opt, NBD_REP_ERR_UNSUP, b"unknown option")
        return None

    def _opt_starttls(self, data: bytes):
        opt = NBD_OPT_STARTTLS
        if self._tls == TLS_OFF:
            self._reply(opt, NBD_REP_ERR_UNSUP, b"TLS is not supported")
        elif data:
            self._reply(opt, NBD_REP_ERR_INVALID, b"NBD_OPT_STARTTLS takes no data")
        elif self._tls_active:
            self._reply(opt, NBD_REP_ERR_INVALID, b"TLS is already negotiated")
        else:
            self._reply(opt, NBD_REP_ACK)
            self._tls_pending = True
            if len(self._buf) - self._pos:
                raise RemoteProtocolError("data after NBD_OPT_STARTTLS before the TLS handshake")
            return StartTLS()
        return None

    def tls_started(self) -> None:
        """The IO layer finished the TLS handshake after `StartTLS`: what
        arrives from now on is the decrypted stream. Option state negotiated
        before STARTTLS is forgotten (spec)."""
        if not self._tls_pending:
            raise LocalProtocolError("tls_started() without a StartTLS event")
        self._tls_pending = False
        self._tls_active = True
        self._structured = False
        self._meta = {}
        self._meta_export = None

    def _opt_info_go(self, opt: int, data: bytes):
        # u32 name length, name, u16 n, n * u16 info requests -- exactly.
        n = len(data)
        if n < 6:
            self._reply(opt, NBD_REP_ERR_INVALID, b"option data too short")
            return None
        (namelen,) = _U32.unpack_from(data, 0)
        if namelen > n - 6:
            self._reply(opt, NBD_REP_ERR_INVALID, b"name length exceeds option")
            return None
        (nreq,) = _U16.unpack_from(data, 4 + namelen)
        if n != 6 + namelen + 2 * nreq:
            self._reply(opt, NBD_REP_ERR_INVALID, b"bad information request list")
            return None
        try:
            name = data[4:4 + namelen].decode()
        except UnicodeDecodeError:
            self._reply(opt, NBD_REP_ERR_INVALID, b"export name is not UTF-8")
            return None
        requests = {_U16.unpack_from(data, 6 + namelen + 2 * i)[0] for i in range(nreq)}
        export = self._provider.lookup(name)
        if export is None:
            self._reply(opt, NBD_REP_ERR_UNKNOWN, b"unknown export")
            return None
        flags = transmission_flags(export, self._structured)
        self._reply(opt, NBD_REP_INFO, _INFO_EXPORT.pack(NBD_INFO_EXPORT, export.size, flags))
        # Never advertise a max payload larger than this codec accepts.
        self._reply(opt, NBD_REP_INFO, _INFO_BLOCK_SIZE.pack(
            NBD_INFO_BLOCK_SIZE, export.min_block, export.pref_block,
            min(export.max_block, self._max_payload)))
        if NBD_INFO_NAME in requests:
            self._reply(opt, NBD_REP_INFO, _U16.pack(NBD_INFO_NAME) + export.name.encode())
        if NBD_INFO_DESCRIPTION in requests:
            self._reply(opt, NBD_REP_INFO,
                        _U16.pack(NBD_INFO_DESCRIPTION) + export.description.encode())
        self._reply(opt, NBD_REP_ACK)
        if opt == NBD_OPT_GO:
            return self._enter_transmission(export)
        return None

    def _opt_meta(self, opt: int, data: bytes) -> None:
        is_set = opt == NBD_OPT_SET_META_CONTEXT
        if is_set:
            # SET replaces the selection even when it fails.
            self._meta = {}
            self._meta_export = None
            if not self._structured:
                self._reply(opt, NBD_REP_ERR_INVALID, b"negotiate structured replies first")
                return
        parsed = _parse_meta_request(data)
        if parsed is None:
            self._reply(opt, NBD_REP_ERR_INVALID, b"malformed meta context request")
            return
        name, queries = parsed
        export = self._provider.lookup(name)
        if export is None:
            self._reply(opt, NBD_REP_ERR_UNKNOWN, b"unknown export")
            return
        if is_set:
            # "base:" selects nothing in SET; unknown namespaces/leaves are ignored.
            if _BASE_ALLOCATION_B in queries:
                self._meta = {BASE_ALLOCATION_ID: BASE_ALLOCATION}
                self._meta_export = export.name
                self._reply(opt, NBD_REP_META_CONTEXT,
                            _U32.pack(BASE_ALLOCATION_ID) + _BASE_ALLOCATION_B)
        elif not queries or b"base:" in queries or _BASE_ALLOCATION_B in queries:
            # LIST: no query = everything; the id is reserved (0) in LIST replies.
            self._reply(opt, NBD_REP_META_CONTEXT, _U32.pack(0) + _BASE_ALLOCATION_B)
        self._reply(opt, NBD_REP_ACK)

    # -- output ----------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Handshake bytes queued so far (the greeting first); then cleared."""
        if self._error is not None:
            raise self._error
        out = b"".join(self._out)
        self._out.clear()
        return out

    def _check_reply(self) -> None:
        if self._error is not None:
            raise self._error
        # After Disconnect/EOF in transmission, in-flight requests may still
        # complete; replying to them is allowed (the IO layer may drop them).
        if self._export is None:
            raise LocalProtocolError(f"cannot send a transmission reply in phase {self.phase}")

    def reply_ok(self, handle: int) -> bytes:
        self._check_reply()
        if self._structured:
            return _CHUNK.pack(NBD_STRUCTURED_REPLY_MAGIC, NBD_REPLY_FLAG_DONE,
                               NBD_REPLY_TYPE_NONE, handle, 0)
        return _SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, 0, handle)

    def reply_error(self, handle: int, nbd_errno: int, message: str = "") -> bytes:
        self._check_reply()
        if nbd_errno not in _NBD_ERRNOS:
            raise LocalProtocolError(f"{nbd_errno} is not an NBD errno (use errno_to_nbd)")
        if not self._structured:
            return _SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, nbd_errno, handle)
        msg = message.encode()[:_MAX_STRING]
        if len(msg) != len(message.encode()):
            msg = msg.decode(errors="ignore").encode()  # don't cut a UTF-8 sequence
        return _CHUNK_ERROR.pack(NBD_STRUCTURED_REPLY_MAGIC, NBD_REPLY_FLAG_DONE,
                                 NBD_REPLY_TYPE_ERROR, handle, 6 + len(msg),
                                 nbd_errno, len(msg)) + msg

    def reply_read(self, handle: int, offset: int, data) -> list:
        """[header, data]: the data is never copied."""
        self._check_reply()
        if not self._structured:
            return [_SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, 0, handle), data]
        n = len(data)
        if n == 0:  # an OFFSET_DATA chunk must carry data
            return [_CHUNK.pack(NBD_STRUCTURED_REPLY_MAGIC, NBD_REPLY_FLAG_DONE,
                                NBD_REPLY_TYPE_NONE, handle, 0)]
        return [_CHUNK_OFFSET_DATA.pack(NBD_STRUCTURED_REPLY_MAGIC, NBD_REPLY_FLAG_DONE,
                                        NBD_REPLY_TYPE_OFFSET_DATA, handle, 8 + n, offset),
                data]

    def reply_block_status(self, handle: int, context_id: int,
                           extents: list[tuple[int, int]]) -> bytes:
        self._check_reply()
        if not self._structured:
            raise LocalProtocolError("block status needs structured replies")
        if context_id not in self._meta:
            raise LocalProtocolError(f"meta context {context_id} was not negotiated")
        if not extents:
            raise LocalProtocolError("block status needs at least one extent")
        n = len(extents)
        head = _CHUNK_BLOCK_STATUS.pack(NBD_STRUCTURED_REPLY_MAGIC, NBD_REPLY_FLAG_DONE,
                                        NBD_REPLY_TYPE_BLOCK_STATUS, handle, 4 + 8 * n,
                                        context_id)
        body = bytearray(8 * n)
        for i, (length, flags) in enumerate(extents):
            _EXTENT.pack_into(body, 8 * i, length, flags)
        return head + body

    # -- introspection -----------------------------------------------------

    @property
    def export(self) -> ExportInfo | None:
        return self._export

    @property
    def structured(self) -> bool:
        return self._structured

    @property
    def tls_active(self) -> bool:
        return self._tls_active

    def statistics(self) -> ConnectionStatistics:
        return ConnectionStatistics(
            phase=self.phase,
            buffered=len(self._buf) - self._pos,
            buffer_size=len(self._buf),
            sink_size=len(self._sink) if self._sink is not None else 0,
            requests=self._n_requests,
            rejected=self._n_rejected,
            discarded_bytes=self._n_discarded,
        )


def _parse_meta_request(data: bytes) -> tuple[str, list[bytes]] | None:
    """u32 len, export name, u32 n, n * (u32 len, query) -- exactly, else None."""
    n = len(data)
    if n < 8:
        return None
    (namelen,) = _U32.unpack_from(data, 0)
    pos = 4 + namelen
    if pos + 4 > n:
        return None
    try:
        name = data[4:pos].decode()
    except UnicodeDecodeError:
        return None
    (nq,) = _U32.unpack_from(data, pos)
    pos += 4
    if nq > (n - pos) // 4:   # each query needs >= 4 bytes; rejects absurd counts early
        return None
    queries = []
    for _ in range(nq):
        if pos + 4 > n:
            return None
        (qlen,) = _U32.unpack_from(data, pos)
        pos += 4
        if pos + qlen > n:
            return None
        queries.append(data[pos:pos + qlen])
        pos += qlen
    if pos != n:
        return None
    return name, queries


# ---------------------------------------------------------------------------
# Client side (what failback writes production with)
# ---------------------------------------------------------------------------
#
# Rules of the client codec:
# 1. Phases: ``greeting`` -> ``options`` -> ``transmission``.  The client asks
#    for one export with NBD_OPT_GO (no structured replies, no meta contexts),
#    so every transmission reply is a simple reply.
# 2. ``next_event()`` returns NEED_DATA, `ExportReady` once (the export's size
#    and transmission flags), then one `Reply` per answered request.
# 3. Anything the server says that breaks the protocol, or a refused export,
#    raises RemoteProtocolError (sticky, as on the server side).
# 4. ``request()`` returns the request header; the caller sends a WRITE's
#    payload after it (no copy of large payloads into the codec).
# 5. A successful READ's simple reply is followed by exactly the requested
#    length of data: the codec remembers each READ's length by handle and
#    returns the `Reply` (with ``data``) only once all of it arrived; a
#    failed READ carries no data (as the server side sends it).

@dataclass(frozen=True, slots=True)
class ExportReady:
    """OPT_GO acknowledged: transmission starts on this export."""
    size: int
    flags: int  # transmission flags


@dataclass(frozen=True, slots=True)
class Reply:
    """A simple reply to the request with ``handle`` (error = NBD errno, 0 = ok);
    ``data``: a successful READ's payload."""
    handle: int
    error: int
    data: bytes = b""


class ClientConnection:
    """Sans-IO NBD client: fixed newstyle handshake, NBD_OPT_GO, simple replies."""

    def __init__(self, export: str) -> None:
        self.export = export
        self.phase = "greeting"
        self._in = bytearray()
        self._out = bytearray()
        self._size: int | None = None
        self._flags: int | None = None
        self._error: RemoteProtocolError | None = None
        self._reads: dict[int, int] = {}  # handle -> length of a READ awaiting its reply

    def receive_data(self, data: bytes) -> None:
        if not data:
            self._fail("the server closed the connection")
        self._in += data

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def _fail(self, why: str) -> None:
        self._error = RemoteProtocolError(why)
        raise self._error

    def next_event(self):
        if self._error is not None:
            raise self._error
        if self.phase == "greeting":
            if len(self._in) < _GREETING.size:
                return NEED_DATA
            magic, opt, hflags = _GREETING.unpack_from(self._in)
            del self._in[:_GREETING.size]
            if magic != NBDMAGIC or opt != IHAVEOPT or not hflags & NBD_FLAG_FIXED_NEWSTYLE:
                self._fail("not a fixed-newstyle NBD server")
            cflags = NBD_FLAG_C_FIXED_NEWSTYLE | (NBD_FLAG_C_NO_ZEROES if hflags & NBD_FLAG_NO_ZEROES else 0)
            name = self.export.encode()
            body = _U32.pack(len(name)) + name + _U16.pack(0)  # no NBD_INFO requests: EXPORT comes anyway
            self._out += _CLIENT_FLAGS.pack(cflags) + _OPTION.pack(IHAVEOPT, NBD_OPT_GO, len(body)) + body
            self.phase = "options"
        if self.phase == "options":
            while len(self._in) >= _OPTION_REPLY.size:
                rmagic, ropt, rtype, rlen = _OPTION_REPLY.unpack_from(self._in)
                if len(self._in) < _OPTION_REPLY.size + rlen:
                    return NEED_DATA
                data = bytes(self._in[_OPTION_REPLY.size:_OPTION_REPLY.size + rlen])
                del self._in[:_OPTION_REPLY.size + rlen]
                if rmagic != NBD_OPT_REPLY_MAGIC or ropt != NBD_OPT_GO:
                    self._fail("bad option reply")
                if rtype == NBD_REP_ACK:
                    if self._size is None or self._flags is None:
                        self._fail("the server did not say the export's size")
                    self.phase = "transmission"
                    return ExportReady(self._size, self._flags)
                if rtype & _REP_ERR:
                    why = data.decode(errors="replace") or f"error {rtype & 0x7FFFFFFF}"
                    self._fail(f"export {self.export!r} refused: {why}")
                if rtype == NBD_REP_INFO and len(data) >= _INFO_EXPORT.size \
                        and _U16.unpack_from(data)[0] == NBD_INFO_EXPORT:
                    _, self._size, self._flags = _INFO_EXPORT.unpack_from(data)
            return NEED_DATA
        if len(self._in) < _SIMPLE_REPLY.size:
            return NEED_DATA
        magic, err, handle = _SIMPLE_REPLY.unpack_from(self._in)
        if magic != NBD_SIMPLE_REPLY_MAGIC:
            self._fail(f"unexpected reply (magic {magic:#x}, cookie {handle})")
        n = self._reads.get(handle, 0) if not err else 0
        if len(self._in) < _SIMPLE_REPLY.size + n:
            return NEED_DATA  # a READ's data is still on its way
        data = bytes(self._in[_SIMPLE_REPLY.size:_SIMPLE_REPLY.size + n])
        del self._in[:_SIMPLE_REPLY.size + n]
        self._reads.pop(handle, None)
        return Reply(handle, err, data)

    def request(self, cmd: int, handle: int, offset: int = 0, length: int = 0, flags: int = 0) -> bytes:
        """The header of a transmission request (a WRITE's payload follows it)."""
        if self.phase != "transmission":
            raise LocalProtocolError(f"request in phase {self.phase}")
        if cmd == NBD_CMD_READ:
            if handle in self._reads:
                raise LocalProtocolError(f"READ with cookie {handle} already in flight")
            self._reads[handle] = length
        return _REQUEST.pack(NBD_REQUEST_MAGIC, flags, cmd, handle, offset, length)
