"""Tests for the sans-IO NBD server codec (nicsplit.wire.nbd).

A small client-side encoder/decoder written independently of the codec
(literal struct formats) drives the server; replies are checked byte for byte.
The end of the file runs real libnbd against the codec and diffs its errno
choices with nbdkit (both required: a missing tool fails the suite).
"""

from __future__ import annotations

import errno
import socket
import struct
import threading

import pytest

from nicsplit.testing.procs import import_libnbd

from nicsplit.wire import nbd as N
from nicsplit.wire.nbd import (
    NEED_DATA, Closed, Disconnect, ExportInfo, LocalProtocolError, Negotiated,
    RemoteProtocolError, Request, ServerConnection, errno_to_nbd,
)

MiB = 1 << 20
SIZE = 1 * MiB

# ---------------------------------------------------------------------------
# client-side encoder / decoder (independent of the codec's structs)
# ---------------------------------------------------------------------------

IHAVEOPT = b"IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9


def cflags(f: int = 3) -> bytes:
    return struct.pack(">I", f)


def option(opt: int, data: bytes = b"", length: int | None = None) -> bytes:
    return IHAVEOPT + struct.pack(">II", opt, len(data) if length is None else length) + data


def info_data(name: bytes = b"", infos=()) -> bytes:
    return (struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos))
            + b"".join(struct.pack(">H", i) for i in infos))


def meta_data(name: bytes = b"", queries=()) -> bytes:
    return (struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
            + b"".join(struct.pack(">I", len(q)) + q for q in queries))


def request(cmd: int, handle: int = 1, offset: int = 0, length: int = 0,
            flags: int = 0, data: bytes = b"", magic: int = 0x25609513) -> bytes:
    return struct.pack(">IHHQQI", magic, flags, cmd, handle, offset, length) + data


def parse_option_replies(buf: bytes) -> list[tuple[int, int, bytes]]:
    out, pos = [], 0
    while pos < len(buf):
        magic, opt, rtype, ln = struct.unpack_from(">QIII", buf, pos)
        assert magic == OPT_REPLY_MAGIC
        out.append((opt, rtype, buf[pos + 20:pos + 20 + ln]))
        pos += 20 + ln
    assert pos == len(buf)
    return out


def simple(err: int, handle: int) -> bytes:
    return struct.pack(">IIQ", 0x67446698, err, handle)


def chunk(flags: int, rtype: int, handle: int, payload: bytes) -> bytes:
    return struct.pack(">IHHQI", 0x668E33EF, flags, rtype, handle, len(payload)) + payload


def flat(reply) -> bytes:
    return b"".join(bytes(x) for x in reply) if isinstance(reply, list) else reply


class Provider:
    def __init__(self, *exports: ExportInfo) -> None:
        self.exports = {e.name: e for e in exports}
        self.default = exports[0]

    def lookup(self, name: str) -> ExportInfo | None:
        return self.default if name == "" else self.exports.get(name)

    def list_exports(self) -> list[ExportInfo]:
        return list(self.exports.values())


DISK = ExportInfo("disk", SIZE, description="test disk")
RO = ExportInfo("ro", SIZE, readonly=True)
PLAIN = ExportInfo("plain", SIZE, can_flush=False, can_fua=False, can_trim=False,
                   can_zero=False, can_fast_zero=False, can_multi_conn=False)
NOFAST = ExportInfo("nofast", SIZE, can_fast_zero=False)


def provider() -> Provider:
    return Provider(DISK, RO, PLAIN, NOFAST)


def drain(conn: ServerConnection) -> list:
    evs = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            return evs
        evs.append(ev)
        if isinstance(ev, (Closed, Disconnect)):
            return evs


def start(f: int = 3, **kw) -> ServerConnection:
    conn = ServerConnection(provider(), **kw)
    assert conn.data_to_send() == b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"
    conn.receive_data(cflags(f))
    assert drain(conn) == []
    return conn


def opt_exchange(conn: ServerConnection, *frames: bytes):
    conn.receive_data(b"".join(frames))
    evs = drain(conn)
    return evs, parse_option_replies(conn.data_to_send())


def negotiate(structured=True, meta=True, export=b"disk", **kw) -> tuple[ServerConnection, Negotiated]:
    conn = start(**kw)
    frames = []
    if structured:
        frames.append(option(8))
    if meta:
        frames.append(option(10, meta_data(export, [b"base:allocation"])))
    frames.append(option(7, info_data(export)))
    evs, _ = opt_exchange(conn, *frames)
    assert len(evs) == 1 and isinstance(evs[0], Negotiated)
    assert conn.phase == "transmission"
    return conn, evs[0]


