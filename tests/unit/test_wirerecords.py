"""The appliance's one-pass record decode (`nicsplit.wire.wirerecords`) and
the journal appending its views as they are: it accepts and refuses exactly
what `frames.decode_records` does, and a journal appended from WireRecords
holds the same bytes (clear) or the same records (sealed) as one appended
from Records.  Seeded; the seed is printed."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from nicsplit.core.records import Op
from nicsplit.journal.writer import BatchRejected, Journal
from nicsplit.storage import atrest
from nicsplit.testing.workload import Meta, rand_batches
from nicsplit.wire import frames as F
from nicsplit.wire.wirerecords import WireRecord, decode_wire_records, wire_records

SEED = int(os.environ.get("NICSPLIT_TEST_SEED", "20261202"))


def _as_record(w: WireRecord) -> F.Record:
    return F.Record(w.seq, w.io_id, w.vdisk_id, w.op, w.flags, w.offset, w.length, w.time_ns, bytes(w.data), w.refs)


def _rand_record(rng: random.Random, seq: int) -> F.Record:
    kind = rng.random()
    if kind < 0.6:
        length = rng.choice([512, 4096, 8192, 9000, 3 * 4096])
        nblocks = (length + 4095) // 4096
        refd = sorted(rng.sample(range(nblocks), rng.randrange(nblocks + 1))) if rng.random() < 0.4 else []
        data = b"".join(rng.randbytes(min(4096, length - i * 4096)) for i in range(nblocks) if i not in refd)
        refs = tuple((i, rng.randbytes(16)) for i in refd)
        return F.Record(seq, rng.randrange(1 << 64), rng.randrange(1, 9), Op.WRITE, rng.randrange(4),
                        rng.randrange(1 << 30) * 512, length, rng.randrange(-(1 << 63), 1 << 63), data, refs)
    op = rng.choice([Op.ZERO, Op.TRIM, Op.BARRIER])
    return F.Record(seq, seq, 2, op, 0, 0 if op == Op.BARRIER else 4096, 0 if op == Op.BARRIER else 65536, seq)


def _outcome(fn, plain: bytes):
    try:
        return fn(plain)
    except F.FrameError as e:
        return ("FrameError", str(e))


def test_wire_records_decode_like_decode_records():
    print(f"seed {SEED}")
    rng = random.Random(SEED)
    for _ in range(300):
        recs = [_rand_record(rng, s) for s in range(1, rng.randrange(0, 6) + 1)]
        plain = F.encode_records(recs)
        wires = decode_wire_records(plain)
        assert [_as_record(w) for w in wires] == recs == F.decode_records(plain)
        assert [bytes(w.wire) for w in wires] == [F.encode_record(r) for r in recs]
        for w in wires:  # the data views are where data_offset says
            assert bytes(w.wire[w.data_offset:]) == bytes(w.data)
        # Mutated plaintexts (a flipped byte, a cut): refused or accepted alike, same message.
        for _ in range(20):
            bad = bytearray(plain)
            if bad and rng.random() < 0.7:
                i = rng.randrange(len(bad))
                bad[i] ^= 1 << rng.randrange(8)
            else:
                del bad[rng.randrange(len(bad) + 1):]
            bad = bytes(bad)
            want = _outcome(F.decode_records, bad)
            got = _outcome(lambda b: [_as_record(w) for w in decode_wire_records(b)], bad)
            assert got == want, (SEED, bad.hex())


def test_wire_record_blocks_match_data_blocks():
    from nicsplit.journal.format import data_blocks  # the journal's helper, for comparison only
    rng = random.Random(SEED + 1)
    print(f"seed {SEED + 1}")
    for s in range(1, 400):
        r = _rand_record(rng, s)
        (w,) = decode_wire_records(F.encode_records([r]))
        assert w.blocks() == [(doff, n) for _, doff, n in data_blocks(r)]


def _journal_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.suffix == ".seg"}


def test_clear_journal_from_wire_records_is_byte_identical(tmp_path: Path):
    rng = random.Random(SEED + 2)
    print(f"seed {SEED + 2}")
    batches = rand_batches(rng, 30, per=4)
    a, b = tmp_path / "a", tmp_path / "b"
    with Journal.open(a, keyring=None, segment_size=40000) as ja, Journal.open(b, keyring=None,
                                                                               segment_size=40000) as jb:
        for meta, recs in batches:
            ra = ja.append_batch(meta, recs)
            rb = jb.append_batch(meta, decode_wire_records(F.encode_records(recs)))
            assert (ra.applied, ra.last_seq, ra.known, ra.batch) == (rb.applied, rb.last_seq, rb.known, rb.batch)
        assert list(ja.records()) == list(jb.records())
    assert _journal_bytes(a) == _journal_bytes(b) and len(_journal_bytes(a)) > 1


def test_sealed_journal_from_wire_records_reads_back(tmp_path: Path):
    rng = random.Random(SEED + 3)
    print(f"seed {SEED + 3}")
    data = tmp_path / "data"
    from nicsplit.core.layout import Layout  # the data directory's keyring seals the journal
    lay = Layout(data)
    lay.journals.mkdir(parents=True)
    atrest.ensure(lay.keyring, True)
    batches = rand_batches(rng, 20, per=5)
    with Journal.open(lay.journal("k")) as j:
        for meta, recs in batches:
            assert j.append_batch(meta, decode_wire_records(F.encode_records(recs)), sync=False).applied
        j.sync()
        assert j.key_ids() and 0 not in j.key_ids()
    with Journal.open(lay.journal("k"), readonly=True) as j:
        got = list(j.records())
    want = [r for _, recs in batches for r in recs]
    assert [r for r, _ in got] == want
    assert [p for _, p in got] == [r.data if r.op == Op.WRITE else b"" for r in want]


def test_wire_batch_checks_still_apply(tmp_path: Path):
    with Journal.open(tmp_path / "j", keyring=None) as j:
        w = wire_records([F.Record(2, 2, 1, Op.WRITE, 0, 0, 4096, 5, bytes(4096)),
                          F.Record(1, 1, 1, Op.WRITE, 0, 0, 4096, 5, bytes(4096))])
        with pytest.raises(BatchRejected, match="out of order"):
            j.append_batch(Meta(1, 1, 2, 5, 5), w)
        ref = wire_records([F.Record(1, 1, 1, Op.WRITE, 0, 0, 4096, 5, b"", ((0, b"x" * 16),))])
        with pytest.raises(BatchRejected, match="does not hold"):
            j.append_batch(Meta(1, 1, 1, 5, 5), ref)
        assert j.last_seq == 0 and j.statistics().records == 0


def test_seal_record_entries_into_equal_seal_record_entry():
    """The batch-buffer seal writes exactly the bytes of the per-record
    `seal_record_entry`, at the offset given, and nothing outside them
    (random batches: sizes, refs, ops; random segment offsets and starts)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # a throwaway key for the comparison
    from nicsplit.journal.format import ENTRY, seal_record_entries_into, seal_record_entry, sealed_entries_size
    rng = random.Random(SEED + 4)
    print(f"seed {SEED + 4}")
    for trial in range(20):
        cipher = AESGCM(rng.randbytes(32))
        recs = [_rand_record(rng, s) for s in range(1, rng.randint(1, 40))]
        wires = [w.wire for w in decode_wire_records(F.encode_records(recs))]
        nonces = rng.randbytes(12 * len(wires))
        seg_pos = rng.randrange(24, 1 << 40)
        start, tail = rng.randrange(0, 100), rng.randrange(0, 100)
        fill = rng.randrange(256)
        buf = bytearray([fill]) * (start + sealed_entries_size(wires) + tail)
        ats = seal_record_entries_into(cipher, seg_pos, wires, nonces, buf, start)
        want, pos = [], seg_pos
        for i, w in enumerate(wires):
            e = seal_record_entry(cipher, pos, bytes(w), nonces[12 * i : 12 * i + 12])
            want.append(e)
            assert ats[i] == pos, trial
            pos += len(e)
            assert len(e) == ENTRY.size + len(w) + 28
        assert bytes(buf[start : len(buf) - tail]) == b"".join(want), trial
        assert buf[:start] == bytearray([fill]) * start and buf[len(buf) - tail :] == bytearray([fill]) * tail, trial


def test_sealed_batches_larger_than_a_segment(tmp_path: Path):
    """A batch spanning segments (sealed, from WireRecords) reads back, also
    after reopening (the records are where the index says)."""
    rng = random.Random(SEED + 5)
    print(f"seed {SEED + 5}")
    from nicsplit.core.layout import Layout  # the data directory's keyring seals the journal
    lay = Layout(tmp_path / "data")
    lay.journals.mkdir(parents=True)
    atrest.ensure(lay.keyring, True)
    batches = rand_batches(rng, 12, per=9)
    with Journal.open(lay.journal("k"), segment_size=20000) as j:
        for meta, recs in batches:
            assert j.append_batch(meta, decode_wire_records(F.encode_records(recs))).applied
        assert j.statistics().segments > 3
    want = [r for _, recs in batches for r in recs]
    for _ in range(2):
        with Journal.open(lay.journal("k"), segment_size=20000) as j:
            got = list(j.records())
            assert [r for r, _ in got] == want
            for r in want:
                if r.op == Op.WRITE:
                    assert j.read_block(F.fingerprint(r.data[:4096])) == r.data[:4096]
