"""A local PKI for one deployment: a CA, one certificate per process, the batch key.

Layout (``nicsplit pki init``; ``nicsplit init`` calls it)::

    DATA/pki/ca.crt  ca.key                 the deployment's CA (ECDSA P-256, 10 years)
    DATA/pki/appliance.crt  appliance.key   SAN IP 127.0.0.1, DNS localhost (+ extra names)
    DATA/pki/card.crt  card.key             client and server auth
    DATA/pki/host.crt  host.key             client and server auth
    DATA/pki/batch.key                      32 random bytes: the AES-256-GCM batch key

Rules
-----
1. Idempotent: an existing file is never overwritten.  Missing leaf
   certificates are issued by the existing CA; a CA certificate without its
   key (or the reverse) is an error, not a silent regeneration.
2. Private keys and the batch key are created with mode 0600 (O_EXCL, so a
   pre-existing file is never followed or reused); files appear atomically
   (written to a temporary name, fsynced, renamed).
3. Every certificate has CN = its name; peers are told apart by CN.  Every
   leaf carries both serverAuth and clientAuth so any process can dial or
   listen (the appliance listens, the card dials).  So a valid certificate
   is not a permission: the appliance admits only the CNs in ``[appliance]
   peers``, by default the card's alone.
4. `server_context` / `client_context` trust *only* ``ca.crt`` (never the
   system store), speak TLS 1.3 only, and always demand the peer's certificate
   (mutual authentication).
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
import socket
import ssl
from pathlib import Path

CA_DAYS = 3650
LEAF_DAYS = 3650  # a local deployment; rotate by deleting the files and re-running init
LEAVES = ("appliance", "card", "host")
BATCH_KEY = "batch.key"
BATCH_KEY_SIZE = 32


class PkiError(Exception):
    """The PKI directory is incomplete or unreadable (one clear line)."""


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``data`` durably; never overwrite one that exists."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if path appeared meanwhile: never overwrite
    finally:
        os.unlink(tmp)


def _write_private(path: Path, data: bytes) -> None:
    _write_new(path, data, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    _write_new(path, data, 0o644)


def init_pki(dir: Path, *, appliance_names: tuple[str, ...] = ()) -> list[str]:
    """Create what is missing under ``dir``; returns the file names created.
    ``appliance_names`` adds DNS names / IP addresses to the appliance
    certificate's SAN (besides 127.0.0.1 and localhost)."""
    # x509 and key generation serve `nicsplit pki init` only: every process
    # that merely loads its certificates (host, card, appliance) skips them.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization  # pki init only, as above
    from cryptography.hazmat.primitives.asymmetric import ec  # pki init only
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # pki init only

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    created: list[str] = []
    now = _dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(minutes=5)  # tolerate small clock skew

    def pem_key(k: ec.EllipticCurvePrivateKey) -> bytes:
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "nicsplit"), x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_crt, ca_key = dir / "ca.crt", dir / "ca.key"
    if ca_crt.exists() != ca_key.exists():
        have, miss = (ca_crt, ca_key) if ca_crt.exists() else (ca_key, ca_crt)
        raise PkiError(f"{have} exists but {miss} does not; restore it or remove the PKI directory")
    if not ca_crt.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        ca_name = name("nicsplit CA")
        cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name).issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + _dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        _write_private(ca_key, pem_key(key))
        _write_public(ca_crt, cert.public_bytes(serialization.Encoding.PEM))
        created += ["ca.key", "ca.crt"]
    try:
        ca_cert = x509.load_pem_x509_certificate(ca_crt.read_bytes())
        ca_priv = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    except (ValueError, OSError) as e:
        raise PkiError(f"cannot load the CA from {dir}: {e}") from None

    for leaf in LEAVES:
        crt, keyf = dir / f"{leaf}.crt", dir / f"{leaf}.key"
        if crt.exists() and keyf.exists():
            continue
        if crt.exists() != keyf.exists():
            have, miss = (crt, keyf) if crt.exists() else (keyf, crt)
            raise PkiError(f"{have} exists but {miss} does not; remove {have} to reissue it")
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.DNSName(leaf)]
        if leaf == "appliance":
            sans = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost"), *sans]
            for extra in appliance_names:
                try:
                    sans.append(x509.IPAddress(ipaddress.ip_address(extra)))
                except ValueError:
                    sans.append(x509.DNSName(extra))
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(leaf)).issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + _dt.timedelta(days=LEAF_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_priv.public_key()), critical=False)
            .sign(ca_priv, hashes.SHA256())
        )
        _write_private(keyf, pem_key(key))
        _write_public(crt, cert.public_bytes(serialization.Encoding.PEM))
        created += [f"{leaf}.key", f"{leaf}.crt"]

    bk = dir / BATCH_KEY
    if not bk.exists():
        _write_private(bk, os.urandom(BATCH_KEY_SIZE))
        created.append(BATCH_KEY)
    return created


def load_batch_key(pki_dir: Path) -> bytes:
    path = Path(pki_dir) / BATCH_KEY
    try:
        key = path.read_bytes()
    except OSError as e:
        raise PkiError(f"cannot read the batch key {path}: {e.strerror or e} (run 'nicsplit pki init')") from None
    if len(key) != BATCH_KEY_SIZE:
        raise PkiError(f"{path}: {len(key)} bytes, an AES-256 key is {BATCH_KEY_SIZE}")
    return key


