"""Failpoints: named places in production code where a test can make the
process die, stop, stall or fail (FoundationDB's buggify, FreeBSD's fail(9)).

Production code opts in at its dangerous steps::

    from nicsplit.core import failpoints as fp
    ...
    if fp.ACTIVE:
        fp.hit("appliance.before-fsync")

``ACTIVE`` is a module-level dict, empty unless the environment arms points,
so an unarmed point costs one truth test of an empty dict.

Configuration (read once, at import; `configure` re-reads it):

``NICSPLIT_FAILPOINTS="NAME=SPEC[,NAME=SPEC...]"`` where SPEC is
``[PCT%][COUNT*]ACTION[(ARG)]``, as in fail(9):

- ``kill``: SIGKILL this process (no cleanup, like kill -9);
- ``stop``: SIGSTOP this process (someone must SIGCONT it);
- ``delay(MS)``: sleep MS milliseconds on the calling thread;
- ``error(ERRNO)``: raise ``OSError(ERRNO)`` (a number or a name: ``error(ENOSPC)``);
- ``off``: nothing (a placeholder).

``PCT%`` fires with that probability at each hit (a float, default 100);
``COUNT*`` fires at most COUNT times (default: every time).  The draws come
from a random generator per point seeded from ``NICSPLIT_FAILPOINT_SEED``
(default 0) and the point's name: a run is reproducible.

``NICSPLIT_FAILPOINT_DIR=DIR`` makes COUNT shared by every process that
inherits the environment (a supervisor's restarted child would otherwise
fire again, forever): each firing first creates ``DIR/NAME.K`` (K = 0 ..
COUNT-1) exclusively, and a point whose files all exist is spent.  The files
also tell a test which points fired.  With a directory, points can also be
armed while processes run: a thread (started only then) re-reads
``DIR/armed`` (the same NAME=SPEC list, added to the environment's) when
its modification time changes, ten times a second.

Every firing is logged (WARNING, logger ``nicsplit.failpoints``) before it
acts.  The points are listed in docs/faults.md.
"""

from __future__ import annotations

import errno as _errno
import logging
import os
import random
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ACTIVE", "FailpointError", "Failpoint", "hit", "configure", "parse", "ENV", "SEED_ENV", "DIR_ENV"]

ENV = "NICSPLIT_FAILPOINTS"
SEED_ENV = "NICSPLIT_FAILPOINT_SEED"
DIR_ENV = "NICSPLIT_FAILPOINT_DIR"
ACTIONS = ("kill", "stop", "delay", "error", "off")

log = logging.getLogger("nicsplit.failpoints")