def one(conn: ServerConnection, frame: bytes):
    conn.receive_data(frame)
    evs = drain(conn)
    assert len(evs) == 1, evs
    return evs[0]


ACK, SERVER, INFO, META = 1, 2, 3, 4
ERR_UNSUP, ERR_INVALID, ERR_UNKNOWN, ERR_TOO_BIG = (2**31 + 1, 2**31 + 3, 2**31 + 6, 2**31 + 9)
FLAGS_DISK = 0x1 | 0x4 | 0x8 | 0x20 | 0x40 | 0x100 | 0x800   # HAS|FLUSH|FUA|TRIM|ZEROES|MULTI|FAST


# ---------------------------------------------------------------------------
# handshake
# ---------------------------------------------------------------------------

def test_greeting_and_phase():
    conn = ServerConnection(provider())
    assert conn.phase == "handshake"
    assert conn.data_to_send() == bytes.fromhex("4e42444d41474943" "49484156454f5054" "0003")
    assert conn.data_to_send() == b""
    assert conn.next_event() is NEED_DATA


def test_unknown_client_flags_is_fatal_and_sticky():
    conn = ServerConnection(provider())
    conn.receive_data(cflags(4))
    with pytest.raises(RemoteProtocolError, match="client flags"):
        conn.next_event()
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    with pytest.raises(RemoteProtocolError):
        conn.receive_data(b"x")
    assert conn.phase == "closed"


def test_bad_option_magic():
    conn = start()
    conn.receive_data(b"IHAVEOPX" + struct.pack(">II", 7, 0))
    with pytest.raises(RemoteProtocolError, match="magic"):
        conn.next_event()


@pytest.mark.parametrize("f,tail", [(3, b""), (1, bytes(124))])
def test_export_name(f, tail):
    conn = start(f)
    conn.receive_data(option(1, b"disk"))
    [ev] = drain(conn)
    assert ev == Negotiated(DISK, False, {}, FLAGS_DISK)
    assert conn.data_to_send() == struct.pack(">QH", SIZE, FLAGS_DISK) + tail
    assert conn.phase == "transmission"


def test_export_name_default_and_meta_carry_over():
    conn = start()
    conn.receive_data(option(8) + option(10, meta_data(b"", [b"base:allocation"])) + option(1, b""))
    evs = drain(conn)
    assert conn.data_to_send().endswith(struct.pack(">QH", SIZE, FLAGS_DISK | 0x80))
    assert evs == [Negotiated(DISK, True, {1: "base:allocation"}, FLAGS_DISK | 0x80)]


def test_export_name_unknown_is_fatal():
    conn = start()
    conn.receive_data(option(1, b"nope"))
    with pytest.raises(RemoteProtocolError, match="unknown export"):
        conn.next_event()


def test_export_name_too_long_is_fatal():
    conn = start(max_option_length=100)
    conn.receive_data(option(1, length=101))
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


@pytest.mark.parametrize("data", [b"", b"ignored"])
def test_abort(data):
    conn = start()
    evs, reps = opt_exchange(conn, option(2, data), option(3))  # nothing after ABORT is read
    assert evs == [Closed("abort")]
    assert reps == [(2, ACK, b"")]
    assert conn.phase == "closed"
    assert conn.next_event() == Closed("abort")
    conn.receive_data(b"junk after close is dropped")
    assert conn.statistics().buffered == 0


def test_list():
    conn = start()
    _, reps = opt_exchange(conn, option(3), option(3, b"x"))
    assert reps == [
        (3, SERVER, b"\0\0\0\x04disk" + b"test disk"),
        (3, SERVER, b"\0\0\0\x02ro"),
        (3, SERVER, b"\0\0\0\x05plain"),
        (3, SERVER, b"\0\0\0\x06nofast"),
        (3, ACK, b""),
        (3, ERR_INVALID, b"NBD_OPT_LIST takes no data"),
    ]


def test_info_and_go_replies():
    conn = start()
    evs, reps = opt_exchange(conn, option(6, info_data(b"disk", [1, 2, 3, 77])))
    assert evs == [] and conn.phase == "handshake"
    assert reps == [
        (6, INFO, struct.pack(">HQH", 0, SIZE, FLAGS_DISK)),
        (6, INFO, struct.pack(">HIII", 3, 1, 4096, 32 * MiB)),
        (6, INFO, b"\0\x01disk"),
        (6, INFO, b"\0\x02test disk"),
        (6, ACK, b""),
    ]
    # GO after STRUCTURED_REPLY: DF appears; no NAME/DESCRIPTION unless asked
    evs, reps = opt_exchange(conn, option(8), option(7, info_data(b"")))
    assert reps == [
        (8, ACK, b""),
        (7, INFO, struct.pack(">HQH", 0, SIZE, FLAGS_DISK | 0x80)),
        (7, INFO, struct.pack(">HIII", 3, 1, 4096, 32 * MiB)),
        (7, ACK, b""),
    ]
    assert evs == [Negotiated(DISK, True, {}, FLAGS_DISK | 0x80)]


