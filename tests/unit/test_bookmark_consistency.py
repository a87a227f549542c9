"""Bookmarks record their consistency (application / crash), why, and what
the hooks did; files written before those fields existed still read, as
crash-consistent, and lock / unlock keep the fields."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nicsplit.recovery.bookmarks import BookmarkError, add_bookmark, bookmarks_path, get_bookmark, lock_bookmark


def test_consistency_fields_round_trip_and_old_files_read_as_crash(tmp_path: Path):
    data = tmp_path / "data"
    hooks = {"pre": {"command": "sleep 600", "ok": False, "seconds": 2.0, "exit": None,
                     "message": "pre hook timed out after 2 s"}}
    add_bookmark(data, "cg1", "app", 5, time_ns=10, consistency="application",
                 hooks={"pre": {"command": "true", "ok": True, "seconds": 0.01, "exit": 0, "message": "ok"}})
    add_bookmark(data, "cg1", "crash", 6, time_ns=11, note="pre hook timed out after 2 s", hooks=hooks)
    a, c = get_bookmark(data, "cg1", "app"), get_bookmark(data, "cg1", "crash")
    assert (a.consistency, a.note) == ("application", None) and a.hooks["pre"]["ok"]
    assert (c.consistency, c.note, c.hooks) == ("crash", "pre hook timed out after 2 s", hooks)
    assert c.to_json_extra() == {"consistency": "crash", "note": "pre hook timed out after 2 s", "hooks": hooks}
    assert lock_bookmark(data, "cg1", "app", True).consistency == "application"
    assert get_bookmark(data, "cg1", "app").hooks == a.hooks
    # A file from before: no consistency, note or hooks keys.
    path = bookmarks_path(data, "old")
    path.write_text(json.dumps({"version": 1, "cg": "old", "bookmarks": [
        {"name": "b1", "seq": 3, "time_ns": 100, "locked": False, "created": 1.5}]}))
    b = get_bookmark(data, "old", "b1")
    assert (b.seq, b.consistency, b.note, b.hooks) == (3, "crash", None, None)
    assert b.to_json_extra() == {"consistency": "crash"}
    raw = json.loads(path.read_text())
    raw["bookmarks"][0]["consistency"] = "excellent"
    path.write_text(json.dumps(raw))
    with pytest.raises(BookmarkError, match="malformed bookmark file .*neither 'crash' nor 'application'"):
        get_bookmark(data, "old", "b1")
