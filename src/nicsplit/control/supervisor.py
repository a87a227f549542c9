"""``nicsplit up``: appliance, card and host on one machine, supervised.

Rules:
- Start order follows the data path's dependencies: appliance (where data
  goes), card (which ships to it), host (which splits to the card). Each child
  prints one JSON "ready" line on stdout; the next starts only after it.
- A child that dies is restarted after a back-off (0.5 s doubling to 10 s,
  reset after 60 s of good health); the host never waits for the card or the
  appliance — while they are down its vdisks go to marking (P4).
- Each child's pid is written to ``DATA/run/<name>.pid`` so ``nicsplit
  status`` can name the processes; the supervisor's own to ``up.pid``.
- SIGTERM/SIGINT stops the children in reverse order (host first, so no new
  writes arrive while the card drains), each with SIGTERM and a deadline.
- The children die with the supervisor, however it dies (kill -9 too):
  each is started with a parent-death signal (prctl PR_SET_PDEATHSIG =
  SIGTERM, set in the child between fork and exec, so it survives exec).
  The kernel sends it when the *thread* that forked the child exits: the
  children are forked from the event loop's thread, which is the main
  thread and lives as long as the process. If the supervisor died before
  the prctl took effect, the child's parent is already someone else:
  it checks getppid() after setting it and exits.
- A new ``up`` first looks at the pid files an earlier one left
  (`check_stale`): a file whose process is gone (or is no nicsplit
  process: pids are reused) is removed; one whose nicsplit process still
  runs stops the start with an error naming the pid, before anything is
  started or any pid file is overwritten.
- A child may be pinned to CPUs (``Child.cpus``, from
  `nicsplit.core.placement`): its affinity is set between fork and exec, so
  all its threads inherit it, restarts included.
- Each child logs to ``DATA/run/<name>.log`` (``--log-file``), rotated by
  the child itself at ``log_max`` bytes keeping ``log_keep`` old files
  (`nicsplit.core.logfile`): logs never grow without bound, and no child
  writes through a pipe the supervisor must drain.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from nicsplit.core import failpoints as _fp
from nicsplit.core import ctl
from nicsplit.core.fsutil import atomic_write
from nicsplit.core.layout import Layout
from nicsplit.core.procutil import runs
from nicsplit.core.logfile import KEEP, MAX_BYTES

_FP = _fp.ACTIVE  # armed failpoints (nicsplit.core.failpoints): empty unless a test arms some

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 30.0
# A child that reports progress ({"event": "starting"} lines: the appliance
# recovering a big journal) gets READY_TIMEOUT_S more from each, up to this.
STARTING_MAX_S = 1800.0
STOP_TIMEOUT_S = 20.0

# linux/prctl.h
PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


class SupervisorError(RuntimeError):
    """``up`` cannot start: processes of an earlier one still run."""


def die_with_parent(parent: int, cpus: tuple[int, ...] | None = None) -> Callable[[], None]:
    """A ``preexec_fn`` for a child of process ``parent``: the child gets
    SIGTERM when the thread that forked it exits, and exits at once if
    ``parent`` is gone already (it died between fork and prctl). ``cpus``:
    the CPUs it may run on (None: those it inherits)."""
    def preexec() -> None:
        _libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)
        if cpus:
            os.sched_setaffinity(0, cpus)
    return preexec


def check_stale(layout: Layout, names: list[str]) -> list[str]:
    """Remove the pid files under ``layout.run`` of ``names`` whose process
    is gone; raise `SupervisorError` naming every one that still runs (a
    nicsplit process). Returns the names of the files removed."""
    removed, live = [], []
    for name in names:
        f = layout.pid(name)
        try:
            raw = f.read_text().strip()
        except FileNotFoundError:
            continue
        pid = int(raw) if raw.isdigit() else 0
        if pid and pid != os.getpid() and runs(pid, "nicsplit"):
            live.append((name, pid))
        else:
            f.unlink(missing_ok=True)
            removed.append(name)
    if removed:
        log.info("removed stale pid files of %s (their processes are gone)", ", ".join(removed))
    if live:
        who = ", ".join(f"{n} (pid {p}, {layout.pid(n)})" for n, p in live)
        raise SupervisorError(f"processes of an earlier nicsplit up on {layout.data} "
                              f"still run: {who}; stop them (kill {' '.join(str(p) for _, p in live)}) "
                              "and run up again")
    return removed


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: asyncio.subprocess.Process | None = None
    ready: dict = field(default_factory=dict)
    restarts: int = 0
    started_at: float = 0.0
    # Extra arguments computed from earlier children's ready lines.
    args_from: Callable[[dict[str, dict]], list[str]] | None = None
    # Arguments fixed after the first start from its own ready line (e.g. the
    # port picked for --listen 127.0.0.1:0, so a restart keeps the address).
    sticky: Callable[[dict], list[str]] | None = None
    # The CPUs it may run on (nicsplit.core.placement); None: not pinned.
    cpus: tuple[int, ...] | None = None


class Supervisor:
    def __init__(self, data: Path, children: list[Child], on_ready: Callable[[dict[str, dict]], None] | None = None,
                 *, log_max: int = MAX_BYTES, log_keep: int = KEEP) -> None:
        self.data = data
        self.log_max, self.log_keep = log_max, log_keep
        self.layout = Layout(data)
        self.run_dir = self.layout.run
        self.children = children
        self.on_ready = on_ready
        self._stopping = False

    async def _start(self, c: Child) -> None:
        log_path = self.layout.log(c.name)
        logf = open(log_path, "ab")  # stderr until the child's logging takes it over (core.logfile)
        argv = list(c.argv)
        if c.args_from is not None:
            argv += c.args_from({o.name: o.ready for o in self.children if o.ready})
        argv += ["--log-file", str(log_path), "--log-max", str(self.log_max), "--log-keep", str(self.log_keep)]
        c.proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=logf, stdin=asyncio.subprocess.DEVNULL,
            preexec_fn=die_with_parent(os.getpid(), c.cpus),
        )
        logf.close()
        c.started_at = time.monotonic()
        atomic_write(self.layout.pid(c.name), str(c.proc.pid).encode())  # readers never see it empty
        try:
            c.ready = await self._wait_ready(c)
        except (asyncio.TimeoutError, EOFError) as e:
            tail = log_path.read_text(errors="replace")[-2000:]
            # A timeout's str() is empty: say what the wait was.
            why = str(e) or f"no ready line within {READY_TIMEOUT_S:g} s"
            raise RuntimeError(f"{c.name} did not start ({why}); its log ({log_path}) ends:\n{tail}") from None
        if c.sticky is not None and c.restarts == 0:
            c.argv = c.argv + c.sticky(c.ready)
        log.info("%s ready (pid %d%s)", c.name, c.proc.pid, f", CPUs {list(c.cpus)}" if c.cpus else "")

    async def _wait_ready(self, c: Child) -> dict:
        """The child's ready line, within READY_TIMEOUT_S of its start or of
        its last progress line (at most STARTING_MAX_S in all)."""
        assert c.proc and c.proc.stdout
        start = time.monotonic()
        deadline = start + READY_TIMEOUT_S
        while True:
            line = await asyncio.wait_for(c.proc.stdout.readline(), max(0.0, deadline - time.monotonic()))
            if not line:
                raise EOFError(f"{c.name} exited with {await c.proc.wait()}")
            progress = ctl.starting_message(line)
            if progress is not None:
                now = time.monotonic()
                deadline = min(now + READY_TIMEOUT_S, start + STARTING_MAX_S)
                log.info("%s still starting (%.0f s): %s", c.name, now - start, progress.get("step", "working"))
                continue
            msg = ctl.ready_message(line)
            if msg is not None:
                # Keep draining stdout so the child never blocks on a full pipe.
                asyncio.get_running_loop().create_task(self._drain(c))
                return msg

    async def _drain(self, c: Child) -> None:
        assert c.proc and c.proc.stdout
        while await c.proc.stdout.readline():
            pass

    async def run(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        check_stale(self.layout, ["up", *(c.name for c in self.children)])
        atomic_write(self.layout.pid("up"), str(os.getpid()).encode())
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            for i, c in enumerate(self.children):
                if i and _FP:
                    _fp.hit("supervisor.between-starts")  # some children started, not all
                await self._start(c)
            if self.on_ready:
                self.on_ready({c.name: c.ready for c in self.children})
            async with asyncio.TaskGroup() as tg:
                watchers = [tg.create_task(self._watch(c, stop)) for c in self.children]
                await stop.wait()
                self._stopping = True
                for w in watchers:
                    w.cancel()
        finally:
            self._stopping = True
            await self._stop_all()
            self.layout.pid("up").unlink(missing_ok=True)

    async def _watch(self, c: Child, stop: asyncio.Event) -> None:
        backoff = 0.5
        while not stop.is_set():
            assert c.proc
            rc = await c.proc.wait()
            if self._stopping:
                return
            if time.monotonic() - c.started_at > 60:
                backoff = 0.5
            log.error("%s exited with %s; restarting in %.1fs", c.name, rc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)
            c.restarts += 1
            try:
                await self._start(c)
            except RuntimeError as e:
                log.error("%s", e)

    async def _stop_all(self) -> None:
        for c in reversed(self.children):
            p = c.proc
            if p is None or p.returncode is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(p.wait(), STOP_TIMEOUT_S)
            except asyncio.TimeoutError:
                log.error("%s ignored SIGTERM for %ss; killing it", c.name, STOP_TIMEOUT_S)
                p.kill()
                await p.wait()
            self.layout.pid(c.name).unlink(missing_ok=True)


def child_argv(data: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "nicsplit", "--data", str(data), *args]