def _paths(pki_dir: Path, name: str) -> tuple[Path, Path, Path]:
    d = Path(pki_dir)
    ca, crt, key = d / "ca.crt", d / f"{name}.crt", d / f"{name}.key"
    for p in (ca, crt, key):
        if not p.exists():
            raise PkiError(f"{p} does not exist (run 'nicsplit pki init')")
    return ca, crt, key


def _context(purpose: int, pki_dir: Path, name: str) -> ssl.SSLContext:
    ca, crt, key = _paths(pki_dir, name)
    proto = ssl.PROTOCOL_TLS_SERVER if purpose == 0 else ssl.PROTOCOL_TLS_CLIENT
    ctx = ssl.SSLContext(proto)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cafile=str(ca))  # our CA only: no load_default_certs()
        ctx.load_cert_chain(str(crt), str(key))
    except (ssl.SSLError, OSError) as e:
        raise PkiError(f"cannot load the TLS identity {name!r} from {pki_dir}: {e}") from None
    return ctx


def server_context(pki_dir: Path, name: str) -> ssl.SSLContext:
    """TLS 1.3 server context presenting ``name``'s certificate and requiring
    a client certificate signed by our CA."""
    return _context(0, pki_dir, name)


def client_context(pki_dir: Path, name: str) -> ssl.SSLContext:
    """TLS 1.3 client context presenting ``name``'s certificate; it checks the
    server's certificate against our CA and the hostname (connect with
    ``server_hostname="localhost"`` or ``"127.0.0.1"`` for a local appliance)."""
    ctx = _context(1, pki_dir, name)
    ctx.check_hostname = True
    return ctx


def peer_name(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """The CN of the verified peer certificate (None if there is none)."""
    if ssl_object is None:
        return None
    cert = ssl_object.getpeercert()
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


# -- NBD over TLS (nicsplit.host.nbdpolicy) --------------------------------------------
#
# The NBD server presents ``nbd-server.crt`` (SAN: loopback addresses,
# localhost, this machine's name, the names it is given), issued by the CA
# on first use; a client presents any certificate the CA issued, made with
# `issue_nbd_client` in the file names gnutls tools expect (libnbd's
# ``nbd_set_tls_certificates``, qemu's ``tls-creds-x509,dir=...,endpoint=client``).

NBD_SERVER = "nbd-server"
NBD_CLIENT_FILES = ("ca-cert.pem", "client-cert.pem", "client-key.pem")


def _load_ca(dir: Path):
    from cryptography import x509  # issuing only, as in init_pki
    from cryptography.hazmat.primitives import serialization  # issuing only

    ca_crt, ca_key = Path(dir) / "ca.crt", Path(dir) / "ca.key"
    try:
        return (x509.load_pem_x509_certificate(ca_crt.read_bytes()),
                serialization.load_pem_private_key(ca_key.read_bytes(), password=None))
    except (ValueError, OSError) as e:
        raise PkiError(f"cannot load the CA from {dir}: {e} (run 'nicsplit pki init')") from None


def _issue(dir: Path, cn: str, sans: list[str], crt: Path, key: Path, *, server: bool) -> None:
    """Issue a leaf for ``cn`` signed by the CA in ``dir`` into ``crt``/``key`` (never overwriting)."""
    from cryptography import x509  # issuing only
    from cryptography.hazmat.primitives import hashes, serialization  # issuing only
    from cryptography.hazmat.primitives.asymmetric import ec  # issuing only
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # issuing only

    ca_cert, ca_priv = _load_ca(dir)
    now = _dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(minutes=5)
    key_obj = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for n in dict.fromkeys(sans):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            names.append(x509.DNSName(n))
    usage = [ExtendedKeyUsageOID.SERVER_AUTH] if server else [ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "nicsplit"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject).public_key(key_obj.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + _dt.timedelta(days=LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_priv.public_key()), critical=False)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_priv, hashes.SHA256())
    _write_private(key, key_obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    _write_public(crt, cert.public_bytes(serialization.Encoding.PEM))


def nbd_server_context(pki_dir: Path, names: tuple[str, ...] = ()) -> ssl.SSLContext:
    """The NBD server's TLS context (rule 4: TLS 1.3, our CA only, a client
    certificate required). Issues ``nbd-server.crt`` first if it is missing,
    for 127.0.0.1, ::1, localhost, this machine's name and ``names``."""
    d = Path(pki_dir)
    crt, key = d / f"{NBD_SERVER}.crt", d / f"{NBD_SERVER}.key"
    if crt.exists() != key.exists():
        have, miss = (crt, key) if crt.exists() else (key, crt)
        raise PkiError(f"{have} exists but {miss} does not; remove {have} to reissue it")
    if not crt.exists():
        _issue(d, NBD_SERVER, ["127.0.0.1", "::1", "localhost", socket.gethostname(), *names], crt, key, server=True)
    return server_context(d, NBD_SERVER)


def issue_nbd_client(pki_dir: Path, out: Path, cn: str = "nbd-client") -> list[Path]:
    """A client certificate for NBD over TLS in ``out`` (created 0700):
    ``ca-cert.pem``, ``client-cert.pem``, ``client-key.pem`` (0600). Existing
    files are never overwritten."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    paths = [out / n for n in NBD_CLIENT_FILES]
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise PkiError(f"{', '.join(existing)} already exist; choose an empty directory")
    ca = Path(pki_dir) / "ca.crt"
    try:
        ca_pem = ca.read_bytes()
    except OSError as e:
        raise PkiError(f"cannot read {ca}: {e.strerror or e} (run 'nicsplit pki init')") from None
    _issue(Path(pki_dir), cn, [cn], paths[1], paths[2], server=False)
    _write_public(paths[0], ca_pem)
    return paths