def test_go_block_size_capped_by_max_payload_and_readonly_flags():
    conn = start(max_payload=MiB)
    _, reps = opt_exchange(conn, option(6, info_data(b"ro")))
    assert reps[0] == (6, INFO, struct.pack(">HQH", 0, SIZE, 0x1 | 0x2 | 0x4 | 0x100))
    assert reps[1] == (6, INFO, struct.pack(">HIII", 3, 1, 4096, MiB))
    _, reps = opt_exchange(conn, option(6, info_data(b"plain")))
    assert reps[0] == (6, INFO, struct.pack(">HQH", 0, SIZE, 0x1))


@pytest.mark.parametrize("opt", [6, 7])
@pytest.mark.parametrize("data,rep", [
    (info_data(b"nope"), ERR_UNKNOWN),
    (b"", ERR_INVALID),
    (b"\0\0\0\x05abc", ERR_INVALID),                       # name longer than option
    (info_data(b"disk", [1]) + b"z", ERR_INVALID),          # trailing byte
    (info_data(b"disk", [1])[:-1], ERR_INVALID),            # truncated request list
    (b"\0\0\0\x02\xff\xfe\0\0", ERR_INVALID),               # name not UTF-8
])
def test_info_go_errors(opt, data, rep):
    conn = start()
    evs, reps = opt_exchange(conn, option(opt, data))
    assert evs == [] and conn.phase == "handshake"
    assert [(o, t) for o, t, _ in reps] == [(opt, rep)]


def test_structured_reply_option():
    conn = start()
    _, reps = opt_exchange(conn, option(8, b"x"), option(8), option(8))
    assert [(o, t) for o, t, _ in reps] == [(8, ERR_INVALID), (8, ACK), (8, ERR_INVALID)]
    assert conn.structured


def test_list_meta_context():
    conn = start()  # LIST is allowed before structured replies
    _, reps = opt_exchange(
        conn,
        option(9, meta_data(b"disk")),                                  # no query: all
        option(9, meta_data(b"", [b"base:"])),                           # wildcard
        option(9, meta_data(b"", [b"base:allocation", b"base:allocation"])),
        option(9, meta_data(b"", [b"qemu:dirty-bitmap:a", b"base:nope", b"nocolon"])),
        option(9, meta_data(b"nope")),
        option(9, meta_data(b"", [b"base:"])[:-1]),                      # truncated
        option(9, meta_data(b"", [b"base:"]) + b"x"),                    # trailing
        option(9, b"\0\0\0\0\xff\xff\xff\xff"),                          # absurd count
    )
    ctx = (9, META, b"\0\0\0\0base:allocation")
    assert reps == [ctx, (9, ACK, b""), ctx, (9, ACK, b""), ctx, (9, ACK, b""), (9, ACK, b""),
                    (9, ERR_UNKNOWN, b"unknown export"),
                    (9, ERR_INVALID, b"malformed meta context request"),
                    (9, ERR_INVALID, b"malformed meta context request"),
                    (9, ERR_INVALID, b"malformed meta context request")]


def test_set_meta_context():
    conn = start()
    _, reps = opt_exchange(conn, option(10, meta_data(b"", [b"base:allocation"])))
    assert [(o, t) for o, t, _ in reps] == [(10, ERR_INVALID)]  # structured first
    _, reps = opt_exchange(
        conn, option(8),
        option(10, meta_data(b"disk", [b"base:allocation", b"base:allocation", b"x-y:z"])),
        option(10, meta_data(b"nope", [b"base:allocation"])),
        option(10, meta_data(b"", [b"base:"])),
    )
    assert reps == [(8, ACK, b""), (10, META, b"\0\0\0\x01base:allocation"), (10, ACK, b""),
                    (10, ERR_UNKNOWN, b"unknown export"), (10, ACK, b"")]


@pytest.mark.parametrize("frames,expect", [
    # a later SET replaces the selection, even an empty or failing one
    ([option(10, meta_data(b"", [b"base:allocation"])), option(10, meta_data(b""))], {}),
    ([option(10, meta_data(b"", [b"base:allocation"])), option(10, meta_data(b"nope", []))], {}),
    ([option(10, meta_data(b"", [b"base:allocation"])), option(10, b"bad")], {}),
    # contexts chosen for another export do not carry over
    ([option(10, meta_data(b"ro", [b"base:allocation"]))], {}),
    # "" and "disk" are the same export
    ([option(10, meta_data(b"", [b"base:allocation"]))], {1: "base:allocation"}),
])
def test_set_meta_context_selection(frames, expect):
    conn = start()
    evs, _ = opt_exchange(conn, option(8), *frames, option(7, info_data(b"disk")))
    assert evs[0].meta_contexts == expect


