"""TLS with pre-shared keys (TLS-PSK) for the NBD servers, as nbdkit's ``--tls-psk``.

Key file
--------
The gnutls ``psktool`` format nbdkit (``--tls-psk=FILE``), qemu
(``tls-creds-psk``: ``DIR/keys.psk``) and libnbd (``tls-psk-file=``) read:
one ``username:hexkey`` line per client. `parse_keys` reads that text
(sans-IO); `load_keys` reads a file and refuses one that group or others may
read, as ssh does with private keys; `add_key` appends a new random key
(``nicsplit pki nbd-psk``).

The context
-----------
Python 3.11's `ssl` has no PSK API (3.13 added one), and the C extension on
the package index for older Pythons breaks asyncio's non-blocking handshake.
So `psk_server_context` builds an ordinary `ssl.SSLContext` without a
certificate and sets OpenSSL's PSK server callback on that context's own
``SSL_CTX`` through ctypes:

- The OpenSSL functions are looked up through the handle of the loaded
  ``_ssl`` module (``RTLD_NOLOAD``: nothing new is loaded), so they resolve
  in the very libssl instance whose ``SSL_CTX`` objects `ssl` makes.
- The ``SSL_CTX *`` is the first field after ``PyObject_HEAD`` in CPython's
  ``PySSLContext``. Before it is used it is validated: the options and the
  verify mode OpenSSL reports for it must be those `ssl` reports, with the
  verify mode read in two states (set by `ssl` between the reads), so an
  address that is not this context's ``SSL_CTX`` is not taken for it.
- Anything missing or not matching raises `PskError` ("TLS-PSK is not
  available with this Python build: ..."): the server then refuses to start
  rather than guess.

OpenSSL 3 calls the same callback for TLS 1.3 (the key is then used with a
SHA-256 suite: `TLS13_PSK_SUITES`, set with ``SSL_CTX_set_ciphersuites``
as `ssl` has no call for it) and for TLS 1.2 (the PSK suites in
`TLS12_PSK_CIPHERS`). A client whose
identity is not in the table gets no key, and as the context has no
certificate to fall back on, its handshake fails.

Example::

    keys = load_keys(Path("/etc/nicsplit/keys.psk"))   # {b"alice": b"..."}
    ctx = psk_server_context(keys)                      # for loop.start_tls(..., server_side=True)
"""

from __future__ import annotations

import _ssl
import ctypes
import logging
import os
import re
import secrets
import ssl
import stat
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)

MIN_KEY = 16            # bytes; psktool makes 32 (its default --keysize)
MAX_KEY = 256           # bytes; OpenSSL's own bound (PSK_MAX_PSK_LEN) is 512
MAX_IDENTITY = 128      # bytes; OpenSSL's bound (PSK_MAX_IDENTITY_LEN) is 256
NEW_KEY = 32            # bytes of a key `add_key` makes
# TLS 1.2 PSK suites, forward-secret ones first (gnutls offers (EC)DHE-PSK
# and plain PSK when a client enables PSK). TLS 1.3 suites are OpenSSL's defaults.
# (OpenSSL ignores a rule that matches nothing: these are key-exchange names, kX.)
TLS12_PSK_CIPHERS = ("kECDHEPSK+CHACHA20:kECDHEPSK+AES:kDHEPSK+AESGCM:kDHEPSK+CHACHA20:"
                     "kPSK+AESGCM:kPSK+CHACHA20:!SHA1:!eNULL")

# TLS 1.3: this callback's keys go with SHA-256 suites only; AES-GCM first
# (OpenSSL's default order puts ChaCha20 first, slower where AES is in hardware).
TLS13_PSK_SUITES = "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256"

_NAME = re.compile(rb"[^\x00-\x20:\x7f]+")   # printable, no blanks, no ':'
_HEX = re.compile(rb"(?:[0-9a-fA-F]{2})+")


class PskError(Exception):
    """A bad key file, or TLS-PSK is not available here (one clear line)."""


# -- the key file ----------------------------------------------------------------------

