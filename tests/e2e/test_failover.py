"""Distribution, failover and failback with real processes and real clients
(issue "any-point-in-time recovery", items 1 and 7).

* Failover then failback returns identical data: pattern A through the host,
  failover at the latest PIT (production fenced: a write there is refused),
  pattern B at the failover site with qemu-io, the appliance killed and
  restarted meanwhile, failback; production equals the failover image byte
  for byte (qemu-img compare), protection goes on (a later PIT and the
  replica hold B).  A second round fails over to a bookmark *before*
  production's last writes, its server is killed and resumed: failback must
  undo production's writes too.
* kill -9 of the appliance in the middle of a distribution step under fio:
  the restarted appliance recovers the replica and it catches up to
  production exactly; its undo log still reaches an early PIT.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from nicsplit.testing.procs import UpProcess, nbd_connect, run_cli, wait_for
from nicsplit.testing.stack import (
    appliance_status, cg_data, cg_status, one_line_error, replica_in_clear, wait_caught_up,
)

pytestmark = pytest.mark.usefixtures("peers")

SIZE = 8 << 20


def _compare(a: str | Path, b: str | Path) -> None:
    p = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(a), str(b)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"{a} != {b}: {p.stdout.strip()} {p.stderr.strip()}"


def _qemu_io(uri: str, *cmds: str) -> subprocess.CompletedProcess:
    argv = ["qemu-io", "-f", "raw", "-t", "writeback"]
    for c in cmds:
        argv += ["-c", c]
    return subprocess.run(argv + [uri], capture_output=True, text=True, timeout=60)


def _scatter(hs: dict, golden: dict, rng, pattern: int, count: int = 48) -> None:
    for _ in range(count):
        n = rng.choice(sorted(hs))
        off = rng.randrange(0, SIZE // 4096 - 4) * 4096
        blob = bytes([pattern]) * 8192
        hs[n].pwrite(blob, off)
        golden[n][off : off + 8192] = blob


def _failover_round(data: Path, up: UpProcess, tmp: Path, selector: list[str], want: dict[str, Path],
                    site_cmds: dict[str, list[str]], crash: str) -> dict[str, Path]:
    """failover → images == want → production refuses writes → writes at the
    failover site → ``crash`` ("appliance": kill -9 it, `up` restarts it;
    "server": kill -9 the failover server, `failover --resume`) → failback →
    production == the failover image.  Returns the files holding that image."""
    fo = json.loads(run_cli(data, "failover", "cg1", *selector, "--json").stdout)
    assert set(fo["exports"]) == set(want)
    for n, url in fo["exports"].items():
        _compare(want[n], url)
    # Production is fenced: read-only (qemu-io cannot even open it for writing), and unchanged.
    before = tmp / "a-production-fenced.raw"
    subprocess.run(["nbdcopy", up.uri("a"), str(before)], check=True, timeout=120)
    p = _qemu_io(up.uri("a"), "write -P 0x55 0 4k")
    assert p.returncode != 0 and "Permission denied" in p.stdout + p.stderr, p
    h = nbd_connect(up.uri("a"))
    assert h.is_read_only()
    h.shutdown()
    _compare(before, up.uri("a"))
    if selector == ["--latest"]:
        _compare(want["a"], up.uri("a"))  # the latest PIT is production as the fence left it
    st = cg_status(data)
    assert st["state"] == "failed-over" and st["role"] == "failed-over", st
    assert st["failover"]["exports"] == fo["exports"] and st["failover"]["alive"] and st["failover"]["seq"] == fo["seq"]
    assert st["distribution"]["state"] == "paused", st["distribution"]
    # Writes at the failover site (qemu-io: a real client nobody here wrote).
    for n, cmds in site_cmds.items():
        p = _qemu_io(fo["exports"][n], *cmds, "flush")
        assert p.returncode == 0 and "error" not in p.stdout.lower(), p
    image = {}
    for n, url in fo["exports"].items():
        image[n] = tmp / f"{n}-failover-{fo['seq']}.raw"
        subprocess.run(["nbdcopy", url, str(image[n])], check=True, timeout=120)
    if crash == "appliance":  # the failover survives an appliance restart: still paused, still served
        pid = up.pid_of("appliance")
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: (a := appliance_status(data)) is not None and a["pid"] != pid, 60, "a restarted appliance",
                 interval=0.1)
        wait_for(lambda: cg_status(data)["distribution"]["state"] == "paused", 30, "distribution paused again")
        assert cg_status(data)["failover"]["alive"]
    else:  # the failover server dies; --resume serves the same images, the dirty bitmaps kept
        os.kill(fo["pid"], signal.SIGKILL)
        wait_for(lambda: not cg_status(data)["failover"]["alive"], 30, "the failover server gone")
        assert "fail back first" in one_line_error(data, "failover", "cg1", "--latest")
        again = json.loads(run_cli(data, "failover", "cg1", "--resume", "--json").stdout)
        assert again["resumed"] and again["seq"] == fo["seq"]
        assert cg_status(data)["failover"]["alive"] and cg_status(data)["failover"]["exports"] == again["exports"]
        for n, url in again["exports"].items():
            _compare(image[n], url)
    fb = json.loads(run_cli(data, "failback", "cg1", "--json").stdout)
    assert fb["seq"] == fo["seq"] and fb["copied_bytes"] > 0, fb
    print(f"\nfailover {' '.join(selector)} to seq {fo['seq']}: ready in {fo['ready_seconds']:.2f} s; failback "
          f"{fb['seconds']:.2f} s: {fb['copied_bytes']} bytes written, {fb['zeroed_bytes']} zeroed, "
          f"{ {n: (v['dirty_bytes'], v['production_bytes']) for n, v in fb['vdisks'].items()} } (dirty, production)")
    for n, path in image.items():
        _compare(path, up.uri(n))  # failover then failback: identical data
    st = cg_status(data)
    assert st["role"] == "production" and st["failover"] is None and st["state"] != "failed-over", st
    assert not (data / "appliance" / "failover" / "cg1.json").exists()
    return image


def test_failover_then_failback_returns_identical_data(tmp_path: Path, rng):
    data = cg_data(tmp_path)
    golden = {n: bytearray(SIZE) for n in ("a", "b")}
    with UpProcess(data) as up:
        hs = {n: nbd_connect(up.uri(n)) for n in ("a", "b")}
        _scatter(hs, golden, rng, 0xA1)
        for h in hs.values():
            h.shutdown()
        seq_a = wait_caught_up(data)
        a_files = {}
        for n in ("a", "b"):
            a_files[n] = tmp_path / f"{n}-A.raw"
            a_files[n].write_bytes(golden[n])
            _compare(a_files[n], replica_in_clear(data, n, tmp_path))  # distribution works
        d = cg_status(data)["distribution"]
        assert d["state"] == "caught-up" and d["applied_seq"] >= seq_a and d["lag_records"] == 0, d

        # Round 1: the latest PIT.
        site_b = {"a": ["write -P 0xb2 0 1M", "write -P 0xb3 5000 3000", "write -z 2M 64k", "discard 3M 128k"],
                  "b": ["write -P 0xb4 7M 4k"]}
        img1 = _failover_round(data, up, tmp_path, ["--latest"], a_files, site_b, crash="appliance")

        # Protection goes on: a later PIT and the replica hold B.
        latest = wait_caught_up(data)
        assert latest > seq_a
        for n in ("a", "b"):
            out = tmp_path / f"{n}-restored.raw"
            run_cli(data, "restore", n, "--latest", "--to", str(out))
            _compare(img1[n], out)
            _compare(img1[n], replica_in_clear(data, n, tmp_path))

        # Round 2: fail over to a bookmark, with production writes after it
        # that failback must replace by the failover image.
        run_cli(data, "bookmark", "cg1", "before-c", "--json")
        hs = {n: nbd_connect(up.uri(n)) for n in ("a", "b")}
        golden = {n: bytearray(img1[n].read_bytes()) for n in ("a", "b")}
        _scatter(hs, golden, rng, 0xC3)
        for h in hs.values():
            h.shutdown()
        wait_caught_up(data)
        site_d = {"b": ["write -P 0xd4 100k 200k", "write -P 0xd5 6M 512"]}
        img2 = _failover_round(data, up, tmp_path, ["--bookmark", "before-c"], img1, site_d, crash="server")
        c_only = tmp_path / "a-C.raw"
        c_only.write_bytes(golden["a"])
        assert subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(c_only), up.uri("a")],
                              timeout=60).returncode == 1  # production's pattern C is gone again
        wait_caught_up(data)
        for n in ("a", "b"):
            out = tmp_path / f"{n}-restored-2.raw"
            run_cli(data, "restore", n, "--latest", "--to", str(out))
            _compare(img2[n], out)
            _compare(img2[n], replica_in_clear(data, n, tmp_path))
        # Production takes writes again.
        p = _qemu_io(up.uri("a"), "write -P 0xee 0 4k", "read -P 0xee 0 4k")
        assert p.returncode == 0 and "verification failed" not in p.stdout, p

        # Bad input: one clear line, non-zero exit, nothing changed.
        assert "unknown consistency group" in one_line_error(data, "failover", "nocg", "--latest")
        assert "no point in time at seq" in one_line_error(data, "failover", "cg1", "--seq", "999999999")
        assert "bookmark" in one_line_error(data, "failover", "cg1", "--bookmark", "nope")
        assert "not failed over" in one_line_error(data, "failback", "cg1")
        assert "not failed over" in one_line_error(data, "failover", "cg1", "--resume")
        assert "unknown consistency group" in one_line_error(data, "failback", "nocg")
        st = cg_status(data)
        assert st["role"] == "production" and st["failover"] is None and st["state"] == "protected", st


def test_kill9_appliance_mid_step_replica_recovers(tmp_path: Path, seed: int, monkeypatch):
    """The appliance SIGKILLs itself in the middle of a distribution step
    (undo entries synced, images half written: the opt-in crash failpoint)
    while fio writes; `nicsplit up` restarts it, its distribution lays the
    interrupted step back and catches up: the replica equals production, and
    its undo log still rolls it back exactly (failover to an early PIT)."""
    size = 32 << 20
    trigger = tmp_path / "crash-now"
    monkeypatch.setenv("NICSPLIT_DISTRIBUTION_CRASH", f"image-written@{trigger}")
    data = cg_data(tmp_path, size=size, names=("a",))
    with UpProcess(data) as up:
        fio = subprocess.Popen(
            ["fio", "--name=a", "--ioengine=nbd", f"--uri={up.uri('a')}", "--rw=randwrite", "--bs=4k",
             f"--size={size}", "--iodepth=16", "--time_based", "--runtime=6", f"--randseed={seed}",
             "--rate_iops=3000"],  # paced below what card + appliance ship here: this is about the crash
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
        try:
            pid = up.pid_of("appliance")

            def applied() -> int:
                return ((appliance_status(data) or {}).get("cgs", {}).get("cg1") or {}).get(
                    "distribution", {}).get("applied_seq", 0)

            wait_for(lambda: applied() >= 2000, 30, "distribution under way", interval=0.05)
            trigger.write_text("")  # the next step dies between its first image write and the image fsync
            wait_for(lambda: not trigger.exists(), 30, "the appliance to crash mid-step", interval=0.02)
            wait_for(lambda: (a := appliance_status(data)) is not None and a["pid"] != pid, 60, "a restarted appliance",
                     interval=0.1)
        finally:
            out, _ = fio.communicate(timeout=120)
        assert fio.returncode == 0, out
        latest = wait_caught_up(data, timeout=120)
        log = (data / "run" / "appliance.log").read_text(errors="replace")
        assert "crashing at failpoint image-written" in log and "interrupted step" in log, log[-3000:]
        _compare(replica_in_clear(data, "a", tmp_path), up.uri("a"))
        d = appliance_status(data)["cgs"]["cg1"]["distribution"]
        assert d["applied_seq"] == latest and d["errors"] == 0, d
        state = json.loads((data / "appliance" / "replicas" / "cg1" / "state.json").read_text())
        assert state["applied_seq"] == latest and state["rollback_to"] is None
        assert os.path.getsize(data / "appliance" / "replicas" / "cg1" / "undo.log") == state["undo_end"]
        # The undo log survived the crash exact: rolled back to an early PIT, the replica is that PIT.
        pits = json.loads(run_cli(data, "pits", "cg1", "--json").stdout)["pits"]
        early = next(p["seq"] for p in pits[len(pits) // 4 :] if p["consistent"])
        run_cli(data, "restore", "a", "--seq", str(early), "--to", str(tmp_path / "early.raw"))
        fo = json.loads(run_cli(data, "failover", "cg1", "--seq", str(early), "--json").stdout)
        assert fo["replica_was_at"] == latest
        _compare(tmp_path / "early.raw", fo["exports"]["a"])
        fb = json.loads(run_cli(data, "failback", "cg1", "--json").stdout)
        assert fb["seq"] == early
        _compare(tmp_path / "early.raw", up.uri("a"))
