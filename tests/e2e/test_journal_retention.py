"""Retention with real processes (issue 4 item 4): the appliance trims the
oldest journal segments into base images on its timer, a locked bookmark
pins its PIT (and says so), an unlocked old one goes, the protection window
in `nicsplit status` moves, and every kept PIT still restores exactly."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from nicsplit.testing.datadir import init_data
from nicsplit.testing.procs import UpProcess, nbd_connect, run_cli, wait_for

pytestmark = pytest.mark.usefixtures("peers")

SIZE = 8 << 20
LIMIT = 3 << 20  # [retention] max_journal_size


def _compare(a: str | Path, b: str | Path) -> None:
    p = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(a), str(b)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"{a} != {b}: {p.stdout.strip()} {p.stderr.strip()}"


def _scatter(hs: dict, golden: dict, rng, pattern: int, count: int) -> None:
    for i in range(count):
        n = "ab"[i % 2]
        off = rng.randrange(0, SIZE // 4096 - 16) * 4096
        blob = bytes([pattern]) * 4096 + rng.randbytes(4096 * 7)  # the pattern block repeats: references cross trims
        hs[n].pwrite(blob, off)
        golden[n][off : off + len(blob)] = blob


def _cg(data: Path) -> dict:
    (cg,) = json.loads(run_cli(data, "status", "--json").stdout)["cgs"]
    return cg


def _segments(data: Path) -> list[int]:
    return sorted(int(p.stem) for p in (data / "appliance" / "journal" / "cg1").glob("*.seg"))


def _restore_equals(data: Path, tmp: Path, selector: list[str], golden: dict, tag: str) -> None:
    for n in ("a", "b"):
        want, got = tmp / f"{n}-{tag}-want.raw", tmp / f"{n}-{tag}-got.raw"
        want.write_bytes(golden[n])
        run_cli(data, "restore", n, *selector, "--to", str(got))
        _compare(got, want)


def test_size_retention_trims_into_the_base_and_locked_bookmarks_hold(tmp_path, rng):
    data = init_data(tmp_path / "data", filters=["stats", {"name": "split", "split_timeout_us": 1_000_000}],
                     # Segments end at batch boundaries (a bigger batch spans them), so with
                     # 512K segments the card's batches stay below them, as 4M batches do
                     # below the default 64M segments: retention trims whole segments.
                     sections={"card": {"transport_options": {"data_size": "256M"}, "dedup_horizon_s": 0.05,
                                        "batch_bytes": "128K", "batch_delay_us": 500},
                               "appliance": {"segment_size": "512K"},
                               "retention": {"max_journal_size": LIMIT, "interval": "0.2s"}})
    run_cli(data, "cg", "create", "cg1")
    for n in ("a", "b"):
        run_cli(data, "vdisk", "create", n, "--size", str(SIZE), "--cg", "cg1")
    golden = {n: bytearray(SIZE) for n in ("a", "b")}
    with UpProcess(data) as up:
        hs = {n: nbd_connect(up.uri(n)) for n in ("a", "b")}
        _scatter(hs, golden, rng, 0x10, 64)
        old = json.loads(run_cli(data, "bookmark", "cg1", "old", "--json").stdout)
        _scatter(hs, golden, rng, 0xA1, 64)
        locked = json.loads(run_cli(data, "bookmark", "cg1", "a-locked", "--lock", "--json").stdout)
        golden_a = {n: bytes(golden[n]) for n in ("a", "b")}
        for pattern in (0xB2, 0xC3, 0xD4):
            _scatter(hs, golden, rng, pattern, 128)
        run_cli(data, "bookmark", "cg1", "now")

        # The appliance trims what lies before the locked bookmark, then says what stops it.
        def pinned() -> bool:
            r = _cg(data).get("retention") or {}
            return r.get("base_seq", 0) > 0 and "pinned" in (r.get("blocked_by") or "")
        wait_for(pinned, 60, "retention to trim up to the locked bookmark", interval=0.2)
        r = _cg(data)["retention"]
        print(f"\nretention: base at seq {r['base_seq']} (bookmarks: old {old['seq']}, locked {locked['seq']}), "
              f"journal {r['journal_bytes'] >> 10} KiB > limit {LIMIT >> 10} KiB, blocked by {r['blocked_by']!r}; "
              f"segments {_segments(data)[0]}..{_segments(data)[-1]}")
        assert old["seq"] <= r["base_seq"] < locked["seq"], (old, locked, r)
        assert f"folded into the base at seq {r['base_seq']}; over its size limit: a pinned point in time" in \
            run_cli(data, "status").stdout
        assert _segments(data)[0] > 1
        names = [b for p in json.loads(run_cli(data, "pits", "cg1", "--json", "--all").stdout)["pits"]
                 for b in p["bookmarks"]]
        assert "old" not in names and "a-locked" in names  # the unlocked bookmark of a trimmed PIT is gone
        _restore_equals(data, tmp_path, ["--bookmark", "a-locked"], golden_a, "locked")
        _restore_equals(data, tmp_path, ["--bookmark", "now"], golden, "now")
        p = run_cli(data, "restore", "a", "--seq", str(old["seq"]), "--to", str(tmp_path / "x"), check=False)
        assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1, p.stderr

        # Unlocked, it no longer pins: the journal shrinks under the limit.
        run_cli(data, "bookmark", "cg1", "a-locked", "--unlock")
        def under_limit() -> bool:
            r = _cg(data).get("retention") or {}
            return r.get("base_seq", 0) > locked["seq"] and r.get("journal_bytes", LIMIT + 1) <= LIMIT
        try:
            wait_for(under_limit, 60, "retention to bring the journal under its limit", interval=0.2)
        except TimeoutError:
            raise AssertionError(f"retention did not bring the journal under {LIMIT}: {_cg(data)}") from None
        cg = _cg(data)
        assert cg["protection_window"]["oldest_seq"] > cg["retention"]["base_seq"]

        # The replica's undo log follows: entries older than the base are dropped, their space punched.
        def undo_trimmed() -> bool:
            st = json.loads((data / "appliance" / "replicas" / "cg1" / "state.json").read_text())
            return st.get("undo_floor", 0) >= cg["retention"]["base_seq"] and st.get("undo_start", 0) > 0
        wait_for(undo_trimmed, 60, "distribution to drop the undo entries older than the base", interval=0.2)
        _restore_equals(data, tmp_path, ["--latest"], golden, "latest")
        for n in ("a", "b"):
            _compare(up.uri(n), tmp_path / f"{n}-latest-want.raw")
