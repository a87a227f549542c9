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
