"""The local PKI: files, modes, idempotence, certificate contents, and TLS 1.3
mutual authentication between the generated contexts (over a socketpair)."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from nicsplit.core import pki

FILES = {"ca.crt", "ca.key", "appliance.crt", "appliance.key", "card.crt", "card.key", "host.crt", "host.key", "batch.key"}


def test_init_creates_everything_with_private_modes(tmp_path: Path):
    d = tmp_path / "pki"
    created = pki.init_pki(d)
    assert set(created) == FILES
    assert {p.name for p in d.iterdir()} == FILES
    for name in FILES:
        mode = (d / name).stat().st_mode & 0o777
        assert mode == (0o600 if name.endswith(".key") else 0o644), name
    assert len((d / "batch.key").read_bytes()) == 32
    assert pki.load_batch_key(d) == (d / "batch.key").read_bytes()


def test_idempotent_never_overwrites(tmp_path: Path):
    d = tmp_path / "pki"
    pki.init_pki(d)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    assert pki.init_pki(d) == []
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    # a missing leaf is reissued by the existing CA; nothing else changes
    (d / "card.crt").unlink()
    (d / "card.key").unlink()
    assert set(pki.init_pki(d)) == {"card.crt", "card.key"}
    ca = x509.load_pem_x509_certificate((d / "ca.crt").read_bytes())
    card = x509.load_pem_x509_certificate((d / "card.crt").read_bytes())
    card.verify_directly_issued_by(ca)
    assert (d / "appliance.key").read_bytes() == before["appliance.key"]


def test_half_present_pairs_are_errors(tmp_path: Path):
    d = tmp_path / "pki"
    pki.init_pki(d)
    (d / "ca.key").unlink()
    with pytest.raises(pki.PkiError, match="ca.key does not"):
        pki.init_pki(d)
    d2 = tmp_path / "pki2"
    pki.init_pki(d2)
    (d2 / "host.key").unlink()
    with pytest.raises(pki.PkiError, match="host.key does not"):
        pki.init_pki(d2)


def test_certificate_contents(tmp_path: Path):
    d = tmp_path / "pki"
    pki.init_pki(d, appliance_names=("appliance.example", "10.0.0.7"))
    ca = x509.load_pem_x509_certificate((d / "ca.crt").read_bytes())
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey) and ca.public_key().curve.name == "secp256r1"
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert (ca.not_valid_after_utc - ca.not_valid_before_utc).days >= 3650
    for name in pki.LEAVES:
        cert = x509.load_pem_x509_certificate((d / f"{name}.crt").read_bytes())
        cert.verify_directly_issued_by(ca)
        assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == name
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    app = x509.load_pem_x509_certificate((d / "appliance.crt").read_bytes())
    san = app.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert ipaddress.ip_address("10.0.0.7") in san.get_values_for_type(x509.IPAddress)
    assert {"localhost", "appliance.example"} <= set(san.get_values_for_type(x509.DNSName))


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, hostname: str = "localhost"):
    """TLS over a socketpair; returns (server result, client result): the
    peer CN on success or the exception."""
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    out: dict[str, object] = {}

    def server() -> None:
        try:
            with server_ctx.wrap_socket(a, server_side=True) as s:
                out["server"] = (pki.peer_name(s), s.version())
                s.sendall(b"ok")
        except (ssl.SSLError, OSError) as e:
            out["server"] = e

    t = threading.Thread(target=server)
    t.start()
    try:
        with client_ctx.wrap_socket(b, server_hostname=hostname) as c:
            data = c.recv(2)  # TLS 1.3: a refused client certificate shows up on the first read
            out["client"] = (pki.peer_name(c), c.version()) if data == b"ok" else ConnectionError("no data")
    except (ssl.SSLError, OSError) as e:
        out["client"] = e
    t.join(10)
    return out["server"], out["client"]


def test_mutual_tls13(tmp_path: Path):
    d = tmp_path / "pki"
    pki.init_pki(d)
    srv, cli = _handshake(pki.server_context(d, "appliance"), pki.client_context(d, "card"))
    assert srv == ("card", "TLSv1.3")
    assert cli == ("appliance", "TLSv1.3")
    srv, cli = _handshake(pki.server_context(d, "appliance"), pki.client_context(d, "card"), hostname="127.0.0.1")
    assert srv == ("card", "TLSv1.3")


def test_certificate_from_another_ca_is_refused(tmp_path: Path):
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    pki.init_pki(ours)
    pki.init_pki(theirs)
    srv, cli = _handshake(pki.server_context(ours, "appliance"), pki.client_context(theirs, "card"))
    assert isinstance(srv, ssl.SSLError) and isinstance(cli, OSError)
    # and the card refuses an appliance of another CA
    srv, cli = _handshake(pki.server_context(theirs, "appliance"), pki.client_context(ours, "card"))
    assert isinstance(cli, ssl.SSLCertVerificationError)


def test_client_without_certificate_is_refused(tmp_path: Path):
    d = tmp_path / "pki"
    pki.init_pki(d)
    anon = ssl.create_default_context(cafile=str(d / "ca.crt"))
    srv, cli = _handshake(pki.server_context(d, "appliance"), anon)
    assert isinstance(srv, ssl.SSLError) and isinstance(cli, OSError)


def test_contexts_are_tls13_only_and_need_files(tmp_path: Path):
    d = tmp_path / "pki"
    pki.init_pki(d)
    for ctx in (pki.server_context(d, "appliance"), pki.client_context(d, "card")):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(pki.PkiError, match="nobody.crt does not exist"):
        pki.server_context(d, "nobody")
    (d / "batch.key").write_bytes(b"short")
    with pytest.raises(pki.PkiError, match="AES-256"):
        pki.load_batch_key(d)
