"""Which point in time: selectors, time parsing, PIT listing and bookmarks.

Every recovery command names a PIT the same way (`Selector`): ``--at TIME``,
``--seq N``, ``--bookmark NAME`` or ``--latest``. `resolve_pit` turns one
into a `Pit` of a CG's index and refuses a PIT that needs a damaged stretch
of the journal or one inside a merge window.

The journal is read read-only (no lock; the appliance may be appending).

TIME for ``--at``: seconds since the epoch (``1718000000.5``), ISO 8601
(``2024-06-10T08:00:00``, local time unless it has an offset), ``now``, or
relative to now (``-90s``, ``-15m``, ``-2h``, ``-1d``).

Example::

    idx = open_index(check_cg(data, "cg1"), "cg1")
    pit = resolve_pit(idx, data, "cg1", Selector(bookmark="before-upgrade"))
"""

from __future__ import annotations

import datetime as dt
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nicsplit.core import ctl
from nicsplit.core.catalog import open_catalog
from nicsplit.core.cgs import CGCatalog
from nicsplit.core.config import Config
from nicsplit.core.layout import Layout
from nicsplit.recovery.errors import RecoveryError
from nicsplit.recovery.hooks import CRASH, DEFAULT_TIMEOUT, Hooks, quiesced
from nicsplit.journal.scan import Damage
from nicsplit.recovery.bookmarks import Bookmark, add_bookmark, get_bookmark, list_bookmarks, lock_bookmark
from nicsplit.recovery.pits import Pit, PitIndex
from nicsplit.recovery.retention import Policy, thin

_RELATIVE = re.compile(r"^-(\d+(?:\.\d+)?)([smhd])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True, slots=True)
class Selector:
    """Which PIT: exactly one of ``at`` (TIME), ``seq``, ``bookmark``, ``latest``."""
    at: str | None = None
    seq: int | None = None
    bookmark: str | None = None
    latest: bool = False

    def argv(self) -> list[str]:
        """The same selector as command-line options (for a server started as a process)."""
        if self.at is not None:
            return ["--at", self.at]
        if self.seq is not None:
            return ["--seq", str(self.seq)]
        if self.bookmark is not None:
            return ["--bookmark", self.bookmark]
        return ["--latest"]


def parse_time(value: str, now_ns: int | None = None) -> int:
    """``--at`` TIME → ns since the epoch (see the module docstring)."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    v = value.strip()
    if v == "now":
        return now_ns
    m = _RELATIVE.match(v)
    if m:
        return now_ns - int(float(m.group(1)) * _UNIT[m.group(2)] * 1e9)
    try:
        return int(float(v) * 1e9)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(v)
    except ValueError:
        raise RecoveryError(f"bad time {value!r}: use seconds since the epoch, ISO 8601, 'now' or -N[smhd]") from None
    return int(when.timestamp() * 1e9)  # naive = local time


def format_time(seconds: float) -> str:
    """A PIT's time (seconds since the epoch, as in every result's ``time``)
    as local ISO 8601 with milliseconds."""
    return dt.datetime.fromtimestamp(seconds).isoformat(timespec="milliseconds")


def check_cg(data: Path, cg: str) -> Path:
    """The CG's journal directory; CGError for a CG nobody knows."""
    jd = Layout(data).journal(cg)
    if jd.is_dir():
        return jd
    CGCatalog(Path(data)).get(cg)
    return jd  # known CG, nothing journaled yet


def open_index(jd: Path, cg: str) -> PitIndex:
    """The PIT index of a CG's journal directory (one scan)."""
    require_journal(jd, cg)
    return PitIndex(jd)


def require_journal(jd: Path, cg: str) -> None:
    if not jd.is_dir():
        raise RecoveryError(f"consistency group {cg} has no journal yet (no point in time)")


def resolve_pit(idx: PitIndex, data: Path, cg: str, sel: Selector, now_ns: int | None = None) -> Pit:
    """The PIT ``sel`` names; refuses a PIT that needs a damaged stretch of
    the journal, or one inside a merge window."""
    if sel.at is not None:
        pit = idx.pit_at(parse_time(sel.at, now_ns))
    elif sel.seq is not None:
        pit = idx.pit_for_seq(sel.seq)
    elif sel.bookmark is not None:
        pit = idx.pit_for_seq(get_bookmark(data, cg, sel.bookmark).seq)
    elif sel.latest:
        pit = idx.latest()
    else:
        raise RecoveryError("say which point in time: --at TIME, --seq N, --bookmark NAME or --latest")
    idx.check_usable(pit)  # a damaged journal: UnusablePit names the segment and the lost seqs
    if not pit.consistent:
        where = ("inside a protection gap (a vdisk of the CG was marking or resyncing: the journal lacks "
                 "acknowledged writes until the resync ends)" if pit.gap else "inside a merge window")
        raise RecoveryError(f"the point in time at seq {pit.seq} is {where}, not crash-consistent; "
                            f"pick a consistent one from 'nicsplit pits {cg}'")
    return pit


def cg_vdisks(cfg: Config, cg: str) -> list[Any]:
    """The catalog's vdisks of a CG (CGError for an unknown CG)."""
    CGCatalog(cfg.data).get(cg)
    if not Layout(cfg.data).catalog.exists():
        raise RecoveryError(f"no datastore catalog in {cfg.datastore_dir}: an image needs its vdisks' ids and sizes")
    vds = open_catalog(cfg.datastore_dir).cg_members(cg)
    if not vds:
        raise RecoveryError(f"consistency group {cg} has no vdisks")
    return vds