def parse_keys(text: bytes, source: str = "<keys>") -> dict[bytes, bytes]:
    """``username:hexkey`` lines -> {username: key}. Blank lines are skipped;
    anything else that is not such a line is an error naming ``source`` and the line."""
    keys: dict[bytes, bytes] = {}
    for n, raw in enumerate(text.split(b"\n"), 1):
        line = raw.rstrip(b"\r").strip(b" \t")
        if not line:
            continue
        where = f"{source} line {n}"
        name, colon, hexkey = line.partition(b":")
        if not colon:
            raise PskError(f"{where}: not a 'username:hexkey' line")
        if not name:
            raise PskError(f"{where}: empty user name")
        if name.startswith(b"#"):
            raise PskError(f"{where}: hex-encoded ('#') user names are not supported")
        if not _NAME.fullmatch(name) or len(name) > MAX_IDENTITY:
            raise PskError(f"{where}: user name {name[:40]!r}: at most {MAX_IDENTITY} printable "
                           f"characters without blanks")
        if not _HEX.fullmatch(hexkey):
            raise PskError(f"{where}: key of {name.decode(errors='replace')!r} is not an even "
                           f"number of hex digits")
        key = bytes.fromhex(hexkey.decode())
        if not MIN_KEY <= len(key) <= MAX_KEY:
            raise PskError(f"{where}: key of {name.decode(errors='replace')!r} is {len(key)} bytes: "
                           f"{MIN_KEY} to {MAX_KEY} bytes (psktool makes {NEW_KEY})")
        if name in keys:
            raise PskError(f"{where}: user {name.decode(errors='replace')!r} appears twice")
        keys[name] = key
    return keys


