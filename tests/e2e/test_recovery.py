"""Recovery with real processes and real clients: points in time listed from
the journal, bookmarks through the card (with quiesce/thaw hooks), restore
to a file and in place (through the host, so protection continues)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from nicsplit.testing.datadir import init_data
from nicsplit.testing.procs import UpProcess, journal, nbd_connect, run_cli

pytestmark = pytest.mark.usefixtures("peers")

SIZE = 8 << 20


def _writes(data: Path) -> int:
    return sum(1 for r in journal(data, "cg1") if r["op"] == "write")


def _data(tmp_path: Path, **card) -> Path:
    data = init_data(tmp_path / "data", filters=["stats", {"name": "split", "split_timeout_us": 1_000_000}],
                     sections={"card": {"transport_options": {"data_size": "256M"}, **card}})
    run_cli(data, "cg", "create", "cg1")
    for n in ("a", "b"):
        run_cli(data, "vdisk", "create", n, "--size", str(SIZE), "--cg", "cg1")
    return data


def _scatter(hs: dict, golden: dict, rng, pattern: int, count: int = 64) -> None:
    """``count`` acknowledged 8 KiB writes of ``pattern`` at random places of a and b."""
    for _ in range(count):
        n = rng.choice("ab")
        off = rng.randrange(0, SIZE // 4096 - 4) * 4096
        blob = bytes([pattern]) * 8192
        hs[n].pwrite(blob, off)
        golden[n][off : off + 8192] = blob


def _compare(a: str | Path, b: str | Path) -> None:
    p = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(a), str(b)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"{a} != {b}: {p.stdout.strip()} {p.stderr.strip()}"


def test_bookmark_restores_pattern_a_latest_gives_b(tmp_path, rng):
    """The bookmark is taken right after the last write of pattern A was
    acknowledged, with no wait for the journal: the barrier through the card
    makes it cover every acknowledged write. Quiesce/thaw hooks run around it.
    The card holds writes in a 60 s merge window, so only the barrier (which
    closes the window) gets them journaled before the bookmark is placed."""
    data = _data(tmp_path, merge_window_ms=60_000)
    golden = {n: bytearray(SIZE) for n in ("a", "b")}
    hooks = tmp_path / "hooks.log"
    with UpProcess(data) as up:
        hs = {n: nbd_connect(up.uri(n)) for n in ("a", "b")}
        _scatter(hs, golden, rng, 0xA1)
        mark = json.loads(run_cli(data, "bookmark", "cg1", "after-a", "--json",
                                  "--quiesce", f"echo quiesce $NICSPLIT_CG >> {hooks}",
                                  "--thaw", f"echo thaw $NICSPLIT_CG >> {hooks}").stdout)
        assert hooks.read_text().split("\n") == ["quiesce cg1", "thaw cg1", ""]
        for n in ("a", "b"):
            (tmp_path / f"{n}-A.raw").write_bytes(golden[n])
        _scatter(hs, golden, rng, 0xB2)
        run_cli(data, "bookmark", "cg1", "after-b")  # the latest PIT now covers B too
        # A failing quiesce hook: still a bookmark, crash-consistent, saying why; the thaw runs anyway.
        p = run_cli(data, "bookmark", "cg1", "bad", "--quiesce", "echo frozen-fs-busy >&2; exit 3",
                    "--thaw", f"echo thaw >> {hooks}")
        assert "crash-consistent: pre hook failed (exit 3): frozen-fs-busy" in p.stdout, p.stdout
        assert hooks.read_text().count("thaw") == 2 and mark["consistency"] == "application"
        # lock / unlock an existing bookmark
        assert json.loads(run_cli(data, "bookmark", "cg1", "after-a", "--lock", "--existing", "--json").stdout)["locked"]
        assert not json.loads(run_cli(data, "bookmark", "cg1", "after-a", "--unlock", "--json").stdout)["locked"]
        pits = json.loads(run_cli(data, "pits", "cg1", "--json").stdout)["pits"]
        assert pits and [p["seq"] for p in pits] == sorted(p["seq"] for p in pits)
        assert any(p["seq"] == mark["seq"] and "after-a" in p["bookmarks"] for p in pits)
        for n in ("a", "b"):
            out_a = tmp_path / f"{n}-restored-A.raw"
            run_cli(data, "restore", n, "--bookmark", "after-a", "--to", str(out_a))
            _compare(out_a, tmp_path / f"{n}-A.raw")
            out_b = tmp_path / f"{n}-restored-latest.raw"
            run_cli(data, "restore", n, "--latest", "--to", str(out_b))
            _compare(out_b, up.uri(n))
            (tmp_path / f"{n}-B.raw").write_bytes(golden[n])
            _compare(out_b, tmp_path / f"{n}-B.raw")
        # Bad input: one clear line, non-zero exit.
        for args in (("restore", "a", "--bookmark", "nope", "--to", str(tmp_path / "x")),
                     ("restore", "zz", "--latest", "--to", str(tmp_path / "x")),
                     ("pits", "nocg"), ("restore", "a", "--seq", "999999999", "--to", str(tmp_path / "x"))):
            p = run_cli(data, *args, check=False)
            assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, (args, p.stderr)


def test_restore_in_place_then_protection_continues(tmp_path, rng):
    """Pattern A, bookmark, pattern B, restore vdisk a in place to the
    bookmark (nbdcopy through the host's splitter): production a is A again,
    b keeps B; later PITs hold the restored data and writes made after it."""
    data = _data(tmp_path)
    golden = {n: bytearray(SIZE) for n in ("a", "b")}
    with UpProcess(data) as up:
        hs = {n: nbd_connect(up.uri(n)) for n in ("a", "b")}
        _scatter(hs, golden, rng, 0xA1)
        run_cli(data, "bookmark", "cg1", "a-state")
        a_state = bytes(golden["a"])
        (tmp_path / "a-A.raw").write_bytes(a_state)
        _scatter(hs, golden, rng, 0xB2)
        hs["a"].shutdown()  # the VM is stopped for an in-place restore
        out = json.loads(run_cli(data, "restore", "a", "--bookmark", "a-state", "--in-place", "--json").stdout)
        assert out["in_place"] and out["covered_by_seq"] > out["seq"]
        golden["a"][:] = a_state
        _compare(up.uri("a"), tmp_path / "a-A.raw")
        (tmp_path / "b-B.raw").write_bytes(golden["b"])
        _compare(up.uri("b"), tmp_path / "b-B.raw")
        # still protected: the vdisks are not marking, and new writes go on top
        st = json.loads(run_cli(data, "status", "--json").stdout)
        assert {v["name"]: v["state"] for c in st["cgs"] for v in c["vdisks"]} == {"a": "protected", "b": "protected"}
        window = st["cgs"][0]["protection_window"]  # the oldest PIT: the first batch of pattern A
        first = json.loads(run_cli(data, "pits", "cg1", "--json").stdout)["pits"][0]
        assert (window["oldest_seq"], window["oldest_time"]) == (first["seq"], first["time"]) and window["seconds"] >= 0
        assert f"(since seq {first['seq']})" in run_cli(data, "status").stdout
        hs["a"] = nbd_connect(up.uri("a"))
        _scatter(hs, golden, rng, 0xC3, count=16)
        run_cli(data, "bookmark", "cg1", "after-restore")
        for n in ("a", "b"):
            (tmp_path / f"{n}-want.raw").write_bytes(golden[n])
            run_cli(data, "restore", n, "--bookmark", "after-restore", "--to", str(tmp_path / f"{n}-got.raw"))
            _compare(tmp_path / f"{n}-got.raw", tmp_path / f"{n}-want.raw")
        # bad input
        for args, want in ((("restore", "a", "--latest"), "--to FILE, or --in-place"),
                           (("restore", "a", "--latest", "--in-place", "--to", str(tmp_path / "x")), "takes no --to"),
                           (("restore", "a", "--bookmark", "nope", "--in-place"), "unknown bookmark")):
            p = run_cli(data, *args, check=False)
            assert p.returncode != 0 and want in p.stderr and len(p.stderr.strip().splitlines()) == 1, (args, p.stderr)
    p = run_cli(data, "restore", "a", "--latest", "--in-place", check=False)
    assert p.returncode != 0 and "host is not running" in p.stderr
