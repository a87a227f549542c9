"""Issue 12, build item 5: one conformance module run against every
transport of the issue — ``ring``, ``nvme-pi``, ``shadow`` and ``net``. Real processes (`nicsplit up --transport NAME`), real clients
(qemu-io for the workload, libnbd for the fault cases), qemu-img to compare.

* **Ordering and identity.** A seeded deterministic workload (writes of
  varied sizes, aligned and not, and a write-zeroes) driven by qemu-io at
  QD1: the journal's records, in seq order, are exactly the workload's
  (op, virtual offset, length), each write's payload is what it wrote.
* **Identical journals.** The same workload gives the same journal on every
  transport: every record's seq, vdisk, op, offset, length, GAP flag and
  payload digest.
* **Commit-only shipping.** A write failed below the splitter (the
  ``error`` filter, as a failing datastore) never reaches the journal on a
  card transport (the card ships only committed writes). ``net`` ships
  before the write goes down, so the first failed write does reach the
  journal; as docs/operations.md ("net: the classic splitter") says, its
  region is then marked (the vdisk marks: the failed writes after it are not
  shipped one by one) and the resync journals production's content over
  every failed block, flagged GAP. Either way the latest PIT equals
  production.
* **Marking and resync on loss.** The card killed (ring, nvme-pi, shadow; the
  supervisor restarts it) or the link to the appliance cut
  (`nicsplit.testing.linkemu`, net): the host counts a loss, later writes
  carry the GAP flag while the vdisk is marked, the resync brings the CG
  back to protected, and the latest PIT equals production.

Runtime: two `up` starts per transport (the workload's journal is run once
per transport and shared by the identity and the identical-journals tests):
97 s for the module on the shared 2-core box.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from nicsplit.core import config
from nicsplit.core.ctl import request
from nicsplit.core.layout import Layout
from nicsplit.core.records import WFlag
from nicsplit.recovery.replay import OP_NAMES, open_journal
from nicsplit.testing.ledger import BS, block
from nicsplit.testing.linkemu import LinkEmulator
from nicsplit.testing.procs import UpProcess, import_libnbd, journal, libnbd_errno, nbd_connect, wait_for
from nicsplit.testing.recovered import cg_state
from nicsplit.testing.stack import cg_data, latest_pit_equals_production

pytestmark = pytest.mark.usefixtures("peers")

TRANSPORTS_UNDER_TEST = ("ring", "nvme-pi", "shadow", "net")
SIZE = 8 << 20
WRITES = 24


@pytest.fixture(scope="module")
def workload_seed() -> int:
    """One seed for the module: every transport runs the same workload."""
    s = int(os.environ.get("NICSPLIT_SEED", random.SystemRandom().randrange(1 << 32)))
    print(f"workload seed={s} (rerun with NICSPLIT_SEED={s})")
    return s


def workload(seed: int) -> tuple[list[str], list[tuple[str, int, int, int]]]:
    """qemu-io commands and what the journal must hold: (op, offset, length,
    pattern byte; -1 for zeroes), in order."""
    rng = random.Random(seed)
    cmds, want = [], []
    for i in range(WRITES):
        if rng.random() < 0.25:  # unaligned: a 512-byte multiple at a 512-byte offset
            off, length = rng.randrange(0, (6 << 20) // 512) * 512, rng.randrange(1, 17) * 512
        else:
            off, length = rng.randrange(0, (6 << 20) // BS) * BS, BS << rng.randrange(0, 6)
        pat = 1 + (seed + 37 * i) % 255
        if i == WRITES // 2:
            cmds += ["-c", f"write -z {off} {length}"]
            want.append(("zero", off, length, -1))
        else:
            cmds += ["-c", f"write -P {pat:#x} {off} {length}"]
            want.append(("write", off, length, pat))
    return cmds, want


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Deployment:
    """vdisk ``a`` in CG cg1 on ``transport``, an ``error`` filter below the
    splitter (armed while ``trigger`` exists); with net, the host ships
    through a link emulator in front of the appliance."""

    def __init__(self, tmp_path: Path, transport: str, seed: int) -> None:
        self.transport = transport
        self.trigger = tmp_path / "fail"
        self.link: LinkEmulator | None = None
        timeout_us = 1_000_000 if transport == "net" else 200_000
        filters = ["stats", {"name": "split", "split_timeout_us": timeout_us},
                   {"name": "error", "verbs": ["pwrite"], "trigger": str(self.trigger)}]
        sections: dict = {"splitter": {"transport": transport}}
        args = ["--transport", transport]
        if transport == "net":
            appliance = ("127.0.0.1", free_port())
            self.link = LinkEmulator(("127.0.0.1", 0), appliance, seed=seed).start()
            sections["splitter"].update(appliance=f"{self.link.address[0]}:{self.link.address[1]}", dead_after_s=3)
            sections["appliance"] = {"idle_timeout": 4, "heartbeat_interval": 1}
            args += ["--appliance-listen", f"{appliance[0]}:{appliance[1]}"]
        self.data = cg_data(tmp_path, SIZE, ("a",), vdisks={"a": {"filters": filters}}, sections=sections)
        self.up = UpProcess(self.data, *args)

    def __enter__(self) -> "Deployment":
        self.up.__enter__()
        assert ("card" in self.up.ready["processes"]) == (self.transport != "net"), self.up.ready
        wait_for(lambda: cg_state(self.data)["state"] == "protected", 60, "cg1 protected", interval=0.2)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.up.__exit__(*exc)
        finally:
            if self.link is not None:
                self.link.close()

    def uri(self) -> str:
        return self.up.uri("a")

    def losses(self) -> int:
        """The host's count of losses of its link of this transport."""
        st = request(Layout(self.data).host_sock, {"cmd": "status"})["status"]
        return int(st["transports"][self.transport]["losses"])