def _check_private(path: Path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise PskError(f"TLS-PSK key file {path}: not a regular file")
    if st.st_mode & 0o077:
        raise PskError(f"TLS-PSK key file {path} is accessible by group or others "
                       f"(mode {stat.S_IMODE(st.st_mode):04o}): chmod 600 {path}")


def _read_private(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            _check_private(path, os.fstat(f.fileno()))
            return f.read()
    except OSError as e:
        raise PskError(f"TLS-PSK key file {path}: {e.strerror or e}") from None


def load_keys(path: Path) -> dict[bytes, bytes]:
    """The keys of a private (mode 0600 or stricter) key file; at least one."""
    path = Path(path)
    keys = parse_keys(_read_private(path), str(path))
    if not keys:
        raise PskError(f"TLS-PSK key file {path} holds no key (make one: nicsplit pki nbd-psk {path} --name NAME)")
    return keys


def add_key(path: Path, name: str) -> bytes:
    """Add ``name`` with a new random key to ``path`` (created with mode
    0600 if missing; replaced whole, atomically); the key."""
    path = Path(path)
    ident = name.encode()
    old = _read_private(path) if path.exists() else b""
    if ident in parse_keys(old, str(path)):
        raise PskError(f"{path} already has a key for {name!r}")
    if old and not old.endswith(b"\n"):
        old += b"\n"
    key = secrets.token_bytes(NEW_KEY)
    line = ident + b":" + key.hex().encode() + b"\n"
    parse_keys(line, "the new line")   # the name's rules, before anything is written
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.write(fd, old + line)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return key


# -- OpenSSL, through the loaded _ssl module -------------------------------------------

PSK_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_uint, ctypes.c_void_p, ctypes.c_char_p,
                                ctypes.POINTER(ctypes.c_ubyte), ctypes.c_uint)
SSL_VERIFY = {ssl.CERT_NONE: 0, ssl.CERT_OPTIONAL: 1, ssl.CERT_REQUIRED: 3}   # SSL_VERIFY_PEER | FAIL_IF_NO_PEER_CERT


def unavailable(why: str) -> PskError:
    return PskError(f"TLS-PSK is not available with this Python build: {why}")


_lib: Any = None


def libssl() -> Any:
    """The OpenSSL functions this module calls, from the libssl `ssl` uses."""
    global _lib
    if _lib is not None:
        return _lib
    where = getattr(_ssl, "__file__", None)   # None: _ssl is built into the interpreter
    try:
        lib = ctypes.CDLL(where, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    except OSError as e:
        raise unavailable(f"cannot reach the loaded _ssl module ({e})") from None
    for name, res, args in (
        ("SSL_CTX_get_options", ctypes.c_uint64, [ctypes.c_void_p]),
        ("SSL_CTX_get_verify_mode", ctypes.c_int, [ctypes.c_void_p]),
        ("SSL_CTX_set_psk_server_callback", None, [ctypes.c_void_p, PSK_CALLBACK]),
    ):
        try:
            fn = getattr(lib, name)
        except AttributeError:
            raise unavailable(f"OpenSSL ({ssl.OPENSSL_VERSION}) exports no {name}") from None
        fn.restype, fn.argtypes = res, args
    try:   # optional: without it TLS 1.3 keeps OpenSSL's default suite order
        lib.SSL_CTX_set_ciphersuites.restype, lib.SSL_CTX_set_ciphersuites.argtypes = ctypes.c_int, [
            ctypes.c_void_p, ctypes.c_char_p]
    except AttributeError:
        pass
    _lib = lib
    return lib


def ssl_ctx_pointer(ctx: ssl.SSLContext) -> int:
    """The validated ``SSL_CTX *`` of ``ctx`` (see the module docstring)."""
    if not isinstance(ctx, _ssl._SSLContext):
        raise unavailable(f"{type(ctx).__name__} is not an ssl.SSLContext")
    if _ssl._SSLContext.__basicsize__ < object.__basicsize__ + ctypes.sizeof(ctypes.c_void_p):
        raise unavailable("ssl.SSLContext has no room for an SSL_CTX pointer")
    ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not ptr:
        raise unavailable("ssl.SSLContext holds no SSL_CTX where CPython keeps it")
    validate(libssl(), ptr, ctx)
    return ptr


def validate(lib: Any, ptr: int, ctx: ssl.SSLContext) -> None:
    """``ptr`` is ``ctx``'s SSL_CTX: what OpenSSL reads there is what `ssl` says."""
    got = lib.SSL_CTX_get_options(ptr)
    if got != int(ctx.options):
        raise unavailable(f"the SSL_CTX found has options {got:#x}, ssl.SSLContext says {int(ctx.options):#x}")
    before = ctx.verify_mode
    try:
        for mode in (ssl.CERT_OPTIONAL, ssl.CERT_REQUIRED):   # both allowed whatever check_hostname is
            ctx.verify_mode = mode
            got = lib.SSL_CTX_get_verify_mode(ptr)
            if got != SSL_VERIFY[mode]:
                raise unavailable(f"the SSL_CTX found has verify mode {got}, ssl.SSLContext set {SSL_VERIFY[mode]}")
    finally:
        ctx.verify_mode = before


def psk_server_context(keys: Mapping[bytes, bytes]) -> ssl.SSLContext:
    """A server context that authenticates clients by ``keys`` alone
    ({identity: key}; no certificate on either side)."""
    if not keys:
        raise PskError("TLS-PSK needs at least one key")
    table = dict(keys)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # No resumption tickets (TLS 1.2 nor 1.3): every connection proves its key.
    ctx.options |= ssl.OP_NO_TICKET
    ctx.num_tickets = 0
    try:
        ctx.set_ciphers(TLS12_PSK_CIPHERS)
    except ssl.SSLError as e:
        raise unavailable(f"OpenSSL ({ssl.OPENSSL_VERSION}) has no TLS 1.2 PSK suites ({e})") from None
    lib = libssl()
    ptr = ssl_ctx_pointer(ctx)

    def find(_ssl_ptr: int | None, identity: bytes | None, out: Any, room: int) -> int:
        # Runs inside OpenSSL's handshake: never raise (ctypes would print and return 0).
        try:
            key = table.get(identity or b"")
            if key is None or len(key) > room:
                log.info("TLS-PSK: no key for identity %r", (identity or b"")[:64].decode(errors="replace"))
                return 0
            ctypes.memmove(out, key, len(key))
            log.debug("TLS-PSK: identity %r", identity.decode(errors="replace") if identity else "")
            return len(key)
        except Exception:   # noqa: BLE001 - a failed lookup must fail the handshake, not the loop
            log.exception("TLS-PSK: key lookup failed")
            return 0

    set_suites = getattr(lib, "SSL_CTX_set_ciphersuites", None)
    if set_suites is not None and set_suites(ptr, TLS13_PSK_SUITES.encode()) != 1:
        raise unavailable(f"OpenSSL ({ssl.OPENSSL_VERSION}) refused the TLS 1.3 suites {TLS13_PSK_SUITES}")
    callback = PSK_CALLBACK(find)
    lib.SSL_CTX_set_psk_server_callback(ptr, callback)
    # OpenSSL keeps only the function pointer: the ctypes thunk must live as long as the context.
    ctx._nicsplit_psk_callback = callback  # type: ignore[attr-defined]
    return ctx