_SPEC = re.compile(r"^(?:(?P<pct>\d+(?:\.\d+)?)%)?(?:(?P<count>\d+)\*)?(?P<action>[a-z]+)(?:\((?P<arg>[^()]*)\))?$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


class FailpointError(ValueError):
    """A failpoint specification that cannot be parsed."""


@dataclass
class Failpoint:
    name: str
    action: str
    arg: int = 0
    pct: float = 100.0
    count: int | None = None  # None: unlimited
    rng: random.Random = field(default_factory=random.Random, repr=False)
    fired: int = 0
    shared: Path | None = None  # NICSPLIT_FAILPOINT_DIR
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _take(self) -> bool:
        """Whether this hit fires (probability, then the count, local or shared)."""
        with self.lock:
            if self.pct < 100.0 and self.rng.random() * 100.0 >= self.pct:
                return False
            if self.count is None:
                self.fired += 1
                return True
            if self.shared is None:
                if self.fired >= self.count:
                    return False
                self.fired += 1
                return True
            for k in range(self.count):
                try:
                    fd = os.open(self.shared / f"{self.name}.{k}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    continue
                os.write(fd, f"{os.getpid()}\n".encode())
                os.close(fd)
                self.fired += 1
                return True
            return False

    def fire(self) -> None:
        if self.action == "off" or not self._take():
            return
        log.warning("failpoint %s: %s%s (pid %d)", self.name, self.action,
                    f"({self.arg})" if self.action in ("delay", "error") else "", os.getpid())
        for h in logging.getLogger().handlers:
            h.flush()
        if self.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.action == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
        elif self.action == "delay":
            time.sleep(self.arg / 1000.0)
        elif self.action == "error":
            raise OSError(self.arg, f"{os.strerror(self.arg)} (failpoint {self.name})")


# name -> armed point; empty unless the environment arms some (the one test at each site).
ACTIVE: dict[str, Failpoint] = {}


def hit(name: str) -> None:
    """The failpoint ``name`` is reached: act if it is armed."""
    p = ACTIVE.get(name)
    if p is not None:
        p.fire()


def _errno_of(arg: str, spec: str) -> int:
    if arg.isdigit():
        return int(arg)
    n = getattr(_errno, arg.upper(), None)
    if not isinstance(n, int):
        raise FailpointError(f"failpoint {spec!r}: {arg!r} is not an errno (a number or a name such as ENOSPC)")
    return n


def parse(text: str, seed: int = 0, shared: Path | None = None) -> dict[str, Failpoint]:
    """``NAME=SPEC[,NAME=SPEC]`` (module docstring) as armed points."""
    points: dict[str, Failpoint] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, spec = item.partition("=")
        name, spec = name.strip(), spec.strip()
        if not sep or not _NAME.match(name):
            raise FailpointError(f"failpoint {item!r}: expected NAME=SPEC with a name of a-z 0-9 . _ -")
        m = _SPEC.match(spec)
        if m is None or m["action"] not in ACTIONS:
            raise FailpointError(f"failpoint {item!r}: SPEC is [PCT%][COUNT*]ACTION[(ARG)] with ACTION one of "
                                 f"{', '.join(ACTIONS)}")
        action, arg = m["action"], m["arg"] or ""
        if action == "delay":
            if not arg.isdigit():
                raise FailpointError(f"failpoint {item!r}: delay needs milliseconds, delay(50)")
            n = int(arg)
        elif action == "error":
            n = _errno_of(arg, item)
        elif arg:
            raise FailpointError(f"failpoint {item!r}: {action} takes no argument")
        else:
            n = 0
        pct = float(m["pct"]) if m["pct"] is not None else 100.0
        if not 0.0 <= pct <= 100.0:
            raise FailpointError(f"failpoint {item!r}: a probability is 0..100%")
        count = int(m["count"]) if m["count"] is not None else None
        points[name] = Failpoint(name, action, n, pct, count, random.Random(f"{seed}/{name}"), shared=shared)
    return points


ARMED_FILE = "armed"


def _armed_file(shared: Path | None) -> str:
    if shared is None:
        return ""
    try:
        return (shared / ARMED_FILE).read_text()
    except OSError:
        return ""


def _watch(env: dict[str, str], shared: Path) -> None:
    """Re-arm when ``DIR/armed`` changes (a daemon thread)."""
    seen = None
    while True:
        try:
            st = (shared / ARMED_FILE).stat()
            now = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            now = None
        if now != seen:
            seen = now
            try:
                configure(env, keep_same=True)
            except FailpointError as e:
                log.error("%s", e)
        time.sleep(0.1)  # a poll period


_armed_with: tuple = ()  # the configuration ACTIVE was built from


def configure(env: dict[str, str] | None = None, *, watch: bool = False, keep_same: bool = False) -> dict[str, Failpoint]:
    """(Re)arm ``ACTIVE`` from the environment; returns it. A bad
    specification raises `FailpointError` (a test's mistake must not pass
    silently as "no fault")."""
    e = os.environ if env is None else env
    raw_seed = e.get(SEED_ENV, "0")
    try:
        seed = int(raw_seed)
    except ValueError:
        raise FailpointError(f"{SEED_ENV}={raw_seed!r} is not an integer") from None
    shared = Path(e[DIR_ENV]) if e.get(DIR_ENV) else None
    text = ",".join(filter(None, (e.get(ENV, ""), _armed_file(shared).replace("\n", ","))))
    global _armed_with
    points = parse(text, seed, shared)
    if not keep_same or _armed_with != (text, seed, shared):  # an unchanged file keeps the points' state
        _armed_with = (text, seed, shared)
        ACTIVE.clear()  # in place: call sites hold the dict itself
        ACTIVE.update(points)
        if points:
            log.warning("failpoints armed: %s", ", ".join(f"{p.name}={p.action}" for p in points.values()))
    if watch and shared is not None:
        threading.Thread(target=_watch, args=(dict(e), shared), name="failpoints", daemon=True).start()
    return ACTIVE


if os.environ.get(ENV) or os.environ.get(DIR_ENV):
    configure(watch=bool(os.environ.get(DIR_ENV)))