@pytest.mark.parametrize("opt", [5, 4, 11, 99, 0xFFFFFFFF])
def test_unsupported_options(opt):
    conn = start()
    _, reps = opt_exchange(conn, option(opt, b"data"), option(opt))
    assert [(o, t) for o, t, _ in reps] == [(opt, ERR_UNSUP), (opt, ERR_UNSUP)]


def test_too_big_option_is_discarded_without_buffering():
    conn = start(max_option_length=1024)
    conn.receive_data(option(6, length=10 * MiB))
    assert drain(conn) == []
    for _ in range(10 * 16):
        conn.receive_data(bytes(64 * 1024))
        assert drain(conn) == []
        st = conn.statistics()
        assert st.buffered == 0 and st.buffer_size <= 64 * 1024 + 16 and st.sink_size == 0
    evs, reps = opt_exchange(conn, option(7, info_data()))
    assert [(o, t) for o, t, _ in reps][0] == (6, ERR_TOO_BIG)
    assert isinstance(evs[0], Negotiated)
    assert conn.statistics().discarded_bytes == 10 * MiB


def test_handshake_eof():
    conn = ServerConnection(provider())
    conn.receive_data(b"")
    assert conn.next_event() == Closed("eof")
    conn = start()
    conn.receive_data(b"")
    assert conn.next_event() == Closed("eof")
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"more")
    for partial in (cflags()[:2], cflags() + option(7, info_data())[:10],
                    cflags() + option(7, info_data())[:-1]):
        conn = ServerConnection(provider())
        conn.receive_data(partial)
        conn.receive_data(b"")
        with pytest.raises(RemoteProtocolError, match="truncated"):
            drain(conn)


def test_reply_in_handshake_is_local_error():
    conn = start()
    with pytest.raises(LocalProtocolError):
        conn.reply_ok(1)


# ---------------------------------------------------------------------------
# transmission
# ---------------------------------------------------------------------------

def test_valid_commands():
    conn, _ = negotiate()
    cases = [
        (request(0, 1, 512, 4096, flags=4), Request(1, 0, 4, 512, 4096, None, 0)),   # READ+DF
        (request(0, 2, 0, 1, flags=1), Request(2, 0, 1, 0, 1, None, 0)),             # READ+FUA ok
        (request(1, 3, 10, 3, flags=1, data=b"abc"), Request(3, 1, 1, 10, 3, b"abc", 0)),
        (request(3, 4), Request(4, 3, 0, 0, 0, None, 0)),
        (request(4, 5, 0, SIZE, flags=1), Request(5, 4, 1, 0, SIZE, None, 0)),
        (request(6, 6, 0, SIZE, flags=1 | 2 | 16), Request(6, 6, 19, 0, SIZE, None, 0)),
        (request(7, 7, 0, SIZE, flags=8), Request(7, 7, 8, 0, SIZE, None, 0)),
        (request(0, 2**64 - 1, SIZE - 1, 1), Request(2**64 - 1, 0, 0, SIZE - 1, 1, None, 0)),
    ]
    conn.receive_data(b"".join(f for f, _ in cases))
    assert drain(conn) == [e for _, e in cases]
    assert one(conn, request(2, 9)) == Disconnect()
    assert conn.phase == "closed"
    assert conn.next_event() == Disconnect()


BIG = 32 * MiB + 1
U64 = 2**64 - 1
EINVAL, EPERM, ENOSPC = N.NBD_EINVAL, N.NBD_EPERM, N.NBD_ENOSPC


