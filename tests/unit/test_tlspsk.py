"""TLS-PSK (issue 11 item 8): the psktool key-file parser, the key file's
mode, `add_key`, the validation of the SSL_CTX pointer taken from an
`ssl.SSLContext`, and the listener's TLS with a key file. The handshakes
are in tests/peers/test_nbd_tls_psk.py: Python 3.11 has no TLS-PSK client.
"""

from __future__ import annotations

import ctypes
import os
import ssl
from pathlib import Path

import pytest

from nicsplit.cli.main import build_parser, up_host_args
from nicsplit.core import tlspsk
from nicsplit.core.tlspsk import PskError, add_key, load_keys, parse_keys
from nicsplit.host.nbdpolicy import PolicyError, resolve_tls

KEY = bytes(range(32))


def line(name: bytes, key: bytes = KEY) -> bytes:
    return name + b":" + key.hex().encode() + b"\n"


def private(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def test_a_good_file_parses():
    text = line(b"alice") + b"\n" + b"bob:" + KEY[::-1].hex().upper().encode() + b"\r\n" + b"  \n" + line(b"c.d-e_f@x", bytes(16))
    assert parse_keys(text) == {b"alice": KEY, b"bob": KEY[::-1], b"c.d-e_f@x": bytes(16)}
    assert parse_keys(b"") == {}


@pytest.mark.parametrize("text, message", [
    (b"alice\n", "line 1: not a 'username:hexkey' line"),
    (b"\n:" + KEY.hex().encode() + b"\n", "line 2: empty user name"),
    (b"#616c:" + KEY.hex().encode(), "hex-encoded ('#') user names are not supported"),
    (b"al ice:" + KEY.hex().encode(), "user name b'al ice': at most 128 printable"),
    (b"x" * 129 + b":" + KEY.hex().encode(), "at most 128 printable"),
    (b"alice:" + KEY.hex().encode()[:-1], "key of 'alice' is not an even number of hex digits"),
    (b"alice:" + b"zz" * 32, "not an even number of hex digits"),
    (b"alice:" + b"00 " * 32, "not an even number of hex digits"),
    (b"alice:", "not an even number of hex digits"),
    (b"alice:" + bytes(15).hex().encode(), "key of 'alice' is 15 bytes: 16 to 256 bytes"),
    (b"alice:" + bytes(257).hex().encode(), "is 257 bytes: 16 to 256 bytes"),
    (line(b"alice") + line(b"bob") + line(b"alice"), "line 3: user 'alice' appears twice"),
])
def test_each_bad_line_is_named(text, message):
    with pytest.raises(PskError) as e:
        parse_keys(text, "/etc/keys.psk")
    assert message in str(e.value) and "/etc/keys.psk line" in str(e.value), e.value


def test_a_key_file_others_can_read_is_refused(tmp_path):
    f = private(tmp_path / "keys.psk", line(b"alice"))
    assert load_keys(f) == {b"alice": KEY}
    for mode in (0o640, 0o604, 0o610):
        f.chmod(mode)
        with pytest.raises(PskError, match=rf"accessible by group or others \(mode 0{mode:o}\): chmod 600 {f}"):
            load_keys(f)
    f.chmod(0o400)
    assert load_keys(f) == {b"alice": KEY}
    with pytest.raises(PskError, match="No such file"):
        load_keys(tmp_path / "missing.psk")
    with pytest.raises(PskError, match="holds no key"):
        load_keys(private(tmp_path / "empty.psk", b"\n"))
    with pytest.raises(PskError, match="dir: Is a directory"):
        d = tmp_path / "dir"
        d.mkdir(mode=0o700)
        load_keys(d)


def test_add_key_creates_private_and_appends(tmp_path):
    f = tmp_path / "keys.psk"
    a = add_key(f, "alice")
    assert len(a) == tlspsk.NEW_KEY and os.stat(f).st_mode & 0o777 == 0o600
    f.write_bytes(f.read_bytes().rstrip(b"\n"))   # a hand-edited file without the last newline
    b = add_key(f, "bob")
    assert load_keys(f) == {b"alice": a, b"bob": b} and a != b
    with pytest.raises(PskError, match="already has a key for 'alice'"):
        add_key(f, "alice")
    with pytest.raises(PskError, match="empty user name"):
        add_key(f, "")
    with pytest.raises(PskError, match="user name"):
        add_key(f, "two words")
    f.chmod(0o644)
    with pytest.raises(PskError, match="chmod 600"):
        add_key(f, "carol")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys.psk"]   # no temporary file left


def test_the_pointer_of_a_real_context_validates():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.options |= ssl.OP_NO_TICKET | ssl.OP_NO_RENEGOTIATION
    ctx.verify_mode = ssl.CERT_REQUIRED
    ptr = tlspsk.ssl_ctx_pointer(ctx)
    assert ptr and tlspsk.libssl().SSL_CTX_get_options(ptr) == int(ctx.options)
    assert ctx.verify_mode == ssl.CERT_REQUIRED   # the check puts back what it changed
    other = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    assert tlspsk.ssl_ctx_pointer(other) != ptr


def test_what_is_not_a_context_is_refused():
    class Fake:
        options = 0
        verify_mode = ssl.CERT_NONE
    for obj in (Fake(), object(), b"x" * 64):
        with pytest.raises(PskError, match="TLS-PSK is not available with this Python build: .* is not an ssl.SSLContext"):
            tlspsk.ssl_ctx_pointer(obj)   # type: ignore[arg-type]


def test_an_address_that_is_not_the_context_s_ssl_ctx_is_refused():
    # OpenSSL reads a zeroed block where an SSL_CTX should be: options 0, not the context's.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    block = ctypes.create_string_buffer(1 << 16)
    with pytest.raises(PskError, match="TLS-PSK is not available with this Python build: the SSL_CTX found has options 0x0"):
        tlspsk.validate(tlspsk.libssl(), ctypes.addressof(block), ctx)
    # Another context's SSL_CTX: same options, but it does not follow this context's verify mode.
    twin = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with pytest.raises(PskError, match="verify mode"):
        tlspsk.validate(tlspsk.libssl(), tlspsk.ssl_ctx_pointer(twin), ctx)
    assert ctx.verify_mode == ssl.CERT_NONE


def test_a_psk_context_has_psk_suites_and_no_certificate():
    ctx = tlspsk.psk_server_context({b"alice": KEY})
    names = [c["name"] for c in ctx.get_ciphers()]
    assert "ECDHE-PSK-CHACHA20-POLY1305" in names and "TLS_AES_128_GCM_SHA256" in names
    assert not [n for n in names if "PSK" not in n and not n.startswith("TLS_")], names   # nothing needing a certificate
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert isinstance(ctx._nicsplit_psk_callback, tlspsk.PSK_CALLBACK)   # kept alive with the context
    with pytest.raises(PskError, match="at least one key"):
        tlspsk.psk_server_context({})


def test_the_callback_hands_out_keys_by_identity():
    ctx = tlspsk.psk_server_context({b"alice": KEY, b"bob": bytes(16)})
    cb = ctx._nicsplit_psk_callback
    buf = (ctypes.c_ubyte * 512)()
    assert cb(None, b"alice", buf, 512) == 32 and bytes(buf[:32]) == KEY
    assert cb(None, b"bob", buf, 512) == 16 and bytes(buf[:16]) == bytes(16)
    assert cb(None, b"carol", buf, 512) == 0
    assert cb(None, None, buf, 512) == 0
    assert cb(None, b"alice", buf, 31) == 0   # no room: no key rather than half of one


def test_a_key_file_makes_the_listener_s_tls(tmp_path):
    keys = private(tmp_path / "keys.psk", line(b"alice"))
    no_ca = tmp_path / "no-pki"
    t = resolve_tls("auto", "0.0.0.0", no_ca, psk=keys)
    assert (t.mode, t.local_mode, t.psk, t.context is not None) == ("require", "on", True, True)
    assert resolve_tls("auto", "127.0.0.1", no_ca, psk=keys).mode == "on"   # offered on loopback
    assert resolve_tls("require", "0.0.0.0", no_ca, psk=keys).mode == "require"
    assert resolve_tls("off", "127.0.0.1", no_ca, psk=keys).psk is False
    with pytest.raises(PolicyError, match="TLS is required when listening beyond loopback"):
        resolve_tls("off", "0.0.0.0", no_ca, psk=keys)
    with pytest.raises(PolicyError, match="tls_clients names certificate CNs"):
        resolve_tls("require", "0.0.0.0", no_ca, psk=keys, clients=("backup",))
    keys.chmod(0o644)
    with pytest.raises(PolicyError, match=f"NBD over TLS-PSK \\(require\\): TLS-PSK key file {keys} is accessible"):
        resolve_tls("require", "0.0.0.0", no_ca, psk=keys)
    with pytest.raises(PolicyError, match="needs the deployment's certificates"):
        resolve_tls("require", "0.0.0.0", no_ca)   # without a key file, certificates as before


def test_up_hands_the_key_file_to_the_host(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["up", "--tls", "require", "--tls-psk", "keys.psk"])
    assert up_host_args(args, "0.0.0.0:10900") == ["host", "serve", "--listen", "0.0.0.0:10900", "--tls", "require",
                                                    "--tls-psk", str(tmp_path / "keys.psk")]
    args = build_parser().parse_args(["host", "serve", "--tls-psk", "/etc/k.psk"])
    assert args.tls_psk == "/etc/k.psk"


def test_without_openssl_s_functions_psk_is_refused_cleanly(monkeypatch):
    # The lookup goes through the loaded _ssl module's handle; pointed at one
    # that is not loaded, or at a loaded library without OpenSSL (libc), it
    # must refuse with a clear line instead of guessing.
    monkeypatch.setattr(tlspsk, "_lib", None)
    monkeypatch.setattr(tlspsk._ssl, "__file__", "/nonexistent/_ssl.so")
    with pytest.raises(PskError, match="not available with this Python build: cannot reach the loaded _ssl module"):
        tlspsk.psk_server_context({b"alice": KEY})
    libc = next(ln.split()[5] for ln in open("/proc/self/maps") if len(ln.split()) >= 6 and "/libc.so" in ln.split()[5])
    monkeypatch.setattr(tlspsk._ssl, "__file__", libc)
    with pytest.raises(PskError, match="not available with this Python build: OpenSSL .* exports no SSL_CTX_get_options"):
        tlspsk.psk_server_context({b"alice": KEY})
    monkeypatch.undo()
    assert tlspsk.psk_server_context({b"alice": KEY}).num_tickets == 0
