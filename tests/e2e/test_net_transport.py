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

import json
import subprocess

import pytest

from nicsplit.card.transports.base import TRANSPORTS
from nicsplit.control.schema import check
from nicsplit.testing.procs import UpProcess, journal, run_cli
from nicsplit.testing.stack import cg_data, qemu_io, status, switch_keeps_every_pit, wait_durable

pytestmark = pytest.mark.usefixtures("peers")

SIZE = 8 << 20


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
    pits = switch_keeps_every_pit(data, tmp_path, (("ring", 0x11), ("net", 0x22), ("ring", 0x33)))
    print(f"seed={seed}: PITs {pits} kept across ring -> net -> ring")


def test_mixed_cg_and_unknown_transport_are_refused(tmp_path):
    data = cg_data(tmp_path, SIZE, ("a", "b"), vdisks={"b": {"transport": "net"}})
    p = run_cli(data, "host", "serve", "--listen", "127.0.0.1:0", check=False, timeout=60)
    assert p.returncode != 0 and "cg1 mixes transports" in p.stderr and "net: b" in p.stderr, p.stderr
    p = run_cli(data, "up", "--transport", "bogus", check=False, timeout=60)
    assert p.returncode != 0 and "unknown transport" in p.stderr and ", ".join(sorted(TRANSPORTS)) in p.stderr, p.stderr