@pytest.mark.parametrize("export,structured,meta,cmd,flags,offset,length,err", [
    # unknown commands; CACHE is not advertised
    (b"disk", True, True, 8, 0, 0, 512, EINVAL),
    (b"disk", True, True, 0xFFFF, 0, 0, 512, EINVAL),
    (b"disk", True, True, 5, 0, 0, 512, EINVAL),
    # flags not valid for the command
    (b"disk", True, True, 0, 2, 0, 512, EINVAL),        # READ NO_HOLE
    (b"disk", True, True, 0, 8, 0, 512, EINVAL),        # READ REQ_ONE
    (b"disk", False, False, 0, 4, 0, 512, EINVAL),      # READ DF without structured
    (b"disk", True, True, 4, 16, 0, 512, EINVAL),       # TRIM FAST_ZERO
    (b"disk", True, True, 4, 2, 0, 512, EINVAL),        # TRIM NO_HOLE
    (b"disk", True, True, 3, 4, 0, 0, EINVAL),          # FLUSH DF
    (b"disk", True, True, 7, 4, 0, 512, EINVAL),        # BLOCK_STATUS DF
    (b"disk", True, True, 0, 0x20, 0, 512, EINVAL),     # unknown flag bit
    (b"disk", True, True, 0, 0x8000, 0, 512, EINVAL),
    (b"nofast", True, True, 6, 16, 0, 512, EINVAL),     # FAST_ZERO not advertised
    (b"plain", True, True, 0, 1, 0, 512, EINVAL),       # FUA not advertised
    # capability off
    (b"plain", True, True, 3, 0, 0, 0, EINVAL),
    (b"plain", True, True, 4, 0, 0, 512, EINVAL),
    (b"plain", True, True, 6, 0, 0, 512, EINVAL),
    # FLUSH must have offset = length = 0 (nbdkit)
    (b"disk", True, True, 3, 0, 512, 0, EINVAL),
    (b"disk", True, True, 3, 0, 0, 512, EINVAL),
    # read-only export: EPERM wins over range and flag errors (nbdkit order)
    (b"ro", True, True, 4, 0, 0, 512, EPERM),
    (b"ro", True, True, 6, 0, 0, 512, EPERM),
    (b"ro", True, True, 6, 2, SIZE, 512, EPERM),
    (b"ro", True, True, 0, 0, 0, 512, 0),
    (b"ro", True, True, 0, 1, 0, 512, EINVAL),        # no FUA on read-only (nbdkit -r)
    # out of range, offset + length overflow, zero length
    (b"disk", True, True, 0, 0, SIZE - 511, 512, EINVAL),
    (b"disk", True, True, 4, 0, SIZE, 1, EINVAL),
    (b"disk", True, True, 7, 0, SIZE, 1, EINVAL),
    (b"disk", True, True, 6, 0, SIZE - 1, 2, ENOSPC),
    (b"disk", True, True, 0, 0, U64, 2, EINVAL),
    (b"disk", True, True, 6, 0, U64, 2, ENOSPC),
    (b"disk", True, True, 0, 0, 0, 0, EINVAL),
    (b"disk", True, True, 4, 0, 0, 0, EINVAL),
    (b"disk", True, True, 6, 0, 0, 0, ENOSPC),
    (b"disk", True, True, 7, 0, 0, 0, EINVAL),
    (b"disk", True, True, 5, 0, 0, 0, EINVAL),
    # range errors are checked before flag errors (nbdkit order)
    (b"disk", True, True, 6, 8, SIZE, 512, ENOSPC),
    # block status without a meta context
    (b"disk", True, False, 7, 0, 0, 512, EINVAL),
    (b"disk", False, False, 7, 0, 0, 512, EINVAL),
])
def test_request_validation(export, structured, meta, cmd, flags, offset, length, err):
    conn, _ = negotiate(structured, meta, export)
    ev = one(conn, request(cmd, 42, offset, length, flags))
    assert ev == Request(42, cmd, flags, offset, length, None, err)