# -- listing ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PitListing:
    pits: list[Pit]
    bookmarks: dict[int, list[str]]  # seq -> bookmark names
    damage: list[Damage]


def list_pits(cfg: Config, cg: str, *, every: bool = False, now_ns: int | None = None) -> PitListing:
    """A CG's PITs, oldest first: those retention's thinning offers (all
    recent ones, then one per hour, and bookmarked ones), or ``every`` one."""
    jd = check_cg(cfg.data, cg)
    idx = PitIndex(jd) if jd.is_dir() else None
    pits = idx.list_pits() if idx is not None else []
    damage = idx.damage if idx is not None else []
    marks: dict[int, list[str]] = {}
    for b in list_bookmarks(cfg.data, cg):
        marks.setdefault(b.seq, []).append(b.name)
    if not every:
        policy = Policy.from_config(cfg.raw.get("retention"))
        now = time.time_ns() if now_ns is None else now_ns
        keep = thin([p.time_ns for p in pits], now, policy, [p.seq in marks for p in pits], expired=True)
        pits = [p for p, k in zip(pits, keep) if k]
    return PitListing(pits, marks, damage)


# -- bookmarks ---------------------------------------------------------------------------


def barrier(data: Path, cg: str) -> int | None:
    """Ask the running host for a barrier in the CG's stream, acknowledged by
    the card; its seq, or None when no host runs."""
    reply = ctl.request(Layout(data).host_sock, {"cmd": "barrier", "cg": cg}, timeout=10.0)
    if reply is None:
        return None
    if not reply.get("ok"):
        raise RecoveryError(f"cannot bookmark {cg}: {reply.get('error')}")
    return int(reply["seq"])


def wait_for_pit(idx: PitIndex, seq: int, timeout: float) -> Pit:
    """The first consistent PIT at or after ``seq``, once journaled."""
    deadline = time.monotonic() + timeout
    pause = 0.002
    while True:
        idx.refresh()
        pit = idx.first_at_or_after(seq)
        if pit is not None:
            return pit
        if time.monotonic() >= deadline:
            raise RecoveryError(f"seq {seq} was not journaled within {timeout:g} s (is the card shipping? "
                                f"see 'nicsplit status')")
        time.sleep(pause)  # polling the journal files: the appliance has no push channel to us
        pause = min(pause * 2, 0.05)


def index_when_ready(jd: Path, cg: str, timeout: float) -> PitIndex:
    """The CG's PIT index; a CG whose first batch is still on its way has no
    journal directory yet, so wait for it (bounded)."""
    deadline = time.monotonic() + timeout
    while not jd.is_dir() and time.monotonic() < deadline:
        time.sleep(0.01)  # polling the file system, see wait_for_pit
    return open_index(jd, cg)


@dataclass(frozen=True, slots=True)
class Bookmarked:
    bookmark: Bookmark
    host_down: bool  # no host ran: the latest journaled PIT was bookmarked
    notes: tuple[str, ...] = ()  # why only crash-consistent; a thaw that failed (`nicsplit.recovery.hooks`)


def bookmark(data: Path, cg: str, name: str, *, lock: bool = False, seq: int | None = None,
             quiesce: str | None = None, thaw: str | None = None, hook_timeout: float = DEFAULT_TIMEOUT,
             timeout: float = 30.0, hooks: Hooks | None = None) -> Bookmarked:
    """Bookmark the first PIT after a barrier the card acknowledged: it covers
    every write acknowledged to a client before the call. With hooks
    (``hooks``, or the ``quiesce`` / ``thaw`` commands) the application is
    quiesced around the barrier: application-consistent when the pre hook
    succeeded, else still bookmarked, crash-consistent, saying why; the post
    hook always runs (`nicsplit.recovery.hooks`). ``seq`` names the PIT
    instead; without a host, the latest journaled PIT."""
    jd = check_cg(data, cg)
    if hooks is None and (quiesce or thaw):
        hooks = Hooks(quiesce, thaw, hook_timeout)
    host_down = False
    consistency, notes, ran = CRASH, [], None
    if seq is not None:
        if hooks is not None:
            raise RecoveryError("--seq names an existing point in time: hooks cannot quiesce the past")
        pit = open_index(jd, cg).pit_for_seq(seq)
    else:
        if hooks is not None:
            q = quiesced(hooks, cg, lambda: barrier(data, cg))
            at, consistency, notes, ran = q.value, q.consistency, q.notes, q.hooks_json()
        else:
            at = barrier(data, cg)
        if at is None:
            if hooks is not None:
                raise RecoveryError("the host is not running: a quiesced bookmark needs it (for the barrier)")
            host_down = True
            pit = open_index(jd, cg).latest()
        else:
            pit = wait_for_pit(index_when_ready(jd, cg, timeout), at, timeout)
    b = add_bookmark(data, cg, name, pit.seq, locked=lock, time_ns=pit.time_ns, consistency=consistency,
                     note="; ".join(notes) or None, hooks=ran)
    return Bookmarked(b, host_down, tuple(notes))


def set_bookmark_lock(data: Path, cg: str, name: str, locked: bool) -> Bookmark:
    """Lock (kept whatever retention says) or unlock an existing bookmark."""
    check_cg(data, cg)
    return lock_bookmark(data, cg, name, locked)
