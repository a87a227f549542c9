"""Is a pid still the process we started? (pids are reused)."""

from __future__ import annotations

import os
from pathlib import Path


def runs(pid: int, *words: str) -> bool:
    """True if ``pid`` is alive (not a zombie) and its command line holds
    every one of ``words``; reaps it when it is our own exited child."""
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    if state in ("Z", "X"):
        try:
            os.waitpid(pid, os.WNOHANG)  # our own child (in-process callers): reap it
        except ChildProcessError:
            pass
        return False
    return all(w.encode() in cmdline for w in words)


def listening_sockets() -> list[tuple[int, str]]:
    """``(port, socket inode)`` of every TCP socket listening on this machine
    (any address, v4 and v6), from /proc/net."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == "0A":  # 0A = LISTEN
                out.append((int(f[1].rsplit(":", 1)[1], 16), f[9]))
    return out
