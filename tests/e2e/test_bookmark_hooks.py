"""Issue 13, item 7: bookmark hooks with `nicsplit up`. A pre (quiesce)
hook that hangs is killed at its timeout and the bookmark is still taken,
crash-consistent, saying so, with the post (thaw) hook run; the PIT it names
restores. A successful configured pair (``[hooks.cg1]``, ``--quiesce`` with
no command) gives an application-consistent bookmark whose PIT comes after
the pre hook ran."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from nicsplit.testing.procs import UpProcess, nbd_connect, run_cli
from nicsplit.testing.stack import cg_data

pytestmark = pytest.mark.usefixtures("peers")

SIZE = 4 << 20


def _hooks_config(data: Path, pre: str, post: str, timeout: float) -> None:
    cfg = data / "nicsplit.toml"
    cfg.write_text(cfg.read_text() + f"\n[hooks.cg1]\npre = '{pre}'\npost = '{post}'\ntimeout = {timeout}\n")


@pytest.mark.timeout(300)
def test_a_hung_pre_hook_still_gives_a_crash_consistent_bookmark_within_its_timeout(tmp_path):
    data = cg_data(tmp_path, SIZE, names=("a",))
    thawed = tmp_path / "thawed"
    marker = tmp_path / "frozen-at"
    with UpProcess(data) as up:
        h = nbd_connect(up.uri("a"))
        h.pwrite(b"\xa1" * 65536, 0)
        golden = bytearray(SIZE)
        golden[:65536] = b"\xa1" * 65536

        # 1. A pre hook that hangs: timeout 2 s, from the command line.
        t0 = time.monotonic()
        p = run_cli(data, "bookmark", "cg1", "hung", "--quiesce", "sleep 600", "--thaw", f"touch {thawed}",
                    "--hook-timeout", "2", "--json")
        took = time.monotonic() - t0
        out = json.loads(p.stdout)
        assert 2 <= took < 2 + 20, took  # the timeout, plus the barrier and interpreter starts
        assert out["consistency"] == "crash" and out["note"] == "pre hook timed out after 2 s", out
        assert out["hooks"]["pre"]["exit"] is None and out["hooks"]["post"]["ok"], out
        assert thawed.exists(), "the post hook did not run after the pre hook timed out"
        text = run_cli(data, "bookmark", "cg1", "hung-text", "--quiesce", "sleep 600", "--thaw", "true",
                       "--hook-timeout", "1").stdout
        assert "crash-consistent: pre hook timed out after 1 s" in text, text

        # the PIT it names is a consistent one and restores
        pits = json.loads(run_cli(data, "pits", "cg1", "--all", "--json").stdout)["pits"]
        pit = next(x for x in pits if "hung" in x["bookmarks"])
        assert pit["consistent"] and pit["usable"] and pit["seq"] == out["seq"]
        run_cli(data, "restore", "a", "--bookmark", "hung", "--to", str(tmp_path / "hung.raw"))
        assert (tmp_path / "hung.raw").read_bytes() == bytes(golden)

        # 2. The configured pair, with `--quiesce` and no command: application-consistent.
        _hooks_config(data, f"date +%s.%N > {marker}", f"rm -f {thawed}", 5)
        h.pwrite(b"\xb2" * 4096, 65536)
        out = json.loads(run_cli(data, "bookmark", "cg1", "app", "--quiesce", "--json").stdout)
        assert out["consistency"] == "application" and "note" not in out, out
        frozen_at = float(marker.read_text())
        assert out["time"] >= frozen_at, (out["time"], frozen_at)  # its PIT was cut after the pre hook ran
        assert not thawed.exists(), "the configured post hook did not run"
        text = run_cli(data, "bookmark", "cg1", "app-text", "--quiesce").stdout
        assert "application-consistent" in text, text

        # 3. A failing configured pre hook: crash-consistent, post still runs, exit 0.
        _hooks_config_replace(data, "exit 4", f"touch {thawed}")
        out = json.loads(run_cli(data, "bookmark", "cg1", "failed", "--quiesce", "--json").stdout)
        assert out["consistency"] == "crash" and out["note"] == "pre hook failed (exit 4)" and thawed.exists(), out
        h.shutdown()
    # `--quiesce` with no hook configured for the CG: one clear line, no bookmark.
    p = run_cli(data, "bookmark", "other", "x", "--quiesce", check=False)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1 and "[hooks.other]" in p.stderr, p.stderr


def _hooks_config_replace(data: Path, pre: str, post: str) -> None:
    cfg = data / "nicsplit.toml"
    text = cfg.read_text()
    text = text[: text.index("\n[hooks.cg1]")]
    cfg.write_text(text + f"\n[hooks.cg1]\npre = '{pre}'\npost = '{post}'\n")
