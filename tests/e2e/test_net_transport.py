"""Issue 12 items 3 and 4: the ``net`` transport (the classic splitter, no
card) and choosing a transport, with real processes (`nicsplit up`) and real
clients (fio, qemu-io, qemu-img):

* ``nicsplit up --transport net`` starts no card; fio (QD16, verified) and
  qemu-io writes reach the appliance's journal with their virtual identity;
  the latest PIT equals production;
* switching the transport on the next start (ring -> net -> ring) keeps the
  journal and its PITs: every PIT taken before a switch restores what it
  restored before, and the sequence goes on;
* a CG whose vdisks name two transports, or an unknown transport, is refused
  at start with one clear line.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from nicsplit.card.transports.base import TRANSPORTS
from nicsplit.control.schema import check
from nicsplit.testing.procs import UpProcess, journal, run_cli
from nicsplit.testing.stack import cg_data, qemu_io, status, wait_durable

pytestmark = pytest.mark.usefixtures("peers")

SIZE = 8 << 20


def restore(data: Path, tmp_path: Path, vdisk: str, *how: str) -> bytes:
    out = tmp_path / f"restore-{vdisk}.raw"
    run_cli(data, "restore", vdisk, *how, "--to", str(out), "--force", timeout=120)
    b = out.read_bytes()
    out.unlink()
    return b


def test_up_transport_net_journals_every_write_without_a_card(tmp_path, seed):
    data = cg_data(tmp_path, SIZE, ("a",))
    with UpProcess(data, "--transport", "net") as up:
        assert "card" not in up.ready["processes"], up.ready  # no card to start with net
        uri = up.uri("a")
        subprocess.run(["fio", "--name=a", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k",
                        f"--size={SIZE}", "--iodepth=16", "--verify=crc32c", "--verify_fatal=1",
                        f"--randseed={seed}", "--number_ios=1024"],
                       check=True, capture_output=True, text=True, cwd=tmp_path, timeout=600)
        qemu_io(uri, "write -P 0xab 1M 64k", "write -z 2M 64k", "flush", "write -P 0xcd 3M 4k")
        cg = wait_durable(data)
        st = status(data)
        (v,) = [v for c in st["cgs"] for v in c["vdisks"]]
        assert v["state"] == "protected" and v.get("transport") == "net", json.dumps(st, indent=1)
        assert check(st) == [] and st["processes"]["card"]["needed"] is False, check(st)
        assert not [a for a in st["alerts"] if a["name"] == "card_down"], st["alerts"]  # no card is needed
        recs = journal(data, "cg1")
        writes = [r for r in recs if r["op"] == "write"]
        assert len(writes) >= 1024 + 2, len(writes)
        # identity: the qemu-io writes carry their virtual offsets and lengths
        assert any(r["offset"] == 1 << 20 and r["length"] == 65536 for r in writes)
        assert any(r["op"] == "zero" and r["offset"] == 2 << 20 for r in recs)
        seqs = [r["seq"] for r in recs]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        assert seqs[-1] == cg["host_last_seq"]
        latest = tmp_path / "latest.raw"
        run_cli(data, "restore", "a", "--latest", "--to", str(latest), "--force", timeout=120)
        subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(latest), uri],
                       check=True, capture_output=True, timeout=120)
        host_stats = json.loads(run_cli(data, "host", "stats", "--json").stdout)
        net = host_stats.get("net_transport", {})
        assert net.get("acked", 0) >= 1024 and net.get("batches", 0) >= 1, host_stats.keys()
        assert net["batches"] < net["acked"], net  # writes in flight together at QD16 shared batches
        print(f"seed={seed}: {len(writes)} writes journaled over net in {net['batches']} batches")


def test_switching_transport_keeps_journal_and_pits(tmp_path, seed):
    data = cg_data(tmp_path, SIZE, ("a",))
    digests: dict[int, str] = {}  # PIT seq -> sha256 of vdisk a restored there
    for round_, (transport, pattern) in enumerate((("ring", 0x11), ("net", 0x22), ("ring", 0x33))):
        with UpProcess(data, "--transport", transport) as up:
            assert ("card" in up.ready["processes"]) == (transport == "ring"), up.ready
            # every PIT of the earlier runs restores as it did
            for seq, digest in digests.items():
                assert hashlib.sha256(restore(data, tmp_path, "a", "--seq", str(seq))).hexdigest() == digest, seq
            qemu_io(up.uri("a"), f"write -P {pattern:#x} {round_ << 20} 256k", "flush")
            cg = wait_durable(data)
            seq = cg["host_last_seq"]
            assert seq > max(digests, default=0)  # the CG's sequence goes on across the switch
            img = restore(data, tmp_path, "a", "--latest")
            for r, (_, p) in enumerate((("ring", 0x11), ("net", 0x22), ("ring", 0x33))[: round_ + 1]):
                assert img[r << 20: (r << 20) + (256 << 10)] == bytes([p]) * (256 << 10), (transport, r)
            digests[seq] = hashlib.sha256(img).hexdigest()
            (v,) = [v for c in status(data)["cgs"] for v in c["vdisks"]]
            assert v.get("transport") == transport
    print(f"seed={seed}: PITs {sorted(digests)} kept across ring -> net -> ring")


def test_mixed_cg_and_unknown_transport_are_refused(tmp_path):
    data = cg_data(tmp_path, SIZE, ("a", "b"), vdisks={"b": {"transport": "net"}})
    p = run_cli(data, "host", "serve", "--listen", "127.0.0.1:0", check=False, timeout=60)
    assert p.returncode != 0 and "cg1 mixes transports" in p.stderr and "net: b" in p.stderr, p.stderr
    p = run_cli(data, "up", "--transport", "bogus", check=False, timeout=60)
    assert p.returncode != 0 and "unknown transport" in p.stderr and ", ".join(sorted(TRANSPORTS)) in p.stderr, p.stderr
