"""The API's bearer token: 32 random bytes, hex, in ``DATA/pki/api.token``
(mode 0600), created by ``nicsplit init``. Whoever can read it may drive
every recovery operation, so it lives next to the deployment's private keys.
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

__all__ = ["ensure_token", "read_token", "token_matches"]


def ensure_token(path: Path) -> str:
    """The token in ``path``, created (O_EXCL, 0600) when missing."""
    try:
        return read_token(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = secrets.token_hex(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return read_token(path)  # a concurrent init won the race
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
        f.flush()
        os.fsync(f.fileno())
    return token


def read_token(path: Path) -> str:
    token = path.read_text().strip()
    if len(token) < 32:
        raise ValueError(f"{path}: the API token is too short; delete the file and run 'nicsplit init'")
    return token


def token_matches(header: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``token`` (constant time)."""
    scheme, _, given = (header or "").strip().partition(" ")
    if scheme.lower() != "bearer":  # auth schemes are case-insensitive (RFC 9110)
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())
