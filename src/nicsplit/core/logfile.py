"""Size-capped, rotating log files for the long-running processes.

`nicsplit up` runs the appliance, the card and the host with ``--log-file
DATA/run/NAME.log``; each process then logs through `RotatingLog`: when the
file would pass ``max_bytes`` it becomes ``NAME.log.1`` (``.1`` becomes
``.2`` …, the oldest beyond ``keep`` is deleted), so one process's logs take
at most ``max_bytes * (keep + 1)`` bytes, whatever happens.

Rules:
- The process's stderr (fd 2) follows the current file: it is pointed at it
  when the file is opened and after each rotation, so an uncaught traceback
  or a faulthandler dump lands in the log, not in a rotated-away inode.
- Rotation happens in the process that writes (the standard library's
  ``RotatingFileHandler``), so no writer ever blocks on a pipe to the
  supervisor: a stopped supervisor cannot stall the host's IO.

Defaults: 16 MiB per file, 4 rotated files: 80 MiB per process at most,
which at ~150 bytes a line is about 100 000 lines of the newest history each.

Example::

    logging.basicConfig(handlers=[RotatingLog(Path("run/host.log"))], level=logging.INFO)
"""

from __future__ import annotations

import logging.handlers
import os
from pathlib import Path

MAX_BYTES = 16 << 20
KEEP = 4


class RotatingLog(logging.handlers.RotatingFileHandler):
    def __init__(self, path: str | os.PathLike, max_bytes: int = MAX_BYTES, keep: int = KEEP, *,
                 capture_stderr: bool = True) -> None:
        if max_bytes <= 0 or keep < 1:
            raise ValueError(f"log rotation needs max_bytes > 0 and keep >= 1 (got {max_bytes}, {keep})")
        self.capture_stderr = capture_stderr
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        super().__init__(os.fspath(path), maxBytes=max_bytes, backupCount=keep, encoding="utf-8")

    def _open(self):  # the stdlib's hook, called at start and after each rollover
        stream = super()._open()
        if self.capture_stderr:
            os.dup2(stream.fileno(), 2)
        return stream
