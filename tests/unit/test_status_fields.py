"""The per-CG fields `nicsplit.control.status` reads from disk (journal
size, last bookmark, base seq) and the resync progress it shows before a
copy starts; no processes."""

from __future__ import annotations

import json

from nicsplit.control.status import _base_seq, _resync, journal_bytes, last_bookmark, protection_window
from nicsplit.core.layout import Layout
from nicsplit.recovery.bookmarks import add_bookmark


def test_journal_bytes_counts_segment_files_only(tmp_path):
    assert journal_bytes(tmp_path, "cg1") is None  # no journal yet
    jd = Layout(tmp_path).journal("cg1")
    jd.mkdir(parents=True)
    (jd / "00000001.seg").write_bytes(b"x" * 1000)
    (jd / "00000002.seg").write_bytes(b"x" * 24)
    (jd / "lock").write_text("123\n")
    assert journal_bytes(tmp_path, "cg1") == 1024


def test_last_bookmark_is_the_one_on_the_newest_pit(tmp_path):
    assert last_bookmark(tmp_path, "cg1") is None
    add_bookmark(tmp_path, "cg1", "later", 50, time_ns=2_000_000_000)
    add_bookmark(tmp_path, "cg1", "earlier-pit", 10, time_ns=1_000_000_000)  # added last, older PIT
    assert last_bookmark(tmp_path, "cg1") == {"name": "later", "seq": 50, "time": 2.0}
    Layout(tmp_path).bookmarks("cg2").write_text("{not json")
    assert last_bookmark(tmp_path, "cg2") is None  # a bad file never breaks status


def test_base_seq_says_where_retention_cut(tmp_path):
    assert protection_window(tmp_path, "cg1") is None  # no journal
    assert _base_seq(tmp_path, "cg1") == 0  # never trimmed
    bd = Layout(tmp_path).base("cg1")
    bd.mkdir(parents=True)
    (bd / "state.json").write_text(json.dumps({"version": 1, "seq": 42, "time_ns": 1, "first_segment": 3}))
    assert _base_seq(tmp_path, "cg1") == 42
    (bd / "state.json").write_text("garbage")
    assert _base_seq(tmp_path, "cg1") == 0


def test_resync_progress_shows_before_the_copy_starts():
    started = {"state": "resyncing", "dirty_bytes": 4096,
               "resync": {"done_bytes": 1, "total_bytes": 2, "percent": 50.0, "rate_mib_s": 1.0, "eta_s": 1.0}}
    assert _resync(started, "resyncing") is started["resync"]
    waiting = {"state": "initializing", "dirty_bytes": 1 << 20}
    assert _resync(waiting, "initializing") == {"done_bytes": 0, "total_bytes": 1 << 20, "percent": 0.0,
                                                "rate_mib_s": 0.0, "eta_s": None}
    assert _resync({"state": "protected", "dirty_bytes": 0}, "protected") is None
    assert _resync({"dirty_bytes": 5}, "marking") is None
    assert json.dumps(_resync(waiting, "initializing"))