def test_oversize_read_is_einval():
    conn, _ = negotiate(max_payload=MiB // 2)
    assert one(conn, request(0, 1, 0, MiB // 2 + 1)).error == EINVAL
    assert one(conn, request(0, 1, 0, MiB // 2)).error == 0
    # max_payload does not apply to commands without payload
    assert one(conn, request(6, 1, 0, MiB)).error == 0


@pytest.mark.parametrize("export,offset,length,err", [
    (b"disk", SIZE, 8, ENOSPC),
    (b"disk", 0, 0, ENOSPC),
    (b"ro", 0, 8, EPERM),
    (b"disk", 0, 8, EINVAL),   # with a bad flag
])
def test_rejected_write_consumes_payload(export, offset, length, err):
    conn, _ = negotiate(export=export)
    flags = 2 if err == EINVAL else 0
    conn.receive_data(request(1, 5, offset, length, flags, b"x" * length) + request(0, 6, 0, 8))
    assert drain(conn) == [Request(5, 1, flags, offset, length, None, err),
                           Request(6, 0, 0, 0, 8, None, 0)]


def test_big_write_uses_sink_and_is_exact():
    conn, _ = negotiate()
    payload = bytes(range(256)) * 1024            # 256 KiB >= sink threshold
    frame = request(1, 9, 0, len(payload), data=payload) + request(3, 10)
    for i in range(0, len(frame), 10000):
        conn.receive_data(frame[i:i + 10000])
        evs = drain(conn)
        if evs:
            break
        assert conn.statistics().buffered < 10000
    evs += drain(conn)
    assert evs[0] == Request(9, 1, 0, 0, len(payload), payload, 0)
    assert isinstance(evs[0].data, memoryview)
    assert evs[1] == Request(10, 3, 0, 0, 0, None, 0)


def test_oversize_write_is_discarded_while_streaming():
    conn = ServerConnection(Provider(ExportInfo("big", 1 << 30)))
    conn.data_to_send()
    conn.receive_data(cflags() + option(7, info_data()))
    drain(conn)
    total = 40 * MiB
    conn.receive_data(request(1, 77, 0, total))
    events = drain(conn)
    step = 64 * 1024
    peak = 0
    for i in range(total // step):
        chunk_ = bytes(step)
        if i == total // step - 1:
            chunk_ += request(3, 78)   # next request rides on the last chunk
        conn.receive_data(chunk_)
        events += drain(conn)
        st = conn.statistics()
        peak = max(peak, st.buffer_size, st.sink_size)
    assert peak <= step + 64
    assert events == [Request(77, 1, 0, 0, total, None, EINVAL), Request(78, 3, 0, 0, 0, None, 0)]
    assert conn.statistics().discarded_bytes == total


def test_bad_request_magic_is_fatal_and_sticky():
    conn, _ = negotiate()
    conn.receive_data(request(0, 1, 0, 512, magic=0x25609514))
    with pytest.raises(RemoteProtocolError, match="magic"):
        conn.next_event()
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    with pytest.raises(RemoteProtocolError):
        conn.reply_ok(1)
    with pytest.raises(RemoteProtocolError):
        conn.data_to_send()


@pytest.mark.parametrize("tail", [request(0)[:27], request(1, length=8, data=b"abc"),
                                  request(1, length=100000, data=bytes(5000)),
                                  request(1, offset=SIZE, length=100, data=bytes(5))])
def test_transmission_truncated_at_eof(tail):
    conn, _ = negotiate()
    conn.receive_data(tail)
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="truncated"):
        drain(conn)


def test_transmission_eof_at_boundary():
    conn, _ = negotiate()
    conn.receive_data(request(3))
    conn.receive_data(b"")
    assert drain(conn) == [Request(1, 3, 0, 0, 0, None, 0), Closed("eof")]
    assert conn.phase == "closed"
    assert conn.reply_ok(1) == struct.pack(">IHHQI", 0x668E33EF, 1, 0, 1, 0)  # in-flight reply ok


# ---------------------------------------------------------------------------
# replies, byte for byte
# ---------------------------------------------------------------------------

def test_simple_replies():
    conn, _ = negotiate(structured=False, meta=False)
    assert conn.reply_ok(0x0102030405060708) == bytes.fromhex("67446698" "00000000" "0102030405060708")
    assert conn.reply_error(5, N.NBD_EIO, "ignored") == simple(5, 5)
    data = memoryview(b"hello")
    rep = conn.reply_read(6, 0, data)
    assert rep[0] == simple(0, 6) and rep[1] is data    # the payload is not copied
    with pytest.raises(LocalProtocolError):
        conn.reply_block_status(7, 1, [(512, 0)])


def test_structured_replies():
    conn, neg = negotiate()
    assert neg.meta_contexts == {1: "base:allocation"}
    assert conn.reply_ok(1) == bytes.fromhex("668e33ef" "0001" "0000" "0000000000000001" "00000000")
    assert conn.reply_error(2, N.NBD_ENOSPC, "full") == chunk(1, 0x8001, 2, b"\0\0\0\x1c\0\x04full")
    assert conn.reply_error(2, N.NBD_EIO) == chunk(1, 0x8001, 2, b"\0\0\0\x05\0\0")
    long = conn.reply_error(2, N.NBD_EIO, "é" * 3000)    # cut to <= 4096 bytes, on a char boundary
    assert struct.unpack_from(">H", long, 24)[0] == 4096
    data = b"x" * 100
    rep = conn.reply_read(3, 4096, data)
    assert rep[1] is data
    assert flat(rep) == chunk(1, 1, 3, struct.pack(">Q", 4096) + data)
    assert flat(conn.reply_read(3, 0, b"")) == chunk(1, 0, 3, b"")
    assert conn.reply_block_status(4, 1, [(4096, 0), (8192, 3)]) == chunk(
        1, 5, 4, struct.pack(">IIIII", 1, 4096, 0, 8192, 3))
    with pytest.raises(LocalProtocolError):
        conn.reply_block_status(4, 2, [(4096, 0)])
    with pytest.raises(LocalProtocolError):
        conn.reply_block_status(4, 1, [])
    with pytest.raises(LocalProtocolError):
        conn.reply_error(4, 2)          # ENOENT is not an NBD errno


def test_errno_to_nbd():
    assert errno_to_nbd(errno.EROFS) == N.NBD_EPERM
    assert errno_to_nbd(errno.EDQUOT) == N.NBD_ENOSPC
    assert errno_to_nbd(errno.EFBIG) == N.NBD_ENOSPC
    assert errno_to_nbd(errno.EOPNOTSUPP) == N.NBD_ENOTSUP
    assert errno_to_nbd(errno.EINVAL) == N.NBD_EINVAL
    assert errno_to_nbd(errno.ESHUTDOWN) == N.NBD_ESHUTDOWN
    assert errno_to_nbd(errno.ENOENT) == N.NBD_EIO


# ---------------------------------------------------------------------------
# every split point gives the same events and output
# ---------------------------------------------------------------------------

CONVERSATION = b"".join([
    cflags(),
    option(3), option(8), option(99, b"junk"), option(6, info_data(b"disk", [1, 2])),
    option(9, meta_data(b"", [b"base:"])), option(10, meta_data(b"", [b"base:allocation"])),
    option(7, info_data(b"", [3])),
    request(1, 1, 0, 5, data=b"hello"),
    request(0, 2, 0, 5, flags=4),
    request(1, 3, SIZE, 4, data=b"nope"),          # rejected, payload consumed
    request(6, 4, 0, 512, flags=2),
    request(7, 5, 0, SIZE, flags=8),
    request(9, 6),                                  # unknown command
    request(3, 7),
    request(2, 8),
])


def run(conn: ServerConnection, pieces) -> tuple[list, bytes]:
    out, evs = [conn.data_to_send()], []
    for p in pieces:
        if not p:
            continue   # b"" would mean EOF
        conn.receive_data(p)
        evs += drain(conn)
        out.append(conn.data_to_send())
    norm = [Request(e.handle, e.cmd, e.flags, e.offset, e.length,
                    None if e.data is None else bytes(e.data), e.error)
            if isinstance(e, Request) else e for e in evs]
    return norm, b"".join(out)


def test_conversation_at_every_split_point():
    ref_events, ref_out = run(ServerConnection(provider()), [CONVERSATION])
    assert ref_events[-1] == Disconnect() and len(ref_events) == 9
    assert [e.error for e in ref_events[1:-1]] == [0, 0, ENOSPC, 0, 0, EINVAL, 0]
    for i in range(len(CONVERSATION) + 1):
        got = run(ServerConnection(provider()), [CONVERSATION[:i], CONVERSATION[i:]])
        assert got == (ref_events, ref_out), f"split at {i}"
    bytewise = [CONVERSATION[i:i + 1] for i in range(len(CONVERSATION))]
    assert run(ServerConnection(provider()), bytewise) == (ref_events, ref_out)


# ---------------------------------------------------------------------------
# real clients: libnbd drives the codec, and its errnos are diffed with nbdkit
# ---------------------------------------------------------------------------

nbd = import_libnbd()  # a missing python3-libnbd is a failure, not a skip


def _serve(sock: socket.socket, prov: Provider) -> None:
    """A minimal blocking server around the codec (memory backend)."""
    disks = {e.name: bytearray(e.size) for e in prov.exports.values()}
    conn = ServerConnection(prov)
    disk = None
    try:
        sock.sendall(conn.data_to_send())
        while True:
            data = sock.recv(1 << 20)
            conn.receive_data(data)
            while (ev := conn.next_event()) is not NEED_DATA:
                sock.sendall(conn.data_to_send())
                if isinstance(ev, (Closed, Disconnect)):
                    return
                if isinstance(ev, Negotiated):
                    disk = disks[ev.export.name]
                    continue
                h, off, ln = ev.handle, ev.offset, ev.length
                if ev.error:
                    rep = conn.reply_error(h, ev.error, "rejected")
                elif ev.cmd == N.NBD_CMD_READ:
                    rep = b"".join(conn.reply_read(h, off, bytes(disk[off:off + ln])))
                elif ev.cmd == N.NBD_CMD_WRITE:
                    disk[off:off + ln] = ev.data
                    rep = conn.reply_ok(h)
                elif ev.cmd in (N.NBD_CMD_TRIM, N.NBD_CMD_WRITE_ZEROES):
                    disk[off:off + ln] = bytes(ln)
                    rep = conn.reply_ok(h)
                elif ev.cmd == N.NBD_CMD_BLOCK_STATUS:
                    rep = conn.reply_block_status(h, 1, [(ln, 0)])
                else:
                    rep = conn.reply_ok(h)
                sock.sendall(rep)
            sock.sendall(conn.data_to_send())
            if not data:
                return
    except (RemoteProtocolError, OSError):
        return
    finally:
        sock.close()


def _client(prov: Provider, export: str = "", structured: bool = True, meta: bool = True):
    a, b = socket.socketpair()
    t = threading.Thread(target=_serve, args=(a, prov), daemon=True)
    t.start()
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.set_export_name(export)
    h.set_request_structured_replies(structured)
    if meta:
        h.add_meta_context("base:allocation")
    h.connect_socket(b.detach())
    return h, t


def test_libnbd_roundtrip():
    h, t = _client(provider(), "disk")
    assert h.get_size() == SIZE and h.get_structured_replies_negotiated()
    assert h.can_meta_context("base:allocation") and h.can_fast_zero() and h.can_df()
    h.pwrite(b"abc" * 1000, 4096)
    h.pwrite(b"z" * (200 * 1024), 65536, nbd.CMD_FLAG_FUA)   # goes through the sink
    assert h.pread(3000, 4096) == b"abc" * 1000
    assert h.pread(200 * 1024, 65536) == b"z" * (200 * 1024)
    h.zero(1000, 4096, nbd.CMD_FLAG_NO_HOLE)
    assert h.pread(1000, 4096) == bytes(1000)
    h.flush()
    seen = []
    h.block_status(8192, 0, lambda ctx, off, ents, err: seen.append((ctx, ents)) or 0)
    assert seen == [("base:allocation", [8192, 0])]
    with pytest.raises(nbd.Error) as ei:
        h.pread(512, SIZE)
    assert ei.value.errno == "EINVAL"  # this binding reports the errno name
    h.shutdown()
    t.join(5)
    assert not t.is_alive()


def test_libnbd_options_and_readonly():
    h = nbd.NBD()
    h.set_opt_mode(True)
    a, b = socket.socketpair()
    t = threading.Thread(target=_serve, args=(a, provider()), daemon=True)
    t.start()
    h.connect_socket(b.detach())
    names = []
    h.opt_list(lambda name, desc: names.append((name, desc)) or 0)
    assert names == [("disk", "test disk"), ("ro", ""), ("plain", ""), ("nofast", "")]
    h.set_export_name("ro")
    h.opt_go()
    assert h.is_read_only() and not h.can_trim() and not h.can_zero()
    h.set_strict_mode(0)
    with pytest.raises(nbd.Error) as ei:
        h.pwrite(b"x", 0)
    assert ei.value.errno == "EPERM"
    h.shutdown()
    t.join(5)


PROBES = [
    ("read len0", lambda h: h.pread(0, 0)),
    ("write len0", lambda h: h.pwrite(b"", 0)),
    ("trim len0", lambda h: h.trim(0, 0)),
    ("zero len0", lambda h: h.zero(0, 0)),
    ("bs len0", lambda h: h.block_status(0, 0, lambda *a: 0)),
    ("read past end", lambda h: h.pread(512, SIZE - 256)),
    ("write past end", lambda h: h.pwrite(b"x" * 512, SIZE - 256)),
    ("trim past end", lambda h: h.trim(512, SIZE - 256)),
    ("zero past end", lambda h: h.zero(512, SIZE - 256)),
    ("bs past end", lambda h: h.block_status(512, SIZE - 256, lambda *a: 0)),
    ("read FUA", lambda h: h.pread(512, 0, 1)),
    ("flush FUA", lambda h: h.flush(1)),
    ("write NO_HOLE", lambda h: h.pwrite(b"x" * 512, 0, 2)),
    ("read DF", lambda h: h.pread(512, 0, 4)),
    ("write DF", lambda h: h.pwrite(b"x" * 512, 0, 4)),
    ("read REQ_ONE", lambda h: h.pread(512, 0, 8)),
    ("trim FAST_ZERO", lambda h: h.trim(512, 0, 16)),
    ("zero FAST|NO_HOLE", lambda h: h.zero(512, 0, 18)),
    ("write flag 0x20", lambda h: h.pwrite(b"x" * 512, 0, 0x20)),
]


def _probe(h) -> dict[str, int]:
    out = {}
    for name, fn in PROBES:
        try:
            fn(h)
            out[name] = 0
        except nbd.Error as e:
            out[name] = e.errno
    return out


@pytest.mark.parametrize("structured", [True, False])
@pytest.mark.parametrize("readonly", [False, True])
def test_errnos_match_nbdkit_memory(structured, readonly):
    ref = nbd.NBD()
    ref.set_strict_mode(0)
    ref.set_request_structured_replies(structured)
    ref.add_meta_context("base:allocation")
    ref.connect_command(["nbdkit", "-s", "--exit-with-parent"] + (["-r"] if readonly else [])
                        + ["memory", str(SIZE)])
    expected = _probe(ref)
    ref.shutdown()
    h, t = _client(Provider(ExportInfo("m", SIZE, readonly=readonly)), "", structured)
    got = _probe(h)
    h.shutdown()
    t.join(5)
    assert got == expected
