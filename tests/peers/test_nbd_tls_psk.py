"""NBD over TLS-PSK (issue 11 item 8, "PSK as nbdkit does"): a psktool key
file instead of certificates, driven by real gnutls clients: nbdinfo
(libnbd's ``tls-psk-file``), qemu-io and qemu-img (``tls-creds-psk``, which
reads ``DIR/keys.psk``), over TLS 1.3 and, with qemu's priority string,
TLS 1.2. A wrong key, an unknown user and a plain client are refused;
beyond loopback a key file alone (no CA) is enough TLS to listen.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
from pathlib import Path

import pytest

from nicsplit.testing.datadir import init_data, vdisk
from nicsplit.testing.procs import HostProcess, env_with_libnbd, outside_address, recv_exact, run_cli, wait_for

pytestmark = pytest.mark.usefixtures("peers")

IHAVEOPT = 0x49484156454F5054
NBD_OPT_LIST = 3
NBD_REP_ERR_TLS_REQD = (1 << 31) + 5


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env_with_libnbd(),
                          stdin=subprocess.DEVNULL)


def psk_uri(port: int, export: str, user: str, keys: Path, addr: str = "127.0.0.1") -> str:
    return f"nbds://{user}@{addr}:{port}/{export}?tls-psk-file={keys}"


def qemu(tool: str, port: int, export: str, keydir: Path, *cmds: str, user: str = "alice",
         priority: str | None = None) -> subprocess.CompletedProcess:
    obj = f"tls-creds-psk,id=tls0,endpoint=client,dir={keydir},username={user}"
    if priority:
        obj += f",priority={priority}"
    return run(tool, *(["info"] if tool == "qemu-img" else []), "--object", obj, "--image-opts",
               f"driver=nbd,host=127.0.0.1,port={port},export={export},tls-creds=tls0", *cmds)


def keydir(path: Path, text: bytes) -> Path:
    """A qemu tls-creds-psk directory: DIR/keys.psk, mode 0600."""
    path.mkdir(mode=0o700)
    (path / "keys.psk").write_bytes(text)
    (path / "keys.psk").chmod(0o600)
    return path


def tls_reqd(port: int, addr: str = "127.0.0.1") -> bool:
    """A plain NBD_OPT_LIST is answered NBD_REP_ERR_TLS_REQD."""
    with socket.create_connection((addr, port), timeout=10) as s:
        assert recv_exact(s, 18)[:8] == b"NBDMAGIC"
        s.sendall(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, NBD_OPT_LIST, 0))
        _magic, _opt, rtype, n = struct.unpack(">QIII", recv_exact(s, 20))
        recv_exact(s, n)
        return rtype == NBD_REP_ERR_TLS_REQD


@pytest.fixture
def psk_host(data, host_factory, tmp_path):
    vdisk(data, "a", "4M")
    keys = tmp_path / "server.psk"
    p = run_cli(data, "pki", "nbd-psk", str(keys), "--name", "alice")
    assert "added a TLS-PSK key for 'alice'" in p.stdout
    run_cli(data, "pki", "nbd-psk", str(keys), "--name", "bob")
    assert keys.stat().st_mode & 0o777 == 0o600
    host = host_factory(data, "--tls", "require", "--tls-psk", str(keys))
    assert host.ready["tls"] == {host.addresses[0]: "require"} and host.ready["tls_psk"] is True
    return host, keys


def test_real_clients_with_the_right_key(psk_host, tmp_path):
    host, keys = psk_host
    p = run("nbdinfo", "--json", psk_uri(host.port, "a", "alice", keys))
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["TLS"] is True and info["exports"][0]["export-size"] == 4 << 20, info
    # qemu reads DIR/keys.psk; a client's file needs only its own line.
    alice = keydir(tmp_path / "alice", next(ln for ln in keys.read_bytes().splitlines(True) if ln.startswith(b"alice:")))
    p = qemu("qemu-io", host.port, "a", alice, "-c", "write -P 0x5a 65536 131072", "-c", "flush",
             "-c", "read -P 0x5a 65536 131072")
    assert p.returncode == 0 and "wrote 131072" in p.stdout and "read 131072" in p.stdout, p.stdout + p.stderr
    p = qemu("qemu-img", host.port, "a", alice)
    assert p.returncode == 0 and "4 MiB" in p.stdout, p.stdout + p.stderr
    wait_for(lambda: host.log().count("TLS up (pre-shared key, TLSv1.3 TLS_AES_128_GCM_SHA256)") >= 3, 10,
             "three TLS 1.3 sessions")
    # TLS 1.2 (a gnutls client that will not speak 1.3): the PSK suites with ECDHE.
    p = qemu("qemu-io", host.port, "a", alice, "-c", "read -P 0x5a 65536 131072", priority="NORMAL:-VERS-TLS1.3")
    assert p.returncode == 0 and "read 131072" in p.stdout, p.stdout + p.stderr
    wait_for(lambda: "TLS up (pre-shared key, TLSv1.2 ECDHE-PSK-" in host.log(), 10, "the TLS 1.2 session")
    # libnbd's nbdcopy reads back what qemu wrote.
    out = tmp_path / "copy.img"
    p = run("nbdcopy", psk_uri(host.port, "a", "bob", keys), str(out))
    assert p.returncode == 0, p.stderr
    assert out.read_bytes()[65536:65536 + 131072] == b"\x5a" * 131072


def test_a_wrong_key_an_unknown_user_and_a_plain_client_are_refused(psk_host, tmp_path):
    host, keys = psk_host
    alice = keys.read_bytes().splitlines()[0]
    name, key = alice.split(b":")
    wrong = keydir(tmp_path / "wrong", name + b":" + bytes(32).hex().encode() + b"\n")
    p = run("nbdinfo", psk_uri(host.port, "a", "alice", wrong / "keys.psk"))
    assert p.returncode != 0 and "TLS" in p.stderr, p.stderr
    p = qemu("qemu-img", host.port, "a", wrong)
    assert p.returncode != 0
    wait_for(lambda: "TLS handshake failed" in host.log(), 10, "the refused handshake")
    # carol holds alice's key, but the server has no carol.
    carol = keydir(tmp_path / "carol", b"carol:" + key + b"\n")
    p = run("nbdinfo", psk_uri(host.port, "a", "carol", carol / "keys.psk"))
    assert p.returncode != 0
    p = qemu("qemu-io", host.port, "a", carol, "-c", "read 0 512", user="carol")
    assert p.returncode != 0 and "read 512" not in p.stdout, p.stdout
    wait_for(lambda: "TLS-PSK: no key for identity 'carol'" in host.log(), 10, "the unknown identity")
    assert "TLS up" not in host.log()
    # Plain: every option but STARTTLS is refused.
    assert tls_reqd(host.port)
    p = run("nbdinfo", f"nbd://127.0.0.1:{host.port}/a")
    assert p.returncode != 0
    p = run("qemu-img", "info", f"nbd://127.0.0.1:{host.port}/a")
    assert p.returncode != 0
    # A client that wants certificates (no PSK) cannot get in either: the server has none.
    (tmp_path / "x509").mkdir()
    (tmp_path / "x509" / "ca-cert.pem").write_bytes((host.data / "pki" / "ca.crt").read_bytes())
    p = run("nbdinfo", f"nbds://127.0.0.1:{host.port}/a?tls-certificates={tmp_path / 'x509'}")
    assert p.returncode != 0


def test_psktool_file_from_the_config_and_beyond_loopback(tmp_path):
    """``[host] tls_psk`` names a file psktool made (relative to the data
    directory); the host listens on 0.0.0.0 with it and no CA at all."""
    data = init_data(tmp_path / "data", tls_psk="keys.psk", pki=str(tmp_path / "no-pki"))
    vdisk(data, "a", "1M")
    p = run("psktool", "-u", "dave", "-p", str(data / "keys.psk"))
    assert p.returncode == 0, p.stdout + p.stderr
    (data / "keys.psk").chmod(0o600)
    addr = outside_address()
    with HostProcess(data, "--listen", "0.0.0.0:0") as h:
        assert list(h.ready["tls"].values()) == ["require"] and h.ready["tls_psk"] is True
        assert not (tmp_path / "no-pki").exists()   # no CA was made or needed
        assert tls_reqd(h.port, addr)
        p = run("nbdinfo", psk_uri(h.port, "a", "dave", data / "keys.psk", addr))
        assert p.returncode == 0 and "with TLS" in p.stdout, p.stdout + p.stderr
    p = run_cli(data, "host", "serve", "--listen", "0.0.0.0:0", "--tls", "off", check=False)
    assert p.returncode == 1 and "TLS is required when listening beyond loopback" in p.stderr, p.stderr
    (data / "keys.psk").chmod(0o644)
    p = run_cli(data, "host", "serve", "--listen", "0.0.0.0:0", check=False)
    assert p.returncode == 1 and "chmod 600" in p.stderr and "Traceback" not in p.stderr, p.stderr
