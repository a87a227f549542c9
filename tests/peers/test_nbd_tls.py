"""NBD over TLS (issue 11 item 8): NBD_OPT_STARTTLS with certificates from
the deployment's CA, driven by real peers (nbdinfo, qemu-img, qemu-io, libnbd
with their x509 certificate directories); TLS required beyond loopback; a
plain client and a client whose certificate another CA issued are refused.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import subprocess
from pathlib import Path

import pytest

from nicsplit.core import pki
from nicsplit.host.nbdpolicy import PolicyError
from nicsplit.recovery.image import ImageServer
from nicsplit.testing.datadir import init_data, vdisk
from nicsplit.testing.procs import HostProcess, env_with_libnbd, import_libnbd, nbd_connect, outside_address, run_cli, wait_for, recv_exact
from nicsplit.testing.served import Served
from nicsplit.testing.workload import journaled

pytestmark = pytest.mark.usefixtures("peers")

IHAVEOPT = 0x49484156454F5054
NBD_OPT_EXPORT_NAME, NBD_OPT_LIST, NBD_OPT_STARTTLS, NBD_OPT_GO = 1, 3, 5, 7
NBD_REP_ACK = 1
NBD_REP_ERR_TLS_REQD = (1 << 31) + 5




def option_reply(s: socket.socket, opt: int, data: bytes = b"") -> int:
    """Send one option; the type of its (single) reply."""
    s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)
    _magic, ropt, rtype, n = struct.unpack(">QIII", recv_exact(s, 20))
    recv_exact(s, n)
    assert ropt == opt
    return rtype


def raw(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    assert recv_exact(s, 18)[:8] == b"NBDMAGIC"
    s.sendall(struct.pack(">I", 3))
    return s


def certs(data: Path, out: Path, name: str = "nbd-client") -> Path:
    run_cli(data, "pki", "nbd-client", str(out), "--name", name)
    return out


def tls_uri(port: int, export: str, certdir: Path) -> str:
    return f"nbds://127.0.0.1:{port}/{export}?tls-certificates={certdir}"


def qemu_opts(port: int, export: str) -> str:
    return f"driver=nbd,host=127.0.0.1,port={port},export={export},tls-creds=tls0"


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env_with_libnbd(),
                          stdin=subprocess.DEVNULL)


@pytest.fixture
def tls_host(data, host_factory, tmp_path):
    vdisk(data, "a", "4M")
    host = host_factory(data, "--tls", "require")
    assert host.ready["tls"] == {host.addresses[0]: "require"}
    return host, certs(data, tmp_path / "client")


def test_real_clients_over_tls(tls_host):
    host, cdir = tls_host
    p = run("nbdinfo", "--json", tls_uri(host.port, "a", cdir))
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["TLS"] is True and info["exports"][0]["export-size"] == 4 << 20, info
    obj = f"tls-creds-x509,id=tls0,dir={cdir},endpoint=client"
    p = run("qemu-io", "--object", obj, "--image-opts", qemu_opts(host.port, "a"),
            "-c", "write -P 0x5a 65536 131072", "-c", "flush")
    assert p.returncode == 0 and "wrote 131072" in p.stdout, p.stdout + p.stderr
    p = run("qemu-img", "info", "--object", obj, "--image-opts", qemu_opts(host.port, "a"))
    assert p.returncode == 0 and "4 MiB" in p.stdout, p.stdout + p.stderr
    # libnbd: nbd_set_tls + nbd_set_tls_certificates, reading what qemu wrote.
    nbd = import_libnbd()
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(str(cdir))
    h.connect_uri(f"nbds://127.0.0.1:{host.port}/a")
    assert h.get_tls_negotiated()
    assert h.pread(131072, 65536) == b"\x5a" * 131072
    h.shutdown()
    wait_for(lambda: "TLS up (client certificate 'nbd-client')" in host.log(), 10, "the TLS log line")


def test_plain_clients_are_refused_when_tls_is_required(tls_host):
    host, _ = tls_host
    s = raw(host.port)
    assert option_reply(s, NBD_OPT_LIST) == NBD_REP_ERR_TLS_REQD
    name = b"a"
    go = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    assert option_reply(s, NBD_OPT_GO, go) == NBD_REP_ERR_TLS_REQD
    s.sendall(struct.pack(">QII", IHAVEOPT, NBD_OPT_EXPORT_NAME, 1) + b"a")
    assert s.recv(4096) == b""  # EXPORT_NAME cannot be refused: the server closes
    s.close()
    p = run("nbdinfo", f"nbd://127.0.0.1:{host.port}/a")
    assert p.returncode != 0
    nbd = import_libnbd()
    with pytest.raises(nbd.Error):
        nbd_connect(host.uri("a"))
    p = run("qemu-img", "info", f"nbd://127.0.0.1:{host.port}/a")
    assert p.returncode != 0


def test_a_certificate_from_another_ca_is_refused(tls_host, tmp_path):
    host, _ = tls_host
    other = tmp_path / "other-pki"
    pki.init_pki(other)
    foreign = tmp_path / "foreign"
    pki.issue_nbd_client(other, foreign)
    p = run("nbdinfo", tls_uri(host.port, "a", foreign))
    assert p.returncode != 0
    wait_for(lambda: "TLS handshake failed" in host.log(), 10, "the host's log line")
    # A client with no certificate at all is refused too.
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "ca-cert.pem").write_bytes((host.data / "pki" / "ca.crt").read_bytes())
    p = run("nbdinfo", tls_uri(host.port, "a", bare))
    assert p.returncode != 0


def test_tls_clients_names_who_gets_in(tmp_path, host_factory):
    data = init_data(tmp_path / "data", tls="require", tls_clients=["backup"])
    vdisk(data, "a", "1M")
    host = host_factory(data)
    p = run("nbdinfo", tls_uri(host.port, "a", certs(data, tmp_path / "backup", "backup")))
    assert p.returncode == 0, p.stderr
    p = run("nbdinfo", tls_uri(host.port, "a", certs(data, tmp_path / "other", "other")))
    assert p.returncode != 0
    wait_for(lambda: "'other' is not among [host] tls_clients" in host.log(), 10, "the refusal")


def test_tls_is_required_beyond_loopback(data, tmp_path):
    vdisk(data, "a", "1M")
    p = run_cli(data, "host", "serve", "--listen", "0.0.0.0:0", "--tls", "off", check=False)
    assert p.returncode == 1 and "TLS is required when listening beyond loopback" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    p = run_cli(data, "host", "serve", "--listen", "0.0.0.0:0", "--tls", "on", check=False)
    assert p.returncode == 1 and "TLS is required" in p.stderr
    # Left to itself (auto) it requires TLS there of every peer not on this
    # machine's loopback (failback and restore --in-place connect from there).
    # The server certificate names the addresses clients use: [host] tls_names.
    addr = outside_address()
    data = init_data(tmp_path / "d2", tls_names=[addr])
    vdisk(data, "a", "1M")
    with HostProcess(data, "--listen", "0.0.0.0:0") as h:
        assert list(h.ready["tls"].values()) == ["require"]
        s = raw(h.port)
        assert option_reply(s, NBD_OPT_LIST) == 2   # NBD_REP_SERVER: a loopback peer
        s.close()
        s = socket.create_connection((addr, h.port), timeout=10)
        assert recv_exact(s, 18)[:8] == b"NBDMAGIC"
        s.sendall(struct.pack(">I", 3))
        assert option_reply(s, NBD_OPT_LIST) == NBD_REP_ERR_TLS_REQD
        s.close()
        p = run("nbdinfo", f"nbd://{addr}:{h.port}/a")
        assert p.returncode != 0
        p = run("nbdinfo", f"nbds://{addr}:{h.port}/a?tls-certificates={certs(data, tmp_path / 'remote')}")
        assert p.returncode == 0, p.stderr
    # An explicit require requires TLS of loopback peers too.
    with HostProcess(data, "--listen", "0.0.0.0:0", "--tls", "require") as h:
        s = raw(h.port)
        assert option_reply(s, NBD_OPT_LIST) == NBD_REP_ERR_TLS_REQD
        s.close()
    with HostProcess(data) as h:
        assert list(h.ready["tls"].values()) == ["on"]
        c = nbd_connect(h.uri("a"))   # plain, on loopback
        assert c.pread(512, 0) == bytes(512)
        c.shutdown()
        p = run("nbdinfo", tls_uri(h.port, "a", certs(data, tmp_path / "c")))
        assert p.returncode == 0, p.stderr


def test_starttls_with_data(tls_host):
    host, _ = tls_host
    s = raw(host.port)
    assert option_reply(s, NBD_OPT_STARTTLS, b"x") == (1 << 31) + 3   # ERR_INVALID: no data allowed
    # Bytes sent after STARTTLS before the TLS handshake close the connection.
    s.sendall(struct.pack(">QII", IHAVEOPT, NBD_OPT_STARTTLS, 0) + b"garbage")
    rest = b""
    while chunk := s.recv(4096):
        rest += chunk
    assert len(rest) <= 20   # at most the ACK, then the server closed
    s.close()
    wait_for(lambda: "data after NBD_OPT_STARTTLS" in host.log(), 10, "the protocol error")


def test_writable_image_exports_require_tls_beyond_loopback(tmp_path, seed):
    jd, w = journaled(tmp_path, seed)
    seq = w.batches[-1][0].last_seq
    name = w.vdisks[0].name
    srv = ImageServer(jd, w.vdisks, seq, writable=True, overlay_dir=tmp_path / "ov1")
    with pytest.raises(PolicyError, match="TLS is required beyond loopback"):
        asyncio.run(srv.start("0.0.0.0", 0))
    asyncio.run(srv.stop())
    ca = tmp_path / "pki"
    pki.init_pki(ca)
    client = tmp_path / "client"
    pki.issue_nbd_client(ca, client)
    srv = ImageServer(jd, w.vdisks, seq, writable=True, overlay_dir=tmp_path / "ov2")
    srv.pki_dir = ca
    with Served(srv, host="0.0.0.0") as s:
        assert srv.tls.mode == "require"
        assert srv.urls("127.0.0.1", s.port)[name].startswith("nbds://")
        addr = outside_address()   # a loopback peer would be let in plain (auto)
        assert run("nbdinfo", f"nbd://{addr}:{s.port}/{name}").returncode != 0
        obj = f"tls-creds-x509,id=tls0,dir={client},endpoint=client"
        p = run("qemu-io", "--object", obj, "--image-opts", qemu_opts(s.port, name), "-c", "write -P 0x33 0 4096",
                "-c", "read -P 0x33 0 4096")
        assert p.returncode == 0 and "read 4096" in p.stdout, p.stdout + p.stderr


def test_the_unix_socket_offers_tls_but_never_requires_it(data, host_factory, tmp_path):
    vdisk(data, "a", "1M")
    sock = tmp_path / "nbd.sock"
    host = host_factory(data, "--tls", "require", "--socket", str(sock))
    assert host.ready["tls"] == {host.addresses[0]: "require", f"nbd+unix:///?socket={sock}": "on"}
    h = nbd_connect(f"nbd+unix:///a?socket={sock}")   # plain: the host's own tools (failback) come this way
    assert h.pread(512, 0) == bytes(512)
    h.shutdown()
    p = run("nbdinfo", f"nbds+unix:///a?socket={sock}&tls-certificates={certs(data, tmp_path / 'c')}")
    assert p.returncode == 0 and "with TLS" in p.stdout, p.stdout + p.stderr
