"""Undo entries that keep a sealed image's blocks as stored (UNDO_IMAGE,
replica state version 2): a coalesced step neither opens the pre-image nor
seals it again.  Every PIT must still come back exactly, entries of the
older kinds (a version 1 replica) must still lay back, a key rotation must
re-key them, and a kept block that does not authenticate where it is laid
back must stop the rollback instead of landing.

Oracle: the ledger of a seeded workload of whole-block writes and zeroes
over few blocks (`golden_at`, TESTING.md D1/D3), byte for byte.
"""

from __future__ import annotations

import json
import os
import random
import struct
import zlib
from pathlib import Path

import pytest

from nicsplit.core.records import Op
from nicsplit.recovery import replica as replica_mod
from nicsplit.recovery.blockindex import ReplicaError
from nicsplit.recovery.replica import Distributor, undo_key_usage
from nicsplit.recovery.undolog import UNDO_IMAGE, UNDO_SEALED, UNDO_ZEROS, body_len
from nicsplit.storage import atrest
from nicsplit.storage.blob import BlobSealer
from nicsplit.storage.sealing import ENTRY_SIZE
from nicsplit.storage.sealing import SealedError
from nicsplit.testing.workload import BS, T0, Meta, V, Workload, golden_at
from nicsplit.wire.frames import Record

_HEAD = struct.Struct(">4sB3xQQQII")


