"""`Supervisor._start` says why a child did not start: a child that never
prints its ready line (a timeout, whose own text is empty) and one that
exits first, each with the tail of its log."""

from __future__ import annotations

import asyncio
import sys

import pytest

from nicsplit.control import supervisor as sv


def _start(tmp_path, code: str) -> str:
    (tmp_path / "run").mkdir(parents=True, exist_ok=True)
    child = sv.Child("slowpoke", [sys.executable, "-c", code])
    sup = sv.Supervisor(tmp_path, [child])

    async def go() -> str:
        try:
            with pytest.raises(RuntimeError) as e:
                await sup._start(child)
            return str(e.value)
        finally:
            if child.proc is not None and child.proc.returncode is None:
                child.proc.kill()
                await child.proc.wait()

    return asyncio.run(go())


def test_a_child_without_a_ready_line_is_reported_as_a_timeout(tmp_path, monkeypatch):
    monkeypatch.setattr(sv, "READY_TIMEOUT_S", 0.5)
    msg = _start(tmp_path, "import signal, sys; print('warming up', file=sys.stderr, flush=True); signal.pause()")
    assert msg.startswith("slowpoke did not start (no ready line within 0.5 s); its log ("), msg
    assert msg.rstrip().endswith("warming up"), msg


def test_a_child_that_exits_says_its_status(tmp_path):
    msg = _start(tmp_path, "import sys; print('bad config', file=sys.stderr); sys.exit(3)")
    assert msg.startswith("slowpoke did not start (slowpoke exited with 3)"), msg
    assert msg.rstrip().endswith("bad config"), msg
