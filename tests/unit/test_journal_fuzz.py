"""Fuzz the journal's readers (nicsplit.journal): a valid journal with bytes
flipped, inserted or cut anywhere in one segment, then read by the
read-only scanner (`JournalScanner`), the record reader (`SegmentReader`)
and the writer's recovery (`Journal.open`, read-only, with and without
``stop_at_damage``).

Rule: each returns a prefix of what was committed (plus damage it names) or
raises the journal's errors (JournalCorrupt / JournalError) — never
IndexError, struct.error, UnicodeDecodeError or the like. Derandomized;
budgets in `nicsplit.testing.fuzz`.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from hypothesis import given, strategies as st

from nicsplit.journal.format import ENTRY, SEGMENT_HEAD, JournalError, encode_entry
from nicsplit.journal.reader import SegmentReader
from nicsplit.journal.scan import JournalScanner
from nicsplit.journal.writer import Journal
from nicsplit.storage import atrest
from nicsplit.testing.fuzz import fuzz_settings
from nicsplit.testing.workload import Workload

_PRISTINE: dict[bool, tuple[Path, list[str], list[int]]] = {}


def pristine(sealed: bool = False) -> tuple[Path, list[str], list[int]]:
    """A small valid journal, clear or sealed with the at-rest key (built once
    per session, in DATA/appliance/journal/cg1 so the keyring is found):
    its directory, its segment names and the last seq of every commit."""
    if sealed not in _PRISTINE:
        top = tempfile.mkdtemp(prefix="nicsplit-jfuzz-")
        atexit.register(shutil.rmtree, top, True)
        data = Path(top) / "data"
        d = data / "appliance" / "journal" / "cg1"
        if sealed:
            atrest.ensure(atrest.keyring_path(data), True)
        w = Workload.generate(7, nbatches=10)
        w.write_journal(d, segment_size=8 << 10)
        segs = sorted(p.name for p in d.glob("*.seg"))
        _PRISTINE[sealed] = (d, segs, [c.last_seq for c, _ in JournalScanner(d).scan()])
        assert len(segs) >= 3 and len(_PRISTINE[sealed][2]) == 10
    return _PRISTINE[sealed]


damage_ops = st.lists(st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
                                st.integers(0, 1 << 20), st.binary(min_size=1, max_size=8)),
                      min_size=1, max_size=4)


def damaged_copy(top: Path, seg_index: int, ops, sealed: bool = False) -> Path:
    """Copy the pristine data directory under ``top``, damage one segment;
    returns the copy's journal directory."""
    src, segs, _ = pristine(sealed)
    data = src.parent.parent.parent
    shutil.copytree(data, top / "data")
    dst = top / "data" / src.relative_to(data)
    p = dst / segs[seg_index % len(segs)]
    b = bytearray(p.read_bytes())
    for op, at, blob in ops:
        at %= len(b) + 1
        if op == "flip" and b:
            b[min(at, len(b) - 1)] ^= 1 << (blob[0] % 8)
        elif op == "set":
            b[at:at + len(blob)] = blob
        elif op == "insert":
            b[at:at] = blob
        elif op == "delete":
            del b[at:at + len(blob) * 37]
        else:
            del b[at:]
    p.write_bytes(bytes(b))
    return dst


def read_everything(d: Path) -> list[int]:
    """What a PIT reader does: scan, then read every record listed. Returns
    the last seqs of the commits before the first damage."""
    sc = JournalScanner(d)
    got = list(sc.scan())
    seqs = []
    for commit, _ in got:
        if commit.damage is not None:
            break
        seqs.append(commit.last_seq)
    r = SegmentReader(d)  # the data directory's keyring, if any
    try:
        for commit, heads in got:
            for h in heads:
                try:
                    rec = r.read_record(h.segment, h.pos)
                    assert rec.seq == h.seq
                except JournalError:  # CRC'd heads, damaged payload: named, not raised raw
                    pass
    finally:
        r.close()
    return seqs


@fuzz_settings(40)
@given(st.integers(0, 100), damage_ops, st.booleans())
def test_damaged_segment_reads_as_a_prefix_or_a_journal_error(seg_index, ops, sealed):
    _, _, committed = pristine(sealed)
    with tempfile.TemporaryDirectory() as t:
        d = damaged_copy(Path(t), seg_index, ops, sealed)
        seqs = read_everything(d)
        assert seqs == committed[:len(seqs)], "the scanner must hand out a prefix of what was committed"
        for kw in ({}, {"stop_at_damage": True}):
            try:
                with Journal.open(d, readonly=True, **kw) as j:
                    assert j.last_seq in [0, *committed] or kw
            except JournalError:
                pass


def _entries(b: bytes) -> list[tuple[int, int, int]]:
    """(offset, tag, size) of every entry of a valid segment."""
    out, pos = [], SEGMENT_HEAD.size
    while pos + ENTRY.size <= len(b):
        size, tag, _, _ = ENTRY.unpack_from(b, pos)
        out.append((pos, tag, size))
        pos += ENTRY.size + size
    return out


@fuzz_settings(60)
@given(st.integers(0, 100), st.integers(0, 1000),
       st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=4),
       st.integers(0, 60), st.booleans())
def test_entry_altered_with_a_matching_crc_is_refused_by_name(seg_index, entry_index, flips, chop, sealed):
    """Damage the CRC cannot see (content altered and the CRC recomputed,
    the payload possibly shortened): the record decoders behind the CRC must
    still answer with JournalCorrupt, never a raw decoding error."""
    _, segs, committed = pristine(sealed)
    with tempfile.TemporaryDirectory() as t:
        d = damaged_copy(Path(t), seg_index, [], sealed)
        p = d / segs[seg_index % len(segs)]
        b = bytearray(p.read_bytes())
        pos, tag, size = _entries(bytes(b))[entry_index % len(_entries(bytes(b)))]
        payload = bytearray(b[pos + ENTRY.size:pos + ENTRY.size + size])
        for at, val in flips:
            if payload:
                payload[at % len(payload)] = val
        del payload[max(0, len(payload) - chop):]
        b[pos:pos + ENTRY.size + size] = encode_entry(tag, bytes(payload))
        p.write_bytes(bytes(b))
        seqs = read_everything(d)
        # A clear COMMIT altered under a recomputed CRC is undetectable (its
        # seqs may jump): only order is promised, not the prefix.
        assert seqs == sorted(set(seqs))
        for kw in ({}, {"stop_at_damage": True}):
            try:
                with Journal.open(d, readonly=True, **kw):
                    pass
            except JournalError:
                pass
