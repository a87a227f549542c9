"""Progress bars of long commands (restore, verify, image export, wait).

Library functions report ``progress(done, total)`` through a callback and
know nothing of terminals; `Bar` renders it with rich on stderr, only when
stderr is a terminal or ``--progress`` forces it, so ``--json`` output on
stdout is never touched. When the work is done it prints one summary line
on stderr (bytes, time, rate) — unless the output is ``--json`` for a
script and no bar was shown (a machine reads stdout; stderr stays quiet).

Example::

    with Bar(args, "restore vm1-root") as bar:
        restore_to_file(..., progress=bar.update)
    # stderr: restore vm1-root: 1.0 GiB in 3.21 s (319.0 MiB/s)
"""

from __future__ import annotations

import argparse
import sys
import time
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, ProgressColumn, Task, TaskID, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

__all__ = ["Bar", "human_bytes", "summary_line", "enabled"]


def enabled(args: argparse.Namespace) -> bool:
    """Draw bars: stderr is a terminal, or ``--progress`` asks for them."""
    return bool(getattr(args, "progress", False)) or sys.stderr.isatty()


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def summary_line(what: str, nbytes: int, seconds: float) -> str:
    """``what: 8.0 MiB in 0.42 s (19.0 MiB/s)``"""
    rate = nbytes / seconds / 2**20 if seconds > 0 else 0.0
    return f"{what}: {human_bytes(nbytes)} in {seconds:.2f} s ({rate:.1f} MiB/s)"


class _Rate(ProgressColumn):
    """MiB/s, as the summary line says it (rich's own column shows MB/s)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("?" if speed is None else f"{speed / 2**20:.1f} MiB/s", style="progress.data.speed")


class Bar:
    """One progress bar for one operation; a context manager. ``update`` is
    the library's ``progress(done, total)`` callback."""

    def __init__(self, args: argparse.Namespace, what: str) -> None:
        self.what = what
        self.on = enabled(args)
        self.quiet = bool(getattr(args, "json", False)) and not self.on
        self.done = 0
        self.total = 0
        self.t0 = time.monotonic()
        self.seconds = 0.0
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self.extra = ""  # appended to the summary (e.g. "protected")

    def __enter__(self) -> "Bar":
        self.t0 = time.monotonic()
        if self.on:
            console = Console(stderr=True, force_terminal=True if not sys.stderr.isatty() else None)
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                                      DownloadColumn(binary_units=True), _Rate(), TimeElapsedColumn(),
                                      TextColumn("eta"), TimeRemainingColumn(), console=console, transient=False)
            self._progress.start()
            self._task = self._progress.add_task(self.what, total=None)
        return self

    def update(self, done: int, total: int, description: str | None = None) -> None:
        self.done, self.total = done, total
        if self._progress is not None and self._task is not None:
            kw: dict[str, Any] = {"completed": done, "total": total or None}
            if description is not None:
                kw["description"] = description
            self._progress.update(self._task, **kw)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.seconds = time.monotonic() - self.t0
        if self._progress is not None:
            self._progress.stop()
        if exc_type is None:
            self.summary()

    def summary(self, nbytes: int | None = None) -> None:
        if self.quiet:
            return
        n = self.done if nbytes is None else nbytes
        line = summary_line(self.what, n, self.seconds) if n or self.total else f"{self.what}: {self.seconds:.2f} s"
        print(line + (f", {self.extra}" if self.extra else ""), file=sys.stderr, flush=True)
