"""The codec's TLS modes (NOTLS, STARTTLS offered, FORCEDTLS) and its bound on
options per handshake, fed byte frames by an independent encoder (the IO
layer's TLS handshake itself is tested with real peers in tests/peers/test_nbd_tls.py)."""

from __future__ import annotations

import struct

import pytest

from nicsplit.wire import nbd as N

IHAVEOPT = b"IHAVEOPT"
ACK, SERVER = 1, 2
ERR_UNSUP, ERR_INVALID, ERR_TLS_REQD = 2**31 + 1, 2**31 + 3, 2**31 + 5
DISK = N.ExportInfo("disk", 1 << 20)


class Provider:
    def lookup(self, name: str):
        return DISK if name in ("", "disk") else None

    def list_exports(self):
        return [DISK]


def option(opt: int, data: bytes = b"") -> bytes:
    return IHAVEOPT + struct.pack(">II", opt, len(data)) + data


def go(name: bytes = b"disk") -> bytes:
    return option(N.NBD_OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))


def replies(buf: bytes) -> list[tuple[int, int]]:
    out, pos = [], 0
    while pos < len(buf):
        _magic, opt, rtype, n = struct.unpack_from(">QIII", buf, pos)
        out.append((opt, rtype))
        pos += 20 + n
    return out


def events(conn: N.ServerConnection) -> list:
    evs = []
    while (ev := conn.next_event()) is not N.NEED_DATA:
        evs.append(ev)
        if isinstance(ev, (N.Closed, N.Disconnect, N.Negotiated, N.StartTLS)):
            break
    return evs


def start(tls: str, flags: int = 3, **kw) -> N.ServerConnection:
    conn = N.ServerConnection(Provider(), tls=tls, **kw)
    conn.data_to_send()
    conn.receive_data(struct.pack(">I", flags))
    return conn


def exchange(conn: N.ServerConnection, *frames: bytes):
    conn.receive_data(b"".join(frames))
    evs = events(conn)
    return evs, replies(conn.data_to_send())


def test_off_refuses_starttls_and_serves_plain():
    conn = start(N.TLS_OFF)
    evs, reps = exchange(conn, option(N.NBD_OPT_STARTTLS), option(N.NBD_OPT_LIST))
    assert evs == [] and reps == [(5, ERR_UNSUP), (3, SERVER), (3, ACK)]


def test_on_offers_starttls_and_forgets_earlier_options():
    conn = start(N.TLS_ON)
    evs, reps = exchange(conn, option(N.NBD_OPT_LIST))   # plain still served
    assert reps == [(3, SERVER), (3, ACK)]
    evs, reps = exchange(conn, option(N.NBD_OPT_STRUCTURED_REPLY), option(N.NBD_OPT_STARTTLS))
    assert evs == [N.StartTLS()] and reps == [(8, ACK), (5, ACK)]
    assert conn.next_event() is N.NEED_DATA   # nothing is parsed until tls_started()
    conn.tls_started()
    assert conn.tls_active and not conn.structured   # spec: no state survives STARTTLS
    evs, reps = exchange(conn, option(N.NBD_OPT_STARTTLS), go())
    assert reps[0] == (5, ERR_INVALID)               # already negotiated
    assert isinstance(evs[0], N.Negotiated) and not evs[0].structured


def test_require_refuses_everything_but_starttls_and_abort():
    conn = start(N.TLS_REQUIRE)
    evs, reps = exchange(conn, option(N.NBD_OPT_LIST), option(N.NBD_OPT_INFO, go()[16:]), go(),
                         option(N.NBD_OPT_STRUCTURED_REPLY), option(99))
    assert evs == [] and [r for _, r in reps] == [ERR_TLS_REQD] * 5
    evs, reps = exchange(conn, option(N.NBD_OPT_STARTTLS))
    assert evs == [N.StartTLS()] and reps == [(5, ACK)]
    conn.tls_started()
    evs, reps = exchange(conn, option(N.NBD_OPT_LIST), go())
    assert reps[:2] == [(3, SERVER), (3, ACK)] and isinstance(evs[0], N.Negotiated)


def test_require_export_name_without_tls_closes():
    conn = start(N.TLS_REQUIRE)
    conn.receive_data(option(N.NBD_OPT_EXPORT_NAME, b"disk"))
    with pytest.raises(N.RemoteProtocolError, match="TLS is required"):
        conn.next_event()


def test_require_abort_is_answered():
    conn = start(N.TLS_REQUIRE)
    evs, reps = exchange(conn, option(N.NBD_OPT_ABORT))
    assert isinstance(evs[0], N.Closed) and reps == [(2, ACK)]


def test_require_needs_fixed_newstyle():
    conn = N.ServerConnection(Provider(), tls=N.TLS_REQUIRE)
    conn.data_to_send()
    conn.receive_data(struct.pack(">I", 0))
    with pytest.raises(N.RemoteProtocolError, match="fixed newstyle"):
        conn.next_event()


def test_bytes_after_starttls_before_the_handshake_are_fatal():
    conn = start(N.TLS_ON)
    conn.receive_data(option(N.NBD_OPT_STARTTLS) + b"\x16\x03\x01")
    with pytest.raises(N.RemoteProtocolError, match="data after NBD_OPT_STARTTLS"):
        events(conn)
    conn = start(N.TLS_ON)
    assert exchange(conn, option(N.NBD_OPT_STARTTLS))[0] == [N.StartTLS()]
    conn.receive_data(b"\x16")
    with pytest.raises(N.RemoteProtocolError):
        conn.next_event()


def test_tls_started_without_starttls_is_a_local_error():
    with pytest.raises(N.LocalProtocolError):
        start(N.TLS_ON).tls_started()
    with pytest.raises(ValueError):
        N.ServerConnection(Provider(), tls="maybe")


def test_max_options_bounds_the_handshake():
    conn = start(N.TLS_OFF, max_options=3)
    evs, reps = exchange(conn, *[option(N.NBD_OPT_LIST)] * 3)
    assert len(reps) == 6
    conn.receive_data(option(N.NBD_OPT_LIST))
    with pytest.raises(N.RemoteProtocolError, match="more than 3 options"):
        conn.next_event()
