"""Host memory stays bounded when clients pipeline large READs and never
read the replies (issue 11 item 6), with raw sockets against a real
`nicsplit host serve`; meanwhile another client (libnbd) is served, and a
client that reads nothing is closed after send_timeout, giving its bytes back.

Before the fix, 80 pipelined 32 MiB READs took the host to 2.76 GB RSS.
"""

from __future__ import annotations

import json
import socket
import ssl
import struct

import pytest

from nicsplit.testing.datadir import init_data, vdisk
from nicsplit.testing.procs import call_within, nbd_connect, run_cli, wait_for, recv_exact

MIB = 1 << 20
IHAVEOPT = 0x49484156454F5054
NBD_OPT_GO = 7
NBD_REP_ACK = 1
NBD_REQUEST_MAGIC = 0x25609513
NBD_CMD_READ = 0
RSS_LIMIT = 600 * MIB




def stuck_reader(port: int, export: str, reads: int, length: int = 32 * MIB) -> socket.socket:
    """Handshake (OPT_GO, simple replies), then ``reads`` pipelined READs of
    ``length`` whose replies are never read (a tiny receive buffer)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(30)
    s.connect(("127.0.0.1", port))
    assert recv_exact(s, 18)[:8] == b"NBDMAGIC"
    name = export.encode()
    body = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    s.sendall(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, NBD_OPT_GO, len(body)) + body)
    while True:
        _magic, _opt, rtype, n = struct.unpack(">QIII", recv_exact(s, 20))
        recv_exact(s, n)
        assert not rtype & (1 << 31), f"OPT_GO refused: {rtype:#x}"
        if rtype == NBD_REP_ACK:
            break
    s.sendall(b"".join(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, NBD_CMD_READ, i, 0, length)
                       for i in range(reads)))
    return s


def status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def peak_rss(pid: int) -> int:
    """The host's peak resident set (VmHWM), bytes."""
    return status_kib(pid, "VmHWM") * 1024


def host_stats(data) -> dict:
    return json.loads(run_cli(data, "host", "stats", "--json").stdout)


def served(uri: str) -> None:
    h = nbd_connect(uri)
    h.pwrite(b"\x5a" * 4096, 8192)
    assert h.pread(4096, 8192) == b"\x5a" * 4096
    h.shutdown()


@pytest.fixture
def data(tmp_path):
    d = init_data(tmp_path / "data", send_timeout=5)
    vdisk(d, "big", "64M")
    vdisk(d, "small", "1M")
    return d


def test_unread_replies_do_not_grow_memory(data, host_factory):
    host = host_factory(data)
    s = stuck_reader(host.port, "big", 80)
    # The session stops taking requests once its replies back up (or, before
    # the fix, the host's memory grows past the bound).
    wait_for(lambda: host_stats(data).get("throttles", 0) >= 1 or peak_rss(host.pid) >= RSS_LIMIT, 60,
             "the session to be throttled")
    assert peak_rss(host.pid) < RSS_LIMIT, f"host peak RSS {peak_rss(host.pid) / MIB:.0f} MiB"
    held = host_stats(data)["nbd_bytes"]["held"]
    assert held <= 64 * MIB + 32 * MIB, held
    # Another client is served meanwhile.
    call_within(30, "another client's IO", served, host.uri("small"))
    assert peak_rss(host.pid) < RSS_LIMIT
    # The client that reads nothing is closed after send_timeout; its bytes come back.
    wait_for(lambda: "send_timeout" in host.log(), 60, "the send_timeout log line")
    wait_for(lambda: host_stats(data)["nbd_bytes"]["held"] == 0, 30, "the bytes to be given back")
    s.close()


def test_server_budget_bounds_many_stuck_clients(tmp_path, host_factory):
    data = init_data(tmp_path / "data", send_timeout=5, conn_inflight_mib=32, server_inflight_mib=64)
    vdisk(data, "big", "64M")
    vdisk(data, "small", "1M")
    host = host_factory(data)
    socks = [stuck_reader(host.port, "big", 20) for _ in range(4)]
    wait_for(lambda: host_stats(data).get("nbd_bytes", {}).get("waiting", 0) >= 1 or peak_rss(host.pid) >= RSS_LIMIT,
             60, "a session waiting for the server's budget")
    assert peak_rss(host.pid) < RSS_LIMIT, f"host peak RSS {peak_rss(host.pid) / MIB:.0f} MiB"
    st = host_stats(data)["nbd_bytes"]
    assert st["held"] <= 64 * MIB + 32 * MIB, st
    # Small requests of a client holding nothing still run.
    call_within(30, "another client's IO", served, host.uri("small"))
    assert peak_rss(host.pid) < RSS_LIMIT, f"host peak RSS {peak_rss(host.pid) / MIB:.0f} MiB"
    wait_for(lambda: host.log().count("send_timeout") >= 2, 60, "stuck clients closed")
    for s in socks:
        s.close()
    wait_for(lambda: host_stats(data)["nbd_bytes"]["held"] == 0, 60, "the bytes to be given back")
    assert peak_rss(host.pid) < RSS_LIMIT


def test_unread_replies_over_tls_are_bounded_too(tmp_path, host_factory):
    data = init_data(tmp_path / "data", send_timeout=5)
    vdisk(data, "big", "64M")
    certs = tmp_path / "client"
    run_cli(data, "pki", "nbd-client", str(certs))
    host = host_factory(data, "--tls", "require")
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(30)
    s.connect(("127.0.0.1", host.port))
    assert recv_exact(s, 18)[:8] == b"NBDMAGIC"
    s.sendall(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, 5, 0))   # NBD_OPT_STARTTLS
    assert struct.unpack(">QIII", recv_exact(s, 20))[2] == NBD_REP_ACK
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(certs / "ca-cert.pem"))
    ctx.load_cert_chain(str(certs / "client-cert.pem"), str(certs / "client-key.pem"))
    t = ctx.wrap_socket(s, server_hostname="127.0.0.1")
    body = struct.pack(">I", 3) + b"big" + struct.pack(">H", 0)
    t.sendall(struct.pack(">QII", IHAVEOPT, NBD_OPT_GO, len(body)) + body)
    while True:
        _m, _o, rtype, n = struct.unpack(">QIII", recv_exact(t, 20))
        recv_exact(t, n)
        if rtype == NBD_REP_ACK:
            break
    t.sendall(b"".join(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, NBD_CMD_READ, i, 0, 32 * MIB) for i in range(40)))
    wait_for(lambda: host_stats(data)["throttles"] >= 1, 60, "the TLS session to be throttled")
    assert host_stats(data)["nbd_bytes"]["held"] <= 64 * MIB + 32 * MIB
    assert peak_rss(host.pid) < RSS_LIMIT, f"host peak RSS {peak_rss(host.pid) / MIB:.0f} MiB"
    wait_for(lambda: "send_timeout" in host.log(), 60, "the send_timeout log line")
    wait_for(lambda: host_stats(data)["nbd_bytes"]["held"] == 0, 30, "the bytes to be given back")
    t.close()
