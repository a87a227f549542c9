"""Issue 3 acceptance: real host, card and appliance processes (`nicsplit up`),
real clients (fio, libnbd, qemu-img); the journal is checked against what the
clients did.

The split timeout is raised to 1 s and the hidden volume to 256 MiB in
these tests, except where marking is the point: this shared 2-core machine can deschedule the card for
milliseconds, and a vdisk that drops to marking (correctly, P4) would make a
"journal holds every write" check meaningless.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
from pathlib import Path

import pytest

from nicsplit.core.ctl import request
from nicsplit.core.layout import Layout
from nicsplit.host.datastore import Datastore
from nicsplit.host.marking import MarkingMap
from nicsplit.testing.stack import cg_data
from nicsplit.testing.procs import (
    UpProcess, call_within, import_libnbd, journal, libnbd_errno, nbd_connect, run_cli, wait_for,
)

pytestmark = pytest.mark.usefixtures("peers")

SIZE = 32 << 20


def system(tmp_path: Path, *, timeout_us: int = 1_000_000, vdisks: dict | None = None, names=("a", "b"),
           **host: object) -> Path:
    return cg_data(tmp_path, SIZE, tuple(names), timeout_us=timeout_us, vdisks=vdisks, **host)


def status(data: Path) -> dict:
    return json.loads(run_cli(data, "status", "--json").stdout)


def writes(recs: list[dict]) -> list[dict]:
    return [r for r in recs if r["op"] == "write"]


def wait_journal(data: Path, count: int, timeout: float = 180) -> list[dict]:
    box: dict = {}

    def enough() -> bool:
        box["r"] = journal(data, "cg1")
        return len(writes(box["r"])) >= count

    wait_for(enough, timeout, f"{count} journaled writes", interval=0.5)
    return box["r"]


def test_fio_two_vdisks_journal_and_replay(tmp_path, seed):
    data = system(tmp_path)
    with UpProcess(data) as up:
        procs = [
            subprocess.Popen(
                ["fio", f"--name={n}", "--ioengine=nbd", f"--uri={up.uri(n)}", "--rw=randwrite", "--bs=4k",
                 f"--size={SIZE}", "--iodepth=16", "--verify=crc32c", "--verify_fatal=1", f"--randseed={seed + i}"],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
            )
            for i, n in enumerate(("a", "b"))
        ]
        for p in procs:
            out, _ = p.communicate(timeout=600)
            assert p.returncode == 0, out
        per_vdisk = SIZE // 4096
        recs = wait_journal(data, 2 * per_vdisk)
        st = status(data)
        assert {v["state"] for c in st["cgs"] for v in c["vdisks"]} == {"protected"}, json.dumps(st, indent=1)
        (cg,) = st["cgs"]
        assert cg["name"] == "cg1" and cg["state"] == "protected"
        assert isinstance(cg["rpo_seconds"], (int, float)) and cg["rpo_seconds"] < 1.0, cg
        assert sorted(v["name"] for v in cg["vdisks"]) == ["a", "b"]
        for name in ("host", "card", "appliance"):
            assert st["processes"][name]["pid"] == up.pid_of(name)
        # Every committed write exactly once, in CG order, with virtual offsets.
        seqs = [r["seq"] for r in recs]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        ws = writes(recs)
        assert len(ws) == 2 * per_vdisk
        for n in ("a", "b"):
            offs = sorted(r["offset"] for r in ws if r["vdisk"] == n)
            assert offs == list(range(0, SIZE, 4096)), f"vdisk {n}: not every block exactly once"
            assert all(r["length"] == 4096 for r in ws if r["vdisk"] == n)
        # Replaying the journal onto empty images reproduces production.
        out = tmp_path / "replay"
        run_cli(data, "journal", "replay", "cg1", "--out", str(out))
        for n in ("a", "b"):
            subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(out / f"{n}.raw"), up.uri(n)],
                           check=True, capture_output=True, timeout=120)
    # The offsets journaled are virtual: the datastore put the data elsewhere.
    ds = Datastore.open(data / "datastore")
    ds.open_io()
    try:
        store = ds.vdisk("a")
        differ = sum(1 for off in range(0, SIZE, 1 << 20) if store.physical(off)[1] != off)
        assert differ > 0
    finally:
        ds.close()



def test_write_order_alternating_vdisks(tmp_path, rng):
    data = system(tmp_path)
    with UpProcess(data) as up:
        ha, hb = nbd_connect(up.uri("a")), nbd_connect(up.uri("b"))
        issued = []
        for i in range(300):
            name, h = ("a", ha) if i % 2 == 0 else ("b", hb)
            off = rng.randrange(0, SIZE // 4096) * 4096
            h.pwrite(rng.randbytes(4096), off)  # one at a time: acked before the next
            issued.append((name, off))
        recs = writes(wait_journal(data, len(issued)))
        assert [(r["vdisk"], r["offset"]) for r in recs] == issued


def test_failed_writes_are_never_journaled(tmp_path):
    trigger = tmp_path / "fail"
    data = system(tmp_path, vdisks={"a": {"filters": [
        "stats", {"name": "split", "split_timeout_us": 1_000_000},
        {"name": "error", "verbs": ["pwrite"], "trigger": str(trigger)},  # below the splitter: the datastore "fails"
    ]}})
    with UpProcess(data) as up:
        h = nbd_connect(up.uri("a"))
        ok1 = [i * 4096 for i in range(0, 20)]
        bad = [i * 4096 for i in range(100, 120)]
        ok2 = [i * 4096 for i in range(200, 220)]
        for off in ok1:
            h.pwrite(b"1" * 4096, off)
        trigger.touch()
        nbd = import_libnbd()
        for off in bad:
            with pytest.raises(nbd.Error) as ei:
                h.pwrite(b"2" * 4096, off)
            assert libnbd_errno(ei.value) == errno.EIO
        trigger.unlink()
        for off in ok2:
            h.pwrite(b"3" * 4096, off)
        recs = writes(wait_journal(data, len(ok1) + len(ok2)))
        assert [r["offset"] for r in recs] == ok1 + ok2  # CG order: nothing failed slipped in between
        st = status(data)
        assert [v["state"] for c in st["cgs"] for v in c["vdisks"] if v["name"] == "a"] == ["protected"]


def test_card_killed_writes_go_on_and_dirty_map_covers_the_gap(tmp_path, rng):
    timeout_us = 50_000
    # No automatic resync here (the card is restarted at once): this checks
    # what marking records; tests/e2e/test_resync_under_load.py checks what follows.
    data = system(tmp_path, timeout_us=timeout_us, resync=False)
    with UpProcess(data) as up:
        h = nbd_connect(up.uri("a"))
        ledger = []
        card_pid = up.pid_of("card")
        for i in range(600):
            if i == 300:
                os.kill(card_pid, signal.SIGKILL)
            off = rng.randrange(0, SIZE // 4096) * 4096
            block = bytes([i % 251 + 1]) * 4096  # every write must succeed: production first
            if i < 300:
                h.pwrite(block, off)
            else:  # bounded by the split timeout, not by the dead card (generous slack: "promptly", not speed)
                call_within(timeout_us / 1e6 + 1.0, f"write {i} after the card was killed", h.pwrite, block, off)
            ledger.append(off)
        st = status(data)
        a = next(v for c in st["cgs"] for v in c["vdisks"] if v["name"] == "a")
        assert a["state"] == "marking", st
        uuid = next(v for v in Datastore.open(data / "datastore").list_vdisks() if v.name == "a").uuid
        dmap = MarkingMap(data / "host" / "marking", uuid, SIZE)
        journaled = {r["offset"] for r in writes(journal(data, "cg1")) if r["vdisk"] == "a"}
        uncovered = [off for off in ledger if off not in journaled and not dmap.is_marked(off, 4096)]
        assert not uncovered, f"{len(uncovered)} acknowledged writes neither journaled nor marked dirty"
        assert dmap.dirty_bytes() > 0
        dmap.close()


def test_appliance_restart_loses_nothing_stores_nothing_twice(tmp_path, rng):
    data = system(tmp_path)
    with UpProcess(data) as up:
        h = nbd_connect(up.uri("a"))
        issued = []
        for i in range(1500):
            if i == 500:
                os.kill(up.pid_of("appliance"), signal.SIGKILL)
            off = rng.randrange(0, SIZE // 4096) * 4096
            h.pwrite(rng.randbytes(4096), off)
            issued.append(off)
        recs = writes(wait_journal(data, len(issued)))
        seqs = [r["seq"] for r in recs]
        assert len(seqs) == len(set(seqs)) == len(issued), "a batch was lost or stored twice"
        assert [r["offset"] for r in recs] == issued
        assert int((data / "run" / "appliance.pid").read_text()) != 0
        st = status(data)
        assert [v["state"] for c in st["cgs"] for v in c["vdisks"] if v["name"] == "a"] == ["protected"], st


def test_hidden_volume_is_hidden(tmp_path):
    data = system(tmp_path)
    with UpProcess(data) as up:
        card_pid = up.pid_of("card")
        mine = []
        for p in Path("/dev/shm").glob("nicsplit-hv-*"):
            st = p.stat()
            assert stat.S_IMODE(st.st_mode) == 0o600
            mine.append(p)
        assert mine, "the card made no hidden volume"
        listing = json.loads(subprocess.run(["nbdinfo", "--list", "--json", up.uri("")], capture_output=True, text=True,
                                            check=True).stdout)
        names = {e["export-name"] for e in listing["exports"]}
        assert names == {"a", "b"}
        nbd = import_libnbd()
        for p in mine:
            uid = p.name.removeprefix("nicsplit-hv-")
            for name in (uid, p.name, str(p)):
                h = nbd.NBD()
                h.set_opt_mode(True)
                h.connect_uri(up.uri(""))
                h.set_export_name(name)
                with pytest.raises(nbd.Error) as ei:
                    h.opt_go()
                assert libnbd_errno(ei.value) == errno.ENOENT
                h.opt_abort()
        assert card_pid > 0


def test_card_stalled_past_the_split_timeout_loses_no_protection(tmp_path, rng):
    """A late ack is not a lost write (issue 10, build 1): with the default
    1 ms split timeout, the card stopped (SIGSTOP) while writes arrive makes
    them late, not lost. Each write still returns promptly (P4); the vdisk
    stays protected; once the card runs again it takes them in order and the
    journal holds every write, in the client's order."""
    data = system(tmp_path, timeout_us=1000)
    with UpProcess(data) as up:
        h = nbd_connect(up.uri("a"))
        ledger = []

        def put(i: int) -> None:
            off = rng.randrange(0, SIZE // 4096) * 4096
            call_within(1.0, f"write {i}", h.pwrite, bytes([i % 251 + 1]) * 4096, off)
            ledger.append(off)

        put(0)
        wait_journal(data, 1)  # the card is attached and shipping
        card = up.pid_of("card")
        os.kill(card, signal.SIGSTOP)
        try:
            for i in range(1, 41):
                put(i)
        finally:
            os.kill(card, signal.SIGCONT)
        for i in range(41, 61):
            put(i)
        recs = wait_journal(data, len(ledger))
        assert [r["offset"] for r in writes(recs) if r["vdisk"] == "a"] == ledger
        st = status(data)
        a = next(v for c in st["cgs"] for v in c["vdisks"] if v["name"] == "a")
        assert a["state"] == "protected", st
        host = request(Layout(data).host_sock, {"cmd": "status"})["status"]
        late = sum(v.get("late", 0) for v in host["vdisks"])
        assert late >= 1, f"stopping the card made no write late, so this test proved nothing: {host}"
        assert host["card"]["unconfirmed"] == 0 and host["card"]["late_refused"] == 0, host
