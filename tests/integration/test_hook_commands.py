"""Bookmark hook commands (`nicsplit.recovery.hooks`) as real shell
processes: the hard timeout kills the whole process group (a ``sleep`` the
hook started too), a failure or timeout makes the result crash-consistent
with a note, and the post hook runs whatever happened, also when the
action between them raises."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from nicsplit.recovery.errors import RecoveryError
from nicsplit.recovery.hooks import APPLICATION, CRASH, Hooks, quiesced, resolve_hooks, run_hook


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return stat not in ("Z", "X")


def test_a_hung_hook_is_killed_with_its_children_at_the_timeout(tmp_path):
    pidf = tmp_path / "child.pid"
    t0 = time.monotonic()
    # The shell starts a sleep in the background and waits: killing only the
    # shell would leave the sleep holding any pipe to its output.
    r = run_hook("pre", f"sleep 600 & echo $! > {pidf}; wait", "cg1", 1.0)
    took = time.monotonic() - t0
    assert not r.ok and r.exit is None and r.message == "pre hook timed out after 1 s", r
    assert 1.0 <= took < 10, took
    child = int(pidf.read_text())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.02)  # ok-sleep: polling with a deadline; the kernel reaps the killed sleep asynchronously
    assert not _alive(child), "the hook's background sleep survived the timeout"


def test_a_failing_hook_reports_its_exit_and_last_line_and_sees_its_environment(tmp_path):
    r = run_hook("pre", "echo \"$NICSPLIT_CG $NICSPLIT_HOOK\" >&2; echo second line >&2; exit 3", "web", 5)
    assert not r.ok and r.exit == 3 and r.message == "pre hook failed (exit 3): second line", r
    out = tmp_path / "env"
    r = run_hook("post", f"echo \"$NICSPLIT_CG $NICSPLIT_HOOK\" > {out}", "web", 5)
    assert r.ok and r.exit == 0 and out.read_text() == "web post\n"
    r = run_hook("pre", "/nonexistent/freeze", "web", 5)
    assert not r.ok and r.exit == 127 and "not found" in r.message


def test_post_always_runs_and_consistency_follows_the_pre_hook(tmp_path):
    log = tmp_path / "log"
    ok = Hooks(f"echo pre >> {log}", f"echo post >> {log}", 5)
    res = quiesced(ok, "cg1", lambda: log.open("a").write("action\n") and 42)
    assert res.value == 42 and res.consistency == APPLICATION and res.notes == []
    assert log.read_text() == "pre\naction\npost\n"
    assert set(res.hooks_json()) == {"pre", "post"} and res.hooks_json()["pre"]["ok"]

    log.write_text("")
    hung = Hooks("sleep 600", f"echo post >> {log}", 1)
    res = quiesced(hung, "cg1", lambda: 7)
    assert res.value == 7 and res.consistency == CRASH and res.notes == ["pre hook timed out after 1 s"]
    assert log.read_text() == "post\n"

    log.write_text("")
    failing = Hooks("exit 2", f"echo post >> {log}", 5)

    def boom() -> None:
        raise RecoveryError("barrier refused")

    with pytest.raises(RecoveryError, match="barrier refused"):
        quiesced(failing, "cg1", boom)
    assert log.read_text() == "post\n", "the post hook must run when the action raises"

    res = quiesced(Hooks("true", "exit 5", 5), "cg1", lambda: 1)
    assert res.consistency == APPLICATION and "post hook failed (exit 5)" in res.notes[0]
    assert "may still be quiesced" in res.notes[0]


def test_hooks_from_the_configuration_and_bad_configurations():
    raw = {"hooks": {"web": {"pre": "virsh domfsfreeze web1", "post": "virsh domfsthaw web1", "timeout": 7}}}
    h = resolve_hooks(raw, "web", configured=True)
    assert h == Hooks("virsh domfsfreeze web1", "virsh domfsthaw web1", 7.0)
    assert resolve_hooks(raw, "web", configured=True, timeout=2, post="echo x") == Hooks(
        "virsh domfsfreeze web1", "echo x", 2.0)
    # explicit commands: only those, with the configured timeout
    assert resolve_hooks(raw, "web", pre="fsfreeze -f /") == Hooks("fsfreeze -f /", None, 7.0)
    assert resolve_hooks(raw, "web") is None and resolve_hooks({}, "web") is None
    for bad, msg in (({}, "needs a configured pre hook"),
                     ({"hooks": {"web": {"pre": ""}}}, "non-empty shell command"),
                     ({"hooks": {"web": {"pre": "x", "timeout": 0}}}, "must be a number of seconds > 0"),
                     ({"hooks": {"web": {"pre": "x", "thaw": "y"}}}, "unknown key"),
                     ({"hooks": {"web": "x"}}, "must be a table"),
                     ({"hooks": []}, "must be a table")):
        with pytest.raises(RecoveryError, match=msg):
            resolve_hooks(bad, "web", configured=True)
