"""At-rest encryption of the journal (docs/journal.md §7): sealed records
round-trip through every reader, no plaintext on disk, tampering detected,
key rotation and retirement, missing keys, journals written in clear before
encryption was turned on, the keyring file and the CLI."""

from __future__ import annotations

import json
import os
import random
import struct
import zlib
from pathlib import Path

import pytest

from nicsplit.testing.workload import BS, T0, Meta, Workload, check_after_cut, golden_at, rand_batches, sd_block

from nicsplit.storage import atrest
from nicsplit.journal.format import SEALED_OVERHEAD, JournalCorrupt, JournalError
from nicsplit.journal.reader import SegmentReader, segment_key_ids
from nicsplit.journal.writer import Journal
from nicsplit.recovery.pits import PitIndex
from nicsplit.recovery.blockindex import BlockIndex
from nicsplit.recovery.reader import PitReader
from nicsplit.testing.appliance import CrashFilesystem
from nicsplit.core.records import Op
from nicsplit.wire.frames import RECORD_HEAD_SIZE, Record

# A plaintext no cipher output would contain: 4 KiB of a repeated marker.
PATTERN = (b"NICSPLIT-PLAINTEXT-MARKER:" * 200)[:BS]


def layout(tmp_path: Path) -> tuple[Path, Path]:
    """(journal dir, keyring path) laid out like a data directory, so the
    journal finds its keyring itself (keyring=AUTO)."""
    data = tmp_path / "data"
    return data / "appliance" / "journal" / "cg1", atrest.keyring_path(data)


def entries(seg: Path) -> list[tuple[int, int, int]]:
    """(offset, size, tag) of every entry of a segment file."""
    raw = seg.read_bytes()
    out, pos = [], 24
    while pos + 12 <= len(raw):
        size, tag = struct.unpack_from(">IB", raw, pos)
        out.append((pos, size, tag))
        pos += 12 + size
    return out


def recrc(raw: bytearray, pos: int) -> None:
    """Make the entry at ``pos`` pass its CRC again (a deliberate tamperer)."""
    size = struct.unpack_from(">I", raw, pos)[0]
    raw[pos + 8 : pos + 12] = struct.pack(">I", zlib.crc32(raw[pos + 12 : pos + 12 + size], zlib.crc32(raw[pos : pos + 8])))


def test_round_trip_every_reader(tmp_path: Path, seed: int):
    jd, krp = layout(tmp_path)
    kr = atrest.Keyring.create(krp)
    assert krp.stat().st_mode & 0o777 == 0o600 and kr.active == 1
    w = Workload.generate(seed, nbatches=30)
    w.write_journal(jd, segment_size=16 << 10)
    segs = sorted(jd.glob("*.seg"))
    assert len(segs) > 3
    for s in segs:  # version 2, flags 1, key id 1
        assert s.read_bytes()[4:8] == b"\x00\x02\x00\x01" and s.read_bytes()[16:20] == b"\x00\x00\x00\x01"
    assert segment_key_ids(jd) == ({1: len(segs)}, [])
    want = [(r.seq, r) for _, recs in w.batches for r in recs]
    with Journal.open(jd, readonly=True) as j:  # decrypts and fingerprints every block at open
        assert [r for r in j.iter_records()] == [r for _, r in want]
        assert j.key_ids() == {1: len(segs)}
        ledger = {s: data for s, vid, op, off, ln, data in w.ledger if op == Op.WRITE}
        for rec, payload in j.records():  # references resolved through decrypted records
            assert payload == (ledger[rec.seq] if rec.op == Op.WRITE else b"")
    # the keyless scanner indexes sealed segments (record heads are in clear)
    idx = BlockIndex(jd)
    assert idx.pits.list_pits() == w.expected_pits() and not idx.pits.damage
    # PitReader (SegmentReader + a read-only Journal for references) at every PIT
    for seq, _ in list(w.goldens())[::3]:
        want_img = golden_at(w, seq)
        with PitReader(jd, w.vdisks, seq, index=idx) as r:
            for v in w.vdisks:
                assert r.pread(v.id, 0, v.size) == want_img[v.id]
    # the writer reopens, goes on in the last segment (same key) and reads back
    more = Workload.generate(seed, nbatches=40)
    with Journal.open(jd, segment_size=1 << 20) as j:
        nsegs = len(list(jd.glob("*.seg")))
        for meta, recs in more.batches[30:31]:
            j.append_batch(meta, recs)
        assert len(list(jd.glob("*.seg"))) == nsegs  # no new segment just for reopening
        assert [r.seq for r in j.iter_records()][-len(more.batches[30][1]):] == [r.seq for r in more.batches[30][1]]


