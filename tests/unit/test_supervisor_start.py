"""`Supervisor._start` says why a child did not start: a child that never
prints its ready line (a timeout, whose own text is empty) and one that
exits first, each with the tail of its log. A child that reports progress
(``{"event": "starting"}`` lines, as the appliance does while it recovers a
big journal) gets the ready timeout again from each, up to a cap."""

from __future__ import annotations

import asyncio
import sys

import pytest

from nicsplit.control import supervisor as sv


def _start(tmp_path, code: str, *, ok: bool = False) -> str | dict:
    """The error `_start` raises for the child running ``code`` (or, with
    ``ok``, the ready line it got)."""
    (tmp_path / "run").mkdir(parents=True, exist_ok=True)
    child = sv.Child("slowpoke", [sys.executable, "-c", code])
    sup = sv.Supervisor(tmp_path, [child])

    async def go() -> str | dict:
        try:
            if ok:
                await sup._start(child)
                return child.ready
            with pytest.raises(RuntimeError) as e:
                await sup._start(child)
            return str(e.value)
        finally:
            if child.proc is not None and child.proc.returncode is None:
                child.proc.kill()
                await child.proc.wait()

    return asyncio.run(go())


# A child that says it is starting every 0.2 s, n times, then ready (n < 0: never).
_PROGRESS = """
import json, sys, time
n = {n}
i = 0
while i != n:
    print(json.dumps({{"event": "starting", "step": f"recovering journal cg1 ({{i}})"}}), flush=True)
    time.sleep(0.2)  # ok-sleep: the child paces its progress lines; the test waits on its output
    i += 1
print(json.dumps({{"event": "ready", "pid": 1}}), flush=True)
import signal; signal.pause()
"""


def test_a_child_without_a_ready_line_is_reported_as_a_timeout(tmp_path, monkeypatch):
    monkeypatch.setattr(sv, "READY_TIMEOUT_S", 0.5)
    msg = _start(tmp_path, "import signal, sys; print('warming up', file=sys.stderr, flush=True); signal.pause()")
    assert msg.startswith("slowpoke did not start (no ready line within 0.5 s); its log ("), msg
    assert msg.rstrip().endswith("warming up"), msg


def test_a_child_that_exits_says_its_status(tmp_path):
    msg = _start(tmp_path, "import sys; print('bad config', file=sys.stderr); sys.exit(3)")
    assert msg.startswith("slowpoke did not start (slowpoke exited with 3)"), msg
    assert msg.rstrip().endswith("bad config"), msg


def test_progress_lines_extend_the_wait_past_the_ready_timeout(tmp_path, monkeypatch):
    monkeypatch.setattr(sv, "READY_TIMEOUT_S", 0.5)
    ready = _start(tmp_path, _PROGRESS.format(n=8), ok=True)  # ~1.6 s of progress, 0.2 s apart
    assert ready == {"event": "ready", "pid": 1}


def test_a_child_that_stops_reporting_progress_times_out(tmp_path, monkeypatch):
    monkeypatch.setattr(sv, "READY_TIMEOUT_S", 0.5)
    code = ("import json, signal; print(json.dumps({'event': 'starting', 'step': 'stuck'}), flush=True); "
            "signal.pause()")
    msg = _start(tmp_path, code)
    assert msg.startswith("slowpoke did not start (no ready line within 0.5 s)"), msg


def test_progress_does_not_extend_the_wait_forever(tmp_path, monkeypatch):
    monkeypatch.setattr(sv, "READY_TIMEOUT_S", 0.5)
    monkeypatch.setattr(sv, "STARTING_MAX_S", 1.0)
    msg = _start(tmp_path, _PROGRESS.format(n=-1))
    assert msg.startswith("slowpoke did not start (no ready line within 0.5 s)"), msg
