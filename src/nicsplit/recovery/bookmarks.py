"""Bookmarks: names for points in time, per CG (docs/recovery.md §2).

A bookmark names a PIT seq of a CG's journal (`nicsplit.recovery.pits`); a
*locked* one is never trimmed by retention.  They are kept in
``DATA/appliance/bookmarks/<cg>.json`` (`Layout.bookmarks`).

Rules
-----
1. A bookmark file is replaced atomically (tmp, fsync, rename, fsync dir)
   under an flock, read-modify-write.
2. Names are unique per CG and match ``[A-Za-z0-9._:@+-]{1,128}``.
3. A new bookmark names a PIT the journal holds (checked through a
   `PitIndex` unless the caller resolved the PIT already).
4. ``consistency`` says what the PIT guarantees: ``"application"`` when a
   pre (quiesce) hook succeeded before its barrier (`nicsplit.recovery.hooks`),
   else ``"crash"``; ``note`` says why it is only crash-consistent (a hook
   that failed or timed out) and ``hooks`` what each hook did. A file
   written before these fields existed reads as crash-consistent (version 1
   still: readers ignore keys they do not know).

Example::

    add_bookmark(data, "cg1", "before-upgrade", PitIndex(jd).latest().seq, locked=True)
    get_bookmark(data, "cg1", "before-upgrade").seq
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from nicsplit.core.errors import Conflict, NotFound
from nicsplit.core.fsutil import atomic_write
from nicsplit.core.layout import Layout
from nicsplit.recovery.pits import PitError, PitIndex

__all__ = [
    "Bookmark", "BookmarkError", "UnknownBookmark", "BookmarkExists", "BOOKMARKS_VERSION", "bookmarks_path", "add_bookmark", "lock_bookmark",
    "remove_bookmarks", "list_bookmarks", "get_bookmark",
]


class BookmarkError(PitError):
    """Unknown, duplicate or badly named bookmark; unreadable bookmark file."""


class UnknownBookmark(BookmarkError, NotFound):
    """No bookmark of this name in the CG."""


class BookmarkExists(BookmarkError, Conflict):
    """The CG has a bookmark of this name already."""


_NAME = re.compile(r"^[A-Za-z0-9._:@+-]{1,128}$")
BOOKMARKS_VERSION = 1


@dataclass(frozen=True, slots=True)
class Bookmark:
    name: str
    seq: int
    time_ns: int
    locked: bool  # retention never trims a locked bookmark's PIT
    created: float  # wall clock when it was added
    consistency: str = "crash"  # or "application" (rule 4)
    note: str | None = None  # why only crash-consistent; a thaw that failed
    hooks: dict | None = None  # {"pre": {...}, "post": {...}} as `HookRun.to_json`

    def to_json(self) -> dict:
        out = {"name": self.name, "seq": self.seq, "time_ns": self.time_ns, "locked": self.locked,
               "created": self.created, "consistency": self.consistency}
        if self.note:
            out["note"] = self.note
        if self.hooks:
            out["hooks"] = self.hooks
        return out

    def to_json_extra(self) -> dict:
        """What a bookmark command adds to its output: ``consistency``, and
        ``note`` / ``hooks`` when there are any."""
        return {k: v for k, v in self.to_json().items() if k in ("consistency", "note", "hooks")}


def bookmarks_path(data: str | Path, cg: str) -> Path:
    """The bookmark file of ``cg`` (`Layout.bookmarks`)."""
    return Layout(data).bookmarks(cg)


def _read_bookmarks(path: Path) -> list[Bookmark]:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (ValueError, OSError) as e:
        raise BookmarkError(f"{path}: unreadable bookmark file ({e})") from None
    try:
        if raw.get("version") != BOOKMARKS_VERSION:
            raise BookmarkError(f"{path}: bookmark file version {raw.get('version')!r} not supported")
        return [Bookmark(b["name"], int(b["seq"]), int(b["time_ns"]), bool(b["locked"]), float(b["created"]),
                         _consistency(b.get("consistency", "crash")), b.get("note"), b.get("hooks"))
                for b in raw["bookmarks"]]
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise BookmarkError(f"{path}: malformed bookmark file ({type(e).__name__}: {e})") from None


def _consistency(value: object) -> str:
    if value not in ("crash", "application"):
        raise ValueError(f"consistency {value!r} is neither 'crash' nor 'application'")
    return str(value)


def _write_bookmarks(path: Path, cg: str, marks: list[Bookmark]) -> None:
    body = json.dumps({"version": BOOKMARKS_VERSION, "cg": cg, "bookmarks": [b.to_json() for b in marks]}, indent=1)
    atomic_write(path, body.encode(), 0o600)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(path.with_name(path.name + ".lock"), "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def add_bookmark(data: str | Path, cg: str, name: str, seq: int, *, locked: bool = False,
                 time_ns: int | None = None, consistency: str = "crash", note: str | None = None,
                 hooks: dict | None = None) -> Bookmark:
    """Name the PIT ``seq`` of ``cg``.  ``seq`` must be a PIT of the CG's
    journal (checked there unless ``time_ns`` is given by a caller that
    resolved the PIT already)."""
    if not _NAME.match(name):
        raise BookmarkError(f"bad bookmark name {name!r}: use 1-128 of A-Z a-z 0-9 . _ : @ + -")
    if time_ns is None:
        jd = Layout(data).journal(cg)
        if not jd.is_dir():
            raise PitError(f"no journal for CG {cg!r} (looked in {jd})")
        time_ns = PitIndex(jd).pit_for_seq(seq).time_ns
    path = bookmarks_path(data, cg)
    with _locked(path):
        marks = _read_bookmarks(path)
        for b in marks:
            if b.name == name:
                raise BookmarkExists(f"bookmark {name!r} already exists in CG {cg} (seq {b.seq})")
        mark = Bookmark(name, seq, time_ns, locked, time.time(), _consistency(consistency), note, hooks)
        marks.append(mark)
        _write_bookmarks(path, cg, marks)
    return mark


def lock_bookmark(data: str | Path, cg: str, name: str, locked: bool) -> Bookmark:
    """Lock (keep whatever retention says) or unlock an existing bookmark."""
    path = bookmarks_path(data, cg)
    with _locked(path):
        marks = _read_bookmarks(path)
        for i, b in enumerate(marks):
            if b.name == name:
                marks[i] = Bookmark(b.name, b.seq, b.time_ns, locked, b.created, b.consistency, b.note, b.hooks)
                _write_bookmarks(path, cg, marks)
                return marks[i]
    known = ", ".join(b.name for b in marks) or "none"
    raise UnknownBookmark(f"unknown bookmark {name!r} in CG {cg} (known: {known})")


def remove_bookmarks(data: str | Path, cg: str, which: Callable[[Bookmark], bool]) -> list[Bookmark]:
    """Remove the bookmarks ``which`` selects (retention); returns them."""
    path = bookmarks_path(data, cg)
    if not path.exists():
        return []
    with _locked(path):
        marks = _read_bookmarks(path)
        gone = [b for b in marks if which(b)]
        if gone:
            _write_bookmarks(path, cg, [b for b in marks if not which(b)])
    return gone


def list_bookmarks(data: str | Path, cg: str) -> list[Bookmark]:
    """The bookmarks of ``cg`` in the order they were added."""
    return _read_bookmarks(bookmarks_path(data, cg))


def get_bookmark(data: str | Path, cg: str, name: str) -> Bookmark:
    marks = list_bookmarks(data, cg)
    for b in marks:
        if b.name == name:
            return b
    known = ", ".join(b.name for b in marks) or "none"
    raise UnknownBookmark(f"unknown bookmark {name!r} in CG {cg} (known: {known})")