def journal_with_payloads(data: Path) -> list[dict]:
    """Every record of cg1 with its payload's digest, read from the journal
    itself (`journal dump` lists no payloads); run while nothing writes it."""
    out = []
    with open_journal(config.load(data), "cg1") as j:
        for r, payload in j.records():
            out.append({"seq": r.seq, "vdisk_id": r.vdisk_id, "op": OP_NAMES.get(r.op, str(r.op)), "offset": r.offset,
                        "length": r.length, "gap": bool(r.flags & WFlag.GAP), "payload": payload})
    return out


_journals: dict[str, list[dict]] = {}  # transport -> the workload's journal (one run each per module)


def workload_journal(transport: str, seed: int, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Run the deterministic workload once on ``transport`` (cached)."""
    if transport not in _journals:
        tmp = tmp_path_factory.mktemp(f"workload-{transport}")
        cmds, _ = workload(seed)
        with Deployment(tmp, transport, seed) as d:
            subprocess.run(["qemu-io", "-f", "raw", "-t", "writeback", *cmds, d.uri()], check=True,
                           capture_output=True, timeout=120)
            latest_pit_equals_production(d.data, "cg1", "a", d.uri(), tmp)
            assert cg_state(d.data)["state"] == "protected"
        _journals[transport] = journal_with_payloads(d.data)
    return _journals[transport]


@pytest.mark.parametrize("transport", TRANSPORTS_UNDER_TEST)
def test_ordering_and_identity(transport, workload_seed, tmp_path_factory):
    recs = workload_journal(transport, workload_seed, tmp_path_factory)
    _, want = workload(workload_seed)
    data_recs = [r for r in recs if r["op"] in ("write", "zero", "trim")]
    seqs = [r["seq"] for r in recs]
    assert seqs == sorted(set(seqs)), seqs  # strictly increasing: one CG order
    assert [(r["op"], r["offset"], r["length"]) for r in data_recs] == [w[:3] for w in want], (transport, data_recs)
    for r, (op, off, length, pat) in zip(data_recs, want):
        assert r["payload"] == (b"" if op == "zero" else bytes([pat]) * length), (transport, r["seq"], op, off)
        assert not r["gap"], r  # protected all along
    assert len({r["vdisk_id"] for r in data_recs}) == 1
    print(f"seed={workload_seed} {transport}: {len(data_recs)} records in workload order")


def test_identical_journals_across_transports(workload_seed, tmp_path_factory):
    def identity(recs: list[dict]) -> list[tuple]:
        return [(r["seq"], r["vdisk_id"], r["op"], r["offset"], r["length"], r["gap"],
                 hashlib.sha256(r["payload"]).hexdigest()) for r in recs if r["op"] != "barrier"]

    base = identity(workload_journal(TRANSPORTS_UNDER_TEST[0], workload_seed, tmp_path_factory))
    assert len(base) >= WRITES
    for t in TRANSPORTS_UNDER_TEST[1:]:
        assert identity(workload_journal(t, workload_seed, tmp_path_factory)) == base, t


@pytest.mark.timeout(300)
@pytest.mark.parametrize("transport", TRANSPORTS_UNDER_TEST)
def test_commit_only_then_loss_marks_and_resyncs(transport, tmp_path, seed):
    nbd = import_libnbd()
    with Deployment(tmp_path, transport, seed) as d:
        h = nbd_connect(d.uri())
        ok1, bad, ok2 = range(0, 10), range(100, 110), range(200, 210)
        for i in ok1:
            h.pwrite(block(i), i * BS)
        d.trigger.touch()
        for i in bad:  # failed below the splitter: the datastore "fails"
            with pytest.raises(nbd.Error) as ei:
                h.pwrite(block(i), i * BS)
            assert libnbd_errno(ei.value) == errno.EIO
        d.trigger.unlink()
        for i in ok2:
            h.pwrite(block(i), i * BS)
        wait_for(lambda: cg_state(d.data)["state"] == "protected", 120, "cg1 protected", interval=0.2)
        latest_pit_equals_production(d.data, "cg1", "a", d.uri(), tmp_path)
        recs = journal(d.data, "cg1")
        offsets = [r["offset"] for r in recs if r["op"] == "write"]
        bad_offsets = {i * BS for i in bad}
        if transport == "net":
            # shipped before it went down: the first failed write is journaled right
            # after ok1, its region marked (the vdisk marks, so nothing after it is
            # shipped one by one), and the resync journals production over every
            # failed block, flagged GAP
            assert offsets[:len(ok1) + 1] == [i * BS for i in (*ok1, bad[0])], offsets
            first = next(r["seq"] for r in recs if r["op"] == "write" and r["offset"] == bad[0] * BS)
            for off in bad_offsets:
                later = [r for r in recs if r["seq"] > first and r["offset"] <= off < r["offset"] + r["length"]]
                assert later and all(r["gap"] for r in later), (off, recs)
        else:
            assert [o for o in offsets if o in bad_offsets] == [], offsets  # never shipped
            assert offsets == [i * BS for i in (*ok1, *ok2)], offsets
        marks_seq = cg_state(d.data)["host_last_seq"]

        # loss: the card killed (the supervisor restarts it), or the link cut then healed
        losses = d.losses()
        if transport == "net":
            assert d.link is not None
            d.link.cut()
        else:
            os.kill(d.up.pid_of("card"), signal.SIGKILL)
        for i in range(300, 340):
            h.pwrite(block(i), i * BS)  # production first: every write succeeds
        wait_for(lambda: d.losses() > losses, 30, f"the host noticing the {transport} loss", interval=0.1)
        if d.link is not None:
            d.link.heal()
        for i in range(340, 350):
            h.pwrite(block(i), i * BS)
        wait_for(lambda: cg_state(d.data)["state"] == "protected", 120, "cg1 resynced and protected", interval=0.2)
        latest_pit_equals_production(d.data, "cg1", "a", d.uri(), tmp_path)
        after = [r for r in journal(d.data, "cg1") if r["seq"] > marks_seq]
        assert any(r["gap"] for r in after), after  # marked: the resync's records carry GAP
        h.shutdown()
        print(f"seed={seed} {transport}: {len(after)} records after the loss, "
              f"{sum(r['gap'] for r in after)} with GAP")
