"""Client of the JSON-lines control sockets in DATA/run (host.sock,
card-ctl.sock): one request, one reply line."""

from __future__ import annotations

import json
import socket
from pathlib import Path


def request(path: Path, cmd: dict, timeout: float = 5.0) -> dict | None:
    """Send ``cmd``; the decoded reply, or None when nobody answers."""
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(json.dumps(cmd).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                buf += chunk
        return json.loads(buf)
    except (OSError, ValueError):
        return None
