"""The NBD server's pre-handshake doors (issue 11 item 7), with real sockets
against a real `nicsplit host serve`: the export catalog is not re-read per
NBD_OPT_LIST, a handshake is bounded in options and in time, an idle
connection is closed when asked, and connections beyond the cap are refused
with a log line while the ones within it are served.
"""

from __future__ import annotations

import json
import socket
import struct
import time

import pytest

from nicsplit.testing.datadir import init_data, vdisk
from nicsplit.testing.procs import import_libnbd, nbd_connect, run_cli, wait_for, recv_exact

IHAVEOPT = 0x49484156454F5054
NBD_OPT_LIST = 3
NBD_OPT_ABORT = 2
REPLY_MAGIC = 0x0003E889045565A9
NBD_REP_ACK = 1
NBD_REP_SERVER = 2


def raw_connect(port: int, timeout: float = 10) -> socket.socket:
    """A TCP connection that has read the greeting and sent the client flags."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    greeting = recv_exact(s, 18)
    assert greeting[:8] == b"NBDMAGIC", greeting
    s.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
    return s




def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, opt, len(data)) + data


def read_list(s: socket.socket) -> list[str]:
    """The export names of one NBD_OPT_LIST answer."""
    names = []
    while True:
        magic, opt, rtype, n = struct.unpack(">QIII", recv_exact(s, 20))
        assert magic == REPLY_MAGIC and opt == NBD_OPT_LIST, (magic, opt)
        body = recv_exact(s, n)
        if rtype == NBD_REP_ACK:
            return names
        assert rtype == NBD_REP_SERVER, hex(rtype)
        (ln,) = struct.unpack_from(">I", body)
        names.append(body[4:4 + ln].decode())


def closed_by_server(s: socket.socket) -> bool:
    """True once the server closed the connection (EOF or reset)."""
    try:
        while True:
            if not s.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True


def host_stats(data) -> dict:
    return json.loads(run_cli(data, "host", "stats", "--json").stdout)


def test_opt_list_flood_reads_the_catalog_once(data, host_factory):
    vdisk(data, "a", "1M")
    vdisk(data, "b", "1M")
    host = host_factory(data)
    socks = [raw_connect(host.port) for _ in range(4)]
    socks[0].sendall(option(NBD_OPT_LIST))   # the first one builds the cache
    assert read_list(socks[0]) == ["a", "b"]
    before = host_stats(data)["exports"]
    for s in socks:
        for _ in range(30 if s is not socks[0] else 29):
            s.sendall(option(NBD_OPT_LIST))
            assert read_list(s) == ["a", "b"]
    after = host_stats(data)["exports"]
    # 119 OPT_LISTs were answered from the cache: no rebuild, no cgs.json read.
    assert after["lookups"] - before["lookups"] >= 119
    assert after["rebuilds"] == before["rebuilds"], (before, after)
    assert after["fence_reads"] == before["fence_reads"], (before, after)
    # A catalog change is still seen by the next OPT_LIST.
    vdisk(data, "c", "1M")
    socks[0].sendall(option(NBD_OPT_LIST))
    assert read_list(socks[0]) == ["a", "b", "c"]
    for s in socks:
        s.close()


def test_too_many_options_close_the_connection(data, host_factory):
    vdisk(data, "a", "1M")
    host = host_factory(data)
    s = raw_connect(host.port)
    for _ in range(32):   # the limit (as nbdkit) is answered
        s.sendall(option(NBD_OPT_LIST))
        assert read_list(s) == ["a"]
    s.sendall(option(NBD_OPT_LIST))
    assert closed_by_server(s)
    wait_for(lambda: "more than 32 options" in host.log(), 10, "the host's log line")
    # Others are served.
    h = nbd_connect(host.uri("a"))
    assert h.pread(512, 0) == bytes(512)
    h.shutdown()


@pytest.fixture
def limited(tmp_path):
    data = init_data(tmp_path / "data", handshake_timeout=1, idle_timeout=2, max_connections=3)
    vdisk(data, "a", "1M")
    return data


def test_handshake_timeout_closes_a_silent_client(limited, host_factory):
    host = host_factory(limited)
    t0 = time.monotonic()
    s = socket.create_connection(("127.0.0.1", host.port), timeout=30)
    assert closed_by_server(s)   # it never sent a byte
    assert time.monotonic() - t0 < 20
    s.close()
    # A client that started but stalls mid-handshake is closed too.
    s = raw_connect(host.port, timeout=30)
    s.sendall(option(NBD_OPT_LIST)[:7])
    assert closed_by_server(s)
    s.close()
    wait_for(lambda: host.log().count("no NBD handshake within 1s") >= 2, 10, "two log lines")
    # A real client's handshake is well within it.
    h = nbd_connect(host.uri("a"))
    assert h.pread(512, 0) == bytes(512)
    h.shutdown()


def test_idle_timeout_closes_an_idle_session(limited, host_factory):
    nbd = import_libnbd()
    host = host_factory(limited)
    h = nbd_connect(host.uri("a"))
    assert h.pread(512, 0) == bytes(512)
    wait_for(lambda: "idle_timeout" in host.log(), 20, "the idle log line")
    with pytest.raises(nbd.Error):
        h.pread(512, 0)
    del h


def test_connection_cap(limited, host_factory):
    nbd = import_libnbd()
    host = host_factory(limited)
    held = [nbd_connect(host.uri("a")) for _ in range(3)]
    extra = nbd.NBD()
    with pytest.raises(nbd.Error):
        extra.connect_uri(host.uri("a"))
    wait_for(lambda: "connection refused: 3 connections already" in host.log(), 10, "the refusal log line")
    for h in held:   # the ones within the cap are still served
        assert h.pread(512, 0) == bytes(512)
    held.pop().shutdown()
    wait_for(lambda: host_stats(limited)["sessions"] == 2, 10, "the session to end")
    h = nbd_connect(host.uri("a"))
    assert h.pread(512, 0) == bytes(512)
    for h in held + [h]:
        h.shutdown()
    assert host_stats(limited)["refused"] == 1