def test_no_plaintext_on_disk_and_unique_nonces(tmp_path: Path):
    jd, krp = layout(tmp_path)
    atrest.Keyring.create(krp)
    clear = tmp_path / "clear" / "j"
    recs = [Record(s, s, 1, Op.WRITE, 0, s * BS, BS, T0 + s, PATTERN[:-8] + s.to_bytes(8, "big")) for s in range(1, 41)]
    for d in (jd, clear):
        with Journal.open(d, segment_size=32 << 10) as j:
            for k in range(0, 40, 5):
                j.append_batch(Meta(k + 1, k + 1, k + 5, T0, T0), recs[k : k + 5])
    assert any(PATTERN[:64] in s.read_bytes() for s in clear.glob("*.seg"))  # the check can see it
    nonces = []
    for s in sorted(jd.glob("*.seg")):
        raw = s.read_bytes()
        assert PATTERN[:64] not in raw and PATTERN[1000:1032] not in raw
        for pos, size, tag in entries(s):
            if tag == 1:
                assert size == RECORD_HEAD_SIZE + BS + SEALED_OVERHEAD
                nonces.append(raw[pos + 12 + RECORD_HEAD_SIZE : pos + 12 + RECORD_HEAD_SIZE + 12])
    assert len(nonces) == 40 and len(set(nonces)) == 40
    with Journal.open(jd, readonly=True) as j:
        assert [p for _, p in j.records()] == [r.data for r in recs]


def _sealed_journal(tmp_path: Path) -> tuple[Path, list[Record]]:
    jd, krp = layout(tmp_path)
    atrest.Keyring.create(krp)
    recs = [Record(s, s, 1, Op.WRITE, 0, s * BS, BS, T0 + s, sd_block(1, s, s)) for s in range(1, 7)]
    with Journal.open(jd) as j:
        for k in range(0, 6, 2):
            j.append_batch(Meta(k + 1, k + 1, k + 2, T0 + k + 1, T0 + k + 2), recs[k : k + 2])
    return jd, recs


def test_flipped_ciphertext_byte_is_a_damaged_record(tmp_path: Path):
    """Without a fixed CRC (bit rot): the keyless scanner sees the damage and
    marks the PITs from there on unusable; the writer refuses to open."""
    jd, recs = _sealed_journal(tmp_path)
    seg = jd / "00000001.seg"
    raw = bytearray(seg.read_bytes())
    pos3 = [p for p, _, tag in entries(seg) if tag == 1][2]  # record seq 3 (second batch)
    raw[pos3 + 12 + RECORD_HEAD_SIZE + 12 + 100] ^= 0x01
    seg.write_bytes(raw)
    idx = PitIndex(jd)
    assert [(p.seq, p.usable) for p in idx.list_pits()] == [(2, True), (4, False), (6, False)]
    [d] = idx.damage
    assert (d.segment, d.offset, d.first_seq, d.last_seq, d.why) == (1, pos3, 3, 4, "entry CRC mismatch")
    with pytest.raises(JournalCorrupt, match="entry CRC mismatch"):
        Journal.open(jd)


def test_tampering_with_a_matching_crc_fails_authentication(tmp_path: Path):
    """A deliberate change that also fixes the entry CRC: caught by GCM when
    the record is read (ciphertext, clear record head = associated data)."""
    jd, recs = _sealed_journal(tmp_path)
    seg = jd / "00000001.seg"
    clean = seg.read_bytes()
    pos3 = [p for p, _, tag in entries(seg) if tag == 1][2]
    for where in (12 + RECORD_HEAD_SIZE + 12 + 100,  # ciphertext
                  12 + 40,  # the record head's offset field (clear, authenticated)
                  12 + RECORD_HEAD_SIZE + 3):  # the nonce
        raw = bytearray(clean)
        raw[pos3 + where] ^= 0x01
        recrc(raw, pos3)
        seg.write_bytes(raw)
        with pytest.raises(JournalCorrupt, match="offset %d: record fails authentication" % pos3):
            Journal.open(jd)
        with Journal.open(jd, readonly=True, stop_at_damage=True) as j:
            assert "fails authentication" in j.damage and j.last_seq == 2
            assert [p for _, p in j.records()] == [r.data for r in recs[:2]]
        with pytest.raises(JournalCorrupt, match="fails authentication"):
            SegmentReader(jd).read_record(1, pos3)
        idx = BlockIndex(jd)
        with PitReader(jd, [type("V", (), {"id": 1, "name": "a", "size": 8 * BS})()], 4, index=idx) as r:
            r.pread(1, 0, 3 * BS)  # blocks of seqs 1, 2 read fine
            with pytest.raises(JournalCorrupt, match="fails authentication"):
                r.pread(1, 3 * BS, BS)
    # an entry moved elsewhere (swap two sealed records, CRCs intact): the offset is authenticated
    raw = bytearray(clean)
    p1, p2 = [p for p, _, tag in entries(seg) if tag == 1][:2]
    n = p2 - p1
    assert raw[p2 : p2 + 12][:4] == raw[p1 : p1 + 12][:4]  # same size: swappable
    a, b = bytes(raw[p1 : p1 + n]), bytes(raw[p2 : p2 + n])
    raw[p1 : p1 + n], raw[p2 : p2 + n] = b, a
    seg.write_bytes(raw)
    with pytest.raises(JournalCorrupt, match="fails authentication"):
        SegmentReader(jd).read_record(1, p1)


