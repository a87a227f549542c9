"""The demo echo card (`nicsplit.card.transports.ring_echo`) as a real
subprocess, for tests that put the host half of a transport in the test
process and the card half in another process over real shared memory.

`EchoCard(run_dir, *args)` starts one card and reads its ready line;
`echo_cards(root)` is a context manager yielding a `start(*args)` that starts
cards in numbered run folders under `root` and kills any left at exit::

    with echo_cards(tmp_path) as start:
        card = start("--transport", "nvme-pi", "--data-size", str(1 << 20))
        ...
        stats = card.stop()
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path


class EchoCard:
    """One echo card process; its stderr goes to ``card-<run folder>.log``."""

    def __init__(self, run_dir: Path, *args: str) -> None:
        self.run_dir = run_dir
        self.log_path = run_dir.parent / f"card-{run_dir.name}.log"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nicsplit.card.transports.ring_echo", "--run-dir", str(run_dir), *args],
            stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL, text=True,
        )
        line = self.proc.stdout.readline()  # the card prints its ready line before serving
        if not line:
            raise RuntimeError(f"echo card exited {self.proc.wait()} before ready:\n{self.log()}")
        self.ready = json.loads(line)
        self.socket = str(run_dir / "card.sock")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> dict:
        """SIGTERM, wait for a clean exit and return the card's stats line."""
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, self.log()
        for line in out.splitlines():
            ev = json.loads(line)
            if ev["event"] == "stats":
                return ev
        raise AssertionError(f"no stats line from the card:\n{out}\n{self.log()}")

    def kill(self) -> None:
        """Kill the card if it still runs (a SIGSTOPped one too)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@contextlib.contextmanager
def echo_cards(root: Path) -> Iterator[Callable[..., EchoCard]]:
    """Yield `start(*args)`, which starts a card in ``root/run<N>``; every
    card started is killed (if still running) on exit."""
    cards: list[EchoCard] = []

    def start(*args: str) -> EchoCard:
        c = EchoCard(root / f"run{len(cards)}", *args)
        cards.append(c)
        return c

    try:
        yield start
    finally:
        for c in cards:
            c.kill()