def _workload(seed: int, nbatches: int = 24) -> Workload:
    rng = random.Random(seed)
    w = Workload([V(31, "a", 24 * BS), V(32, "b", 12 * BS + 1024)])
    seq = 0
    for bid in range(1, nbatches + 1):
        recs = []
        for _ in range(rng.randint(1, 10)):
            seq += 1
            v = rng.choice(w.vdisks)
            nb = -(-v.size // BS)
            b0 = rng.randrange(nb)
            off = b0 * BS
            ln = min(rng.choice([1, 1, 2, 3]) * BS, v.size - off)
            if rng.random() < 0.85:
                data = b"".join(rng.choice([rng.randbytes(BS), bytes(BS)]) for _ in range(-(-ln // BS)))[:ln]
                recs.append(Record(seq, seq, v.id, Op.WRITE, 0, off, ln, T0 + seq, data))
                w.ledger.append((seq, v.id, Op.WRITE, off, ln, data))
            else:
                recs.append(Record(seq, seq, v.id, Op.ZERO, 0, off, ln, T0 + seq))
                w.ledger.append((seq, v.id, Op.ZERO, off, ln, None))
        w.batches.append((Meta(bid, recs[0].seq, seq, T0, T0 + seq), recs))
    return w


def _setup(tmp_path: Path, seed: int) -> tuple[Workload, Path, Path]:
    atrest.Keyring.create(tmp_path / atrest.KEYRING_NAME)
    w = _workload(seed)
    jd = tmp_path / "journal" / "cg1"
    w.write_journal(jd)
    return w, jd, tmp_path / "replicas" / "cg1"


def _assert_at(d: Distributor, w: Workload, seq: int) -> None:
    want = golden_at(w, seq)
    for v in w.vdisks:
        assert d.read(v.id, 0, v.size) == want[v.id], f"replica of {v.name} differs from the ledger at seq {seq}"


def _entries(rd: Path) -> list[tuple[int, int, int]]:
    """(offset in undo.log, kind, body length) of every entry up to undo_end."""
    end = json.loads((rd / "state.json").read_text())["undo_end"]
    raw = (rd / "undo.log").read_bytes()[:end]
    out, pos = [], 0
    while pos < end:
        _, kind, _, _, _, length, _ = _HEAD.unpack_from(raw, pos)
        n = body_len(kind, length)
        out.append((pos, kind, n))
        pos += 40 + n
    return out


def _roll_back_everywhere(d: Distributor, w: Workload, rng: random.Random) -> None:
    seqs = sorted({s for s, *_ in w.ledger if s <= d.applied_seq})
    for target in sorted(rng.sample(seqs, min(10, len(seqs))), reverse=True) + [0]:
        d.undo_to(target)
        _assert_at(d, w, target)


def test_kept_blocks_roll_back_to_every_pit(tmp_path: Path, seed: int):
    w, jd, rd = _setup(tmp_path, seed)
    rng = random.Random(seed)
    with Distributor(jd, rd, w.vdisks) as d:
        while d.step(rng.randint(2, 25)):
            _assert_at(d, w, d.applied_seq)
        kinds = {k for _, k, _ in _entries(rd)}
        assert UNDO_IMAGE in kinds and UNDO_ZEROS in kinds, kinds
        assert json.loads((rd / "state.json").read_text())["version"] == 2
        _roll_back_everywhere(d, w, rng)
        d.catch_up(64)
        _assert_at(d, w, w.batches[-1][0].last_seq)


def test_a_version_1_replica_with_sealed_entries_rolls_back_through_both_kinds(tmp_path: Path, seed: int,
                                                                               monkeypatch):
    """Entries written as before (the pre-image opened and sealed: what a
    version 1 replica holds), then new steps keeping blocks as stored."""
    w, jd, rd = _setup(tmp_path, seed)
    rng = random.Random(seed)
    plan = replica_mod.plan
    with monkeypatch.context() as m:
        m.setattr(replica_mod, "plan", lambda recs, imgs, stored=frozenset(): plan(recs, imgs))
        with Distributor(jd, rd, w.vdisks) as d:
            for _ in range(8):  # ~30 of the ~130 records: the rest for the new steps
                d.step(rng.randint(2, 6))
    old = _entries(rd)
    assert {k for _, k, _ in old} <= {UNDO_SEALED, UNDO_ZEROS} and any(k == UNDO_SEALED for _, k, _ in old)
    st = json.loads((rd / "state.json").read_text())
    st["version"] = 1
    (rd / "state.json").write_text(json.dumps(st))
    with Distributor(jd, rd, w.vdisks) as d:
        _assert_at(d, w, d.applied_seq)
        d.catch_up(20)
        assert any(k == UNDO_IMAGE for _, k, _ in _entries(rd)[len(old):])
        _roll_back_everywhere(d, w, rng)


def test_kept_blocks_are_rekeyed_and_the_old_key_retired(tmp_path: Path, seed: int):
    w, jd, rd = _setup(tmp_path, seed)
    rng = random.Random(seed)
    kr = tmp_path / atrest.KEYRING_NAME
    with Distributor(jd, rd, w.vdisks) as d:
        d.catch_up(7)
    new, old = atrest.rotate(kr)
    with Distributor(jd, rd, w.vdisks) as d:
        assert set(d.key_usage()["undo_entries"]) == {old}
        _, entries = d.rekey()
        assert entries > 0 and set(undo_key_usage(rd / "undo.log")) == {new}
    atrest.retire(kr, old, {})
    with Distributor(jd, rd, w.vdisks) as d:
        _roll_back_everywhere(d, w, rng)


@pytest.mark.parametrize("where", ["ciphertext", "uid"])
def test_a_kept_block_that_does_not_authenticate_stops_the_rollback(tmp_path: Path, seed: int, where: str):
    w, jd, rd = _setup(tmp_path, seed)
    rng = random.Random(seed)
    with Distributor(jd, rd, w.vdisks) as d:
        d.catch_up(25)
        at = d.applied_seq
    kept = [(p, n) for p, k, n in _entries(rd) if k == UNDO_IMAGE]
    pos, n = rng.choice(kept)
    raw = bytearray((rd / "undo.log").read_bytes())
    if where == "uid":  # the CRC covers the uid: recompute it, as a log copied from another image would have
        raw[pos + 40 : pos + 56] = os.urandom(16)
        _, kind, _, _, _, length, _ = _HEAD.unpack_from(raw, pos)
        crc = zlib.crc32(raw[pos + 40 : pos + 40 + n - length], zlib.crc32(raw[pos : pos + 36]))
        struct.pack_into(">I", raw, pos + 36, crc)
        match = "another image"
    else:  # the ciphertext (the entry's last `length` bytes) is covered by the GCM tags, not by the CRC
        _, kind, _, _, _, length, _ = _HEAD.unpack_from(raw, pos)
        ct0 = pos + 40 + n - length
        # a block of the run that was stored (a hole's tag entry is zeros and its ciphertext is not checked)
        stored = [i for i in range(-(-length // BS))
                  if raw[pos + 56 + i * ENTRY_SIZE : pos + 60 + i * ENTRY_SIZE] != bytes(4)]
        i = rng.choice(stored)
        raw[ct0 + i * BS + rng.randrange(min(BS, length - i * BS))] ^= 0x20
        match = "does not authenticate"
    (rd / "undo.log").write_bytes(bytes(raw))
    with Distributor(jd, rd, w.vdisks) as d:
        with pytest.raises(ReplicaError, match=match):
            d.undo_to(0)
    assert at > 0


def test_a_kept_short_last_block_lays_back_after_the_vdisk_grew(tmp_path: Path, seed: int):
    """Vdisk "b" ends in a short block; kept as stored at its old length, it
    is laid back by its bytes once the image grew (its last block is whole)."""
    w, jd, rd = _setup(tmp_path, seed)
    rng = random.Random(seed)
    with Distributor(jd, rd, w.vdisks) as d:
        d.catch_up(9)
    assert any(k == UNDO_IMAGE for _, k, _ in _entries(rd))
    grown = [V(v.id, v.name, v.size + 3 * BS) for v in w.vdisks]
    with Distributor(jd, rd, grown) as d:
        seqs = sorted({s for s, *_ in w.ledger})
        for target in sorted(rng.sample(seqs, 8), reverse=True) + [0]:
            d.undo_to(target)
            want = golden_at(w, target)
            for v, g in zip(w.vdisks, grown):
                assert d.read(v.id, 0, g.size) == want[v.id] + bytes(g.size - v.size), f"{v.name} at {target}"


def test_seal_into_writes_a_blob_that_opens_like_seal_s(tmp_path: Path, seed: int):
    rng = random.Random(seed)
    sealer = BlobSealer(atrest.Keyring.create(tmp_path / atrest.KEYRING_NAME), b"replica undo")
    kid, aes = sealer.sealing_cipher()
    for n in (0, 1, 1536, BS, 3 * BS):
        data, aad = rng.randbytes(n), rng.randbytes(36)
        out = bytearray(n + BlobSealer.SEALED_OVERHEAD + 8)
        sealer.seal_into(kid, aes, os.urandom(12), data, aad, memoryview(out)[4 : 4 + n + BlobSealer.SEALED_OVERHEAD])
        blob = bytes(out[4 : 4 + n + BlobSealer.SEALED_OVERHEAD])
        assert out[:4] == bytes(4) and out[-4:] == bytes(4)  # nothing written outside its slot
        assert len(blob) == len(sealer.seal(data, aad)) and sealer.open(blob, aad) == data
        with pytest.raises(SealedError, match="fails authentication"):
            sealer.open(blob, aad[:-1] + bytes([aad[-1] ^ 1]))