def test_rotation_old_and_new_keys_and_retirement(tmp_path: Path):
    jd, krp = layout(tmp_path)
    atrest.Keyring.create(krp)
    w = Workload.generate(11, nbatches=30)
    with Journal.open(jd, segment_size=8 << 10) as j:
        for meta, recs in w.batches[:15]:
            j.append_batch(meta, recs)
        assert set(j.key_ids()) == {1}
        assert atrest.rotate(krp) == (2, 1)
        # the running writer picks the new key at its next segment
        for meta, recs in w.batches[15:]:
            j.append_batch(meta, recs)
        ids = j.key_ids()
    assert set(ids) == {1, 2} and ids[2] >= 2
    use, bad = segment_key_ids(jd)
    assert use == ids and bad == []
    keys = [int.from_bytes(s.read_bytes()[16:20], "big") for s in sorted(jd.glob("*.seg"))]
    assert keys == sorted(keys)  # key 1 segments, then key 2 ones
    with Journal.open(jd, readonly=True) as j:
        assert [r for r in j.iter_records()] == [r for _, recs in w.batches for r in recs]
    idx = BlockIndex(jd)
    last = w.batches[-1][0].last_seq
    with PitReader(jd, w.vdisks, last, index=idx) as r:
        want = golden_at(w, last)
        for v in w.vdisks:
            assert r.pread(v.id, 0, v.size) == want[v.id]
    # key 1 still encrypts segments: not retirable; neither is the active key
    with pytest.raises(atrest.AtRestError, match=r"key 1 still encrypts \d+ journal segment"):
        atrest.retire(krp, 1, use)
    with pytest.raises(atrest.AtRestError, match="key 2 is the active key"):
        atrest.retire(krp, 2, use)
    # a writer reopened after another rotation starts a new segment under key 3
    atrest.rotate(krp)
    n = len(list(jd.glob("*.seg")))
    more = Workload.generate(11, nbatches=31).batches[30]
    with Journal.open(jd, segment_size=8 << 10) as j:
        j.append_batch(*more)
    segs = sorted(jd.glob("*.seg"))
    assert len(segs) > n and all(s.read_bytes()[16:20] == b"\x00\x00\x00\x03" for s in segs[n:])
    assert segs[n - 1].read_bytes()[16:20] == b"\x00\x00\x00\x02"
    # once no segment uses key 1 (retention removed them: here, by hand), it retires; ids are not reused
    atrest.retire(krp, 1, {2: 5, 3: 1})
    assert atrest.Keyring.load(krp).ids() == [2, 3]
    assert atrest.rotate(krp) == (4, 3)


