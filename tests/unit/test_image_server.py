"""Image access in-process (issue 4 item 5): the `ImageServer` in its own
event-loop thread, read and written with libnbd: every PIT of a D1/D2
workload (nicsplit.testing.workload) equals its ledger prefix, an image stays
at its PIT while the journal grows, and the writable overlay matches a byte
model under seeded random writes, zeroes and trims. Split from
tests/integration/test_image.py, which drives the same server through the
commands and real peer tools."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from nicsplit.recovery.image import ImageServer
from nicsplit.recovery.blockindex import BlockIndex
from nicsplit.testing.nbdclient import block_status, check_extents, connect, segments_digest
from nicsplit.testing.procs import import_libnbd
from nicsplit.testing.served import Served
from nicsplit.testing.workload import BS, Workload, journaled


@pytest.fixture
def workload(tmp_path: Path, seed: int) -> tuple[Path, Workload]:
    return journaled(tmp_path, seed)


def test_every_pit_over_nbd_equals_its_ledger_prefix(workload):
    jd, w = workload
    idx = BlockIndex(jd)
    n = 0
    for seq, golden in w.goldens():
        written = w.written_blocks(seq)
        with Served(ImageServer(jd, w.vdisks, seq, index=idx, validate=True, cg="cg1")) as s:
            for v in w.vdisks:
                h = connect(s.uri(v.name))
                assert h.get_size() == v.size and h.is_read_only()
                assert h.pread(v.size, 0) == bytes(golden[v.id]), f"PIT {seq}: {v.name} differs from the ledger prefix"
                check_extents(block_status(h, v.size), bytes(golden[v.id]), written[v.id])
                h.shutdown()
        n += 1
    assert n == len(w.batches)


def test_image_stays_at_its_pit_while_the_journal_grows(tmp_path: Path, seed: int):
    w = Workload.generate(seed, nbatches=30, windows=False)
    jd = tmp_path / "journal"
    w.write_journal(jd, upto_batch=15)
    goldens = {s: {k: bytes(v) for k, v in g.items()} for s, g in w.goldens()}
    pit = w.batches[14][0].last_seq
    idx = BlockIndex(jd)
    with Served(ImageServer(jd, w.vdisks, pit, index=idx)) as s:
        hs = {v.name: connect(s.uri(v.name)) for v in w.vdisks}
        for v in w.vdisks:
            assert hs[v.name].pread(v.size, 0) == goldens[pit][v.id]
        w.write_journal(jd, start_batch=15)  # ingest goes on
        assert idx.refresh() == 15  # even a refreshed shared index does not move the image
        for v in w.vdisks:
            assert hs[v.name].pread(v.size, 0) == goldens[pit][v.id]
    last = w.batches[-1][0].last_seq
    assert goldens[last] != goldens[pit]


@pytest.mark.parametrize("rounds", [200])
def test_writable_overlay_against_a_model(workload, tmp_path: Path, seed: int, rounds: int):
    jd, w = workload
    rng = random.Random(seed)
    pits = [m.last_seq for m, _ in w.batches]
    seq, other = pits[len(pits) // 2], pits[-1]
    goldens = {s: {k: bytes(v) for k, v in g.items()} for s, g in w.goldens()}
    digest = segments_digest(jd)
    ov = tmp_path / "overlay"
    model = {v.id: bytearray(goldens[seq][v.id]) for v in w.vdisks}
    owned = {v.id: bytearray(-(-v.size // BS)) for v in w.vdisks}  # blocks any op touched
    with Served(ImageServer(jd, w.vdisks, seq, writable=True, overlay_dir=ov, validate=True)) as s:
        assert ov.is_dir() and not list(ov.iterdir())  # overlay files are unlinked once open
        hs = {v.id: connect(s.uri(v.name)) for v in w.vdisks}
        h2 = connect(s.uri(w.vdisks[0].name))  # a second connection sees the same overlay
        nbd = import_libnbd()
        for i in range(rounds):
            v = rng.choice(w.vdisks)
            h = hs[v.id]
            off = rng.randrange(v.size // 512) * 512 if rng.random() < 0.5 else rng.randrange(v.size)
            ln = min(rng.choice([1, 511, 512, 4096, 5000, 8192, 3 * BS + 100, 16 * BS]), v.size - off) or 1
            off = min(off, v.size - ln)
            kind = rng.random()
            if kind < 0.6:
                data = rng.randbytes(ln)
                h.pwrite(data, off, nbd.CMD_FLAG_FUA if rng.random() < 0.2 else 0)
                model[v.id][off : off + ln] = data
            elif kind < 0.8:
                h.zero(ln, off, nbd.CMD_FLAG_NO_HOLE if rng.random() < 0.3 else 0)
                model[v.id][off : off + ln] = bytes(ln)
            else:
                h.trim(ln, off)
                model[v.id][off : off + ln] = bytes(ln)
            owned[v.id][off // BS : (off + ln - 1) // BS + 1] = b"\x01" * ((off + ln - 1) // BS + 1 - off // BS)
            if i % 20 == 19 or i == rounds - 1:
                h.flush()
                for u in w.vdisks:
                    assert hs[u.id].pread(u.size, 0) == bytes(model[u.id]), f"round {i}: {u.name} differs from the model"
                    touched = {b for b, o in enumerate(owned[u.id]) if o}
                    check_extents(block_status(hs[u.id], u.size), bytes(model[u.id]), w.written_blocks(seq)[u.id],
                                  touched)
                assert h2.pread(w.vdisks[0].size, 0) == bytes(model[w.vdisks[0].id])
        stats = s.srv.statistics()["vdisks"]
        assert sum(st.writes for st in stats.values()) > 0 and sum(st.fills for st in stats.values()) > 0
        # Another PIT of the same journal, and the journal itself, are untouched.
        with Served(ImageServer(jd, w.vdisks, other)) as s2:
            for v in w.vdisks:
                assert connect(s2.uri(v.name)).pread(v.size, 0) == goldens[other][v.id]
    assert not ov.exists()  # overlay gone after close
    assert segments_digest(jd) == digest
    with Served(ImageServer(jd, w.vdisks, seq)) as s3:  # the same PIT again: as it was
        for v in w.vdisks:
            assert connect(s3.uri(v.name)).pread(v.size, 0) == goldens[seq][v.id]
