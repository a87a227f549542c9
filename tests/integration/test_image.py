"""Image access (issue 4 item 5): a CG at a PIT served over NBD by our codec,
read with real clients (libnbd, qemu-img, nbdcopy, nbdinfo, qemu-io).

The journals are the D1/D2 workloads of nicsplit.testing.workload (self-
describing blocks, unaligned writes, zero, trim, merge windows); the oracle
for every image is the ledger prefix of its PIT.  The writable overlay is
checked against a byte model under seeded random writes, zeroes and trims.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from pathlib import Path

import pytest

from nicsplit.recovery.image import ImageServer
from nicsplit.journal.writer import Journal
from nicsplit.core.records import Op
from nicsplit.testing.nbdclient import HOLE, ZERO, check_extents, connect, segments_digest
from nicsplit.testing.procs import import_libnbd, libnbd_errno, run_cli, wait_for
from nicsplit.testing.served import Served
from nicsplit.testing.workload import BS, Meta, T0, Workload, journaled
from nicsplit.wire.frames import Record

pytestmark = pytest.mark.usefixtures("peers")


@pytest.fixture
def workload(tmp_path: Path, seed: int) -> tuple[Path, Workload]:
    return journaled(tmp_path, seed)


# -- in-process server against peer tools: read-only (qemu-io), export list (nbdinfo) ------------


def test_readonly_refuses_writes_with_eperm(workload):
    jd, w = workload
    seq = w.batches[-1][0].last_seq
    digest = segments_digest(jd)
    with Served(ImageServer(jd, w.vdisks, seq, validate=True)) as s:
        h = connect(s.uri("alpha"), strict=False)
        nbd = import_libnbd()
        for op in (lambda: h.pwrite(b"x" * 4096, 0), lambda: h.zero(4096, 0), lambda: h.trim(4096, 0)):
            with pytest.raises(nbd.Error) as ei:
                op()
            assert libnbd_errno(ei.value) == 1  # EPERM, from the server's codec
        h.flush()  # allowed, a no-op
        golden = {s: bytes(g[w.vdisks[0].id]) for s, g in w.goldens()}[seq]
        assert h.pread(len(golden), 0) == golden  # the session lives on after refused writes
        p = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 4k", s.uri("beta")], capture_output=True,
                           text=True, timeout=30)
        assert p.returncode != 0 and "Permission denied" in p.stderr, p
    assert segments_digest(jd) == digest


def test_unknown_export_and_export_list(workload):
    jd, w = workload
    with Served(ImageServer(jd, w.vdisks, w.batches[-1][0].last_seq, cg="cg1", image_id="t1")) as s:
        nbd = import_libnbd()
        h = nbd.NBD()
        with pytest.raises(nbd.Error):
            h.connect_uri(s.uri("gamma"))
        p = subprocess.run(["nbdinfo", "--list", "--json", f"nbd://127.0.0.1:{s.port}"], capture_output=True,
                           text=True, timeout=30, check=True)
        names = sorted(e["export-name"] for e in json.loads(p.stdout)["exports"])
        assert names == ["alpha", "beta"]


# -- the commands, with a real data directory (subprocesses) ------------------------------------


@pytest.fixture
def cli_data(tmp_path: Path, seed: int):
    """Two vdisks in CG cg1 and a journal for them (ids from the catalog)."""
    from nicsplit.host.datastore import Datastore
    from nicsplit.testing.datadir import init_data

    data = init_data(tmp_path / "data")
    run_cli(data, "cg", "create", "cg1")
    run_cli(data, "vdisk", "create", "alpha", "--size", "256K", "--cg", "cg1")
    run_cli(data, "vdisk", "create", "beta", "--size", "192K", "--cg", "cg1")
    run_cli(data, "cg", "create", "empty")
    vds = {v.name: v for v in Datastore.open(data / "datastore").list_vdisks()}
    w = Workload.generate(seed, nbatches=24, vdisks=[vds["alpha"], vds["beta"]])
    w.write_journal(data / "appliance" / "journal" / "cg1")
    return data, w, vds


def _export(data: Path, *args: str) -> dict:
    p = run_cli(data, "image", "export", "cg1", *args, "--json")
    out = json.loads(p.stdout)
    print(f"image export {' '.join(args)}: ready in {out['ready_seconds']:.3f} s "
          f"(server {out['server_ready_seconds']:.3f} s after its start)")
    return out


def _images(data: Path) -> list[dict]:
    return json.loads(run_cli(data, "image", "list", "--json").stdout)["images"]


def _gone(pid: int) -> bool:
    try:
        st = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return st == "Z"


def test_cli_export_compare_map_close(cli_data, tmp_path: Path):
    data, w, vds = cli_data
    goldens = {s: {k: bytes(v) for k, v in g.items()} for s, g in w.goldens()}
    good = [p for p in w.expected_pits() if p.consistent]
    mid = good[len(good) // 2]
    run_cli(data, "bookmark", "cg1", "mid", "--seq", str(mid.seq))
    img = _export(data, "--bookmark", "mid")
    assert img["seq"] == mid.seq and img["writable"] is False and set(img["exports"]) == {"alpha", "beta"}
    listed = _images(data)
    assert [(i["id"], i["alive"], i["seq"]) for i in listed] == [(img["id"], True, mid.seq)]
    for name, url in img["exports"].items():
        golden = tmp_path / f"{name}.golden"
        golden.write_bytes(goldens[mid.seq][vds[name].id])
        subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(golden), url], check=True,
                       capture_output=True, timeout=60)
        copy = tmp_path / f"{name}.copy"
        subprocess.run(["nbdcopy", url, str(copy)], check=True, capture_output=True, timeout=60)
        assert copy.read_bytes() == golden.read_bytes()
        m = json.loads(subprocess.run(["nbdinfo", "--map", "--json", url], check=True, capture_output=True,
                                      text=True, timeout=60).stdout)
        ext = [(e["offset"], e["length"], e["type"]) for e in m]
        check_extents(ext, golden.read_bytes(), w.written_blocks(mid.seq)[vds[name].id])
        if any(b not in w.written_blocks(mid.seq)[vds[name].id] for b in range(vds[name].size // BS)):
            assert any(t == HOLE | ZERO for _, _, t in ext)
    # The latest PIT, from a second image at the same time.
    latest = _export(data, "--latest")
    assert latest["seq"] == good[-1].seq and latest["id"] != img["id"]
    subprocess.run(["nbdcopy", latest["exports"]["beta"], str(tmp_path / "b.latest")], check=True, timeout=60)
    assert (tmp_path / "b.latest").read_bytes() == goldens[good[-1].seq][vds["beta"].id]
    assert len(_images(data)) == 2
    for i in (img, latest):
        out = json.loads(run_cli(data, "image", "close", i["id"], "--json").stdout)
        assert out == {"id": i["id"], "closed": True, "killed": False}
        assert _gone(i["pid"])
    assert _images(data) == [] and not list((data / "run" / "images").iterdir())
    assert "no images" in run_cli(data, "image", "list").stdout


def test_cli_writable_export_with_qemu_io(cli_data, tmp_path: Path):
    data, w, vds = cli_data
    jd = data / "appliance" / "journal" / "cg1"
    digest = segments_digest(jd)
    goldens = {s: {k: bytes(v) for k, v in g.items()} for s, g in w.goldens()}
    seq = [p for p in w.expected_pits() if p.consistent][-1].seq
    img = _export(data, "--seq", str(seq), "--writable")
    assert img["writable"] is True
    overlay = data / "run" / "images" / f"{img['id']}.overlay"
    assert overlay.is_dir()
    url = img["exports"]["alpha"]
    for cmd in ("write -P 0x5a 4096 8192", "write -P 0x6b 1000 100", "write -z 65536 65536"):
        subprocess.run(["qemu-io", "-f", "raw", "-c", cmd, url], check=True, capture_output=True, timeout=30)
    for cmd in ("read -P 0x5a 4096 8192", "read -P 0x6b 1000 100", "read -P 0 65536 65536"):
        p = subprocess.run(["qemu-io", "-f", "raw", "-c", cmd, url], capture_output=True, text=True, timeout=30)
        assert p.returncode == 0 and "Pattern verification failed" not in p.stdout, p.stdout
    expect = bytearray(goldens[seq][vds["alpha"].id])
    expect[4096:12288] = b"\x5a" * 8192
    expect[1000:1100] = b"\x6b" * 100
    expect[65536:131072] = bytes(65536)
    copy = tmp_path / "alpha.copy"
    subprocess.run(["nbdcopy", url, str(copy)], check=True, timeout=60)
    assert copy.read_bytes() == bytes(expect)
    run_cli(data, "image", "close", img["id"])
    assert not overlay.exists() and _gone(img["pid"])
    assert segments_digest(jd) == digest  # the journal never changed
    again = _export(data, "--seq", str(seq))
    subprocess.run(["nbdcopy", again["exports"]["alpha"], str(copy)], check=True, timeout=60)
    assert copy.read_bytes() == goldens[seq][vds["alpha"].id]  # the writes went with the overlay
    run_cli(data, "image", "close", again["id"])


def test_cli_close_after_the_server_died(cli_data):
    import signal

    data, w, vds = cli_data
    img = _export(data, "--latest", "--writable")
    os.kill(img["pid"], signal.SIGKILL)
    wait_for(lambda: _gone(img["pid"]), 10, "the killed image server")
    (listed,) = _images(data)
    assert listed["alive"] is False
    assert "server gone" in run_cli(data, "image", "list").stdout
    run_cli(data, "image", "close", img["id"])
    assert _images(data) == [] and not list((data / "run" / "images").iterdir())


def test_cli_bad_input_one_line(cli_data):
    data, w, vds = cli_data
    last = w.expected_pits()[-1].seq
    cases = [
        (("image", "export", "nope", "--latest"), "unknown consistency group 'nope'"),
        (("image", "export", "empty", "--latest"), "consistency group empty has no vdisks"),
        (("image", "export", "cg1", "--seq", str(last + 5)), f"no point in time at seq {last + 5}"),
        (("image", "export", "cg1", "--bookmark", "zz"), "unknown bookmark 'zz'"),
        (("image", "export", "cg1", "--at", "1000"), "before the oldest point in time"),
        (("image", "export", "cg1", "--at", "soon"), "bad time"),
        (("image", "export", "cg1", "--latest", "--listen", "nope"), "bad listen address"),
        (("image", "close", "deadbeef"), "unknown image id 'deadbeef'"),
        (("image", "close", "../x"), "unknown image id"),
    ]
    bad = [p for p in w.expected_pits() if not p.consistent]
    if bad:
        cases.append((("image", "export", "cg1", "--seq", str(bad[0].seq)), "inside a merge window"))
    for argv, msg in cases:
        p = run_cli(data, *argv, check=False)
        err = p.stderr.strip()
        assert p.returncode == 1 and len(err.splitlines()) == 1 and msg in err and "Traceback" not in err, (argv, err)
    assert _images(data) == []


# -- ready time with a large journal (printed, not asserted: TESTING.md) ---------------------------


def _hours_journal(jd: Path, total: int, vdisk, rec_size: int, rng: random.Random, hours: float = 2.0) -> int:
    """``total`` bytes of ``rec_size`` writes at random aligned offsets, in
    4 MiB batches whose times span ``hours`` (so "one hour back" is a PIT)."""
    pool = rng.randbytes(8 << 20)
    per_batch = (4 << 20) // rec_size
    nbatches = total // (4 << 20)
    nblocks = vdisk.size // rec_size
    seq = 0
    with Journal.open(jd) as j:
        for b in range(nbatches):
            t = T0 + int(b * hours * 3600e9 / nbatches)
            recs = []
            for _ in range(per_batch):
                seq += 1
                start = rng.randrange(len(pool) - rec_size)
                recs.append(Record(seq, seq, vdisk.id, Op.WRITE, 0, rng.randrange(nblocks) * rec_size, rec_size, t,
                                   seq.to_bytes(8, "big") + pool[start + 8 : start + rec_size]))
            j.append_batch(Meta(b + 1, recs[0].seq, seq, t, t), recs)
    return seq


@pytest.mark.parametrize("total,rec_size", [(256 << 20, 4096), (1 << 30, 64 << 10)], ids=["256MiB-4k", "1GiB-64k"])
def test_export_ready_time_with_a_large_journal(tmp_path: Path, seed: int, total: int, rec_size: int):
    from nicsplit.recovery.reader import PitReader
    from nicsplit.host.datastore import Datastore
    from nicsplit.testing.datadir import init_data

    data = init_data(tmp_path / "data")
    run_cli(data, "cg", "create", "big")
    run_cli(data, "vdisk", "create", "disk", "--size", "1G", "--cg", "big")
    v = Datastore.open(data / "datastore").get_vdisk("disk")
    jd = data / "appliance" / "journal" / "big"
    t = time.perf_counter()
    last = _hours_journal(jd, total, v, rec_size, random.Random(seed))
    t_write = time.perf_counter() - t
    at = (T0 + 3600 * 10**9) / 1e9  # one hour back from the end of a 2 h journal
    p = run_cli(data, "image", "export", "big", "--at", f"{at:.3f}", "--json")
    img = json.loads(p.stdout)
    info = json.loads((data / "run" / "images" / f"{img['id']}.json").read_text())
    print(f"\n{total >> 20} MiB journal ({last} records of {rec_size >> 10} KiB on a 1 GiB vdisk, written in "
          f"{t_write:.1f} s): 'image export --at <1 h back>' ready in {img['ready_seconds']:.3f} s "
          f"(server: index {info['index_seconds']:.3f} s, listening {info['ready_seconds']:.3f} s after start; "
          f"the rest is interpreter start)")
    try:
        h = connect(img["exports"]["disk"])
        with PitReader(jd, [v], img["seq"]) as r:
            for off in (0, 512 << 20, (1 << 30) - (1 << 20)):
                assert h.pread(1 << 20, off) == r.pread(v.id, off, 1 << 20)
        h.shutdown()
    finally:
        run_cli(data, "image", "close", img["id"])