def test_missing_key_or_keyring_is_a_clear_error(tmp_path: Path):
    jd, krp = layout(tmp_path)
    atrest.Keyring.create(krp)
    w = Workload.generate(5, nbatches=8)
    w.write_journal(jd)
    doc = json.loads(krp.read_text())
    # the key lost: a keyring that holds only another key
    atrest.rotate(krp)
    doc2 = json.loads(krp.read_text())
    doc2["keys"] = [k for k in doc2["keys"] if k["id"] != 1]
    krp.write_text(json.dumps(doc2))
    msg = r"0000000\d\.seg is sealed with at-rest key 1: at-rest key 1 is not in the keyring .*at-rest\.key \(it holds 2\)"
    for open_it in (lambda: Journal.open(jd), lambda: Journal.open(jd, readonly=True),
                    lambda: SegmentReader(jd).read_record(1, 24)):
        with pytest.raises(JournalError, match=msg):
            open_it()
    idx = BlockIndex(jd)  # listing PITs needs no key
    assert len(idx.pits) == 8
    with PitReader(jd, w.vdisks, idx.pits.latest(consistent=False).seq, index=idx) as r:
        with pytest.raises(JournalError, match=msg):
            for v in w.vdisks:
                r.pread(v.id, 0, v.size)
    # no keyring at all
    krp.unlink()
    with pytest.raises(JournalError, match="sealed with at-rest key 1 and no keyring was found"):
        Journal.open(jd, readonly=True)
    # the right key back: readable again
    krp.write_text(json.dumps(doc))
    os.chmod(krp, 0o600)
    with Journal.open(jd, readonly=True) as j:
        assert j.last_seq == w.batches[-1][0].last_seq


def test_journal_written_in_clear_stays_readable(tmp_path: Path):
    """A journal from before encryption (version 1 segments): readable, and a
    writer with a keyring seals only the segments it starts."""
    jd, krp = layout(tmp_path)
    w = Workload.generate(3, nbatches=20)
    w.write_journal(jd, upto_batch=10)  # no keyring yet: version 1
    assert segment_key_ids(jd) == ({0: len(list(jd.glob("*.seg")))}, [])
    atrest.ensure(krp, True)
    w.write_journal(jd, start_batch=10)
    use, _ = segment_key_ids(jd)
    assert set(use) == {0, 1}
    with Journal.open(jd, readonly=True) as j:
        assert [r for r in j.iter_records()] == [r for _, recs in w.batches for r in recs]
    idx = BlockIndex(jd)
    assert idx.pits.list_pits() == w.expected_pits()
    for seq in (w.batches[5][0].last_seq, w.batches[-1][0].last_seq):
        with PitReader(jd, w.vdisks, seq, index=idx) as r:
            want = golden_at(w, seq)
            for v in w.vdisks:
                assert r.pread(v.id, 0, v.size) == want[v.id]
    # encryption turned off again: new segments in clear, sealed ones still read
    atrest.ensure(krp, False)
    assert atrest.Keyring.load(krp).active is None
    more = Workload.generate(3, nbatches=21).batches[20]
    with Journal.open(jd) as j:
        j.append_batch(*more)
        assert j.key_ids()[0] == use[0] + 1
        assert [r.seq for r in j.iter_records()][-1] == more[1][-1].seq


def test_keyring_file(tmp_path: Path):
    p = tmp_path / "appliance" / atrest.KEYRING_NAME
    assert atrest.ensure(p, False) is None and not p.exists()
    kr = atrest.ensure(p, True)
    assert kr.active == 1 and p.stat().st_mode & 0o777 == 0o600
    assert atrest.ensure(p, True).active == 1  # idempotent
    with pytest.raises(atrest.AtRestError, match="already exists"):
        atrest.Keyring.create(p)
    os.chmod(p, 0o644)
    with pytest.raises(atrest.AtRestError, match="accessible by group or others .mode 0644.; chmod 600"):
        atrest.Keyring.load(p)
    os.chmod(p, 0o600)
    assert kr.refresh() is False
    atrest.rotate(p)
    assert kr.refresh() is True and kr.active == 2 and kr.ids() == [1, 2]
    p.write_text("{not json")
    with pytest.raises(atrest.AtRestError, match="unreadable"):
        atrest.Keyring.load(p)


def test_power_cut_with_sealed_segments(seed: int):
    """D5 with encryption: after any cut every acknowledged batch reads back
    (decrypts) and the in-flight one is all or nothing."""

    rng = random.Random(seed)
    kr = atrest.Keyring(Path("/nonexistent/at-rest.key"), {1: atrest.Key(1, os.urandom(32), 0.0)}, 1, 2, None)
    kr.refresh = lambda: False  # an in-memory keyring: nothing to re-read
    for mode in ("drop", "tear", "keep"):
        for _ in range(8):
            fs = CrashFilesystem(fail_sync_at=rng.randint(2, 25))
            acked, inflight = [], None
            j = Journal.open(Path("/j"), fs=fs, segment_size=30000, keyring=kr)
            for meta, recs in rand_batches(rng, 12):
                try:
                    j.append_batch(meta, recs)
                except JournalError:
                    inflight = recs
                    break
                acked.append((meta, recs))
            j.close()
            fs.fail_sync_at = None
            check_after_cut(fs.power_cut(mode, rng), acked, inflight, keyring=kr)
