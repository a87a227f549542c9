"""A damaged journal for tests (docs/recovery.md §9): write a D1 workload's
journal (`make_journal`), flip one seeded byte of an entry or header in a
middle segment (`corrupt`), and say what the scanner must then report
(`expected`: the PIT list, the first damaged seq, the COMMIT it
resynchronises at)."""

from __future__ import annotations

import random
from pathlib import Path

from nicsplit.core.records import Op
from nicsplit.journal.format import ENTRY
from nicsplit.journal.scan import Commit, JournalScanner, RecordHead
from nicsplit.recovery.pits import Pit
from nicsplit.storage import atrest
from nicsplit.testing.workload import Workload
from nicsplit.wire.frames import RECORD_HEAD_SIZE


def journal_layout(jd: Path) -> tuple[list[Commit], list[RecordHead]]:
    commits, heads = [], []
    for c, recs in JournalScanner(jd).scan():
        commits.append(c)
        heads.extend(recs)
    return commits, heads


def corrupt(jd: Path, mode: str, rng: random.Random) -> tuple[int, int, Commit | None]:
    """Flip one byte of a seeded entry (or header) in a middle segment;
    returns (segment, offset of the damaged entry, the COMMIT hit if any)."""
    commits, heads = journal_layout(jd)
    segs = sorted(int(p.stem) for p in jd.glob("*.seg"))
    middle = segs[len(segs) // 3 : 2 * len(segs) // 3]
    rng.shuffle(middle)
    for s in middle:
        path = jd / f"{s:08d}.seg"
        raw = bytearray(path.read_bytes())
        hit = None
        if mode == "segment-header":
            at, where = 10, 0  # inside the segment number: the header CRC fails
        elif mode == "commit":
            cs = [c for c in commits if c.segment == s]
            if not cs:
                continue
            hit = rng.choice(cs)
            at, where = hit.pos + 12 + rng.randrange(44), hit.pos
        else:
            hs = [h for h in heads if h.segment == s and (mode != "record-data" or h.op == Op.WRITE)]
            if not hs:
                continue
            h = rng.choice(hs)
            esize = ENTRY.unpack_from(raw, h.pos)[0]
            where = h.pos
            if mode == "record-data":
                at = h.pos + ENTRY.size + RECORD_HEAD_SIZE + rng.randrange(esize - RECORD_HEAD_SIZE)
            elif mode == "record-head":
                at = h.pos + ENTRY.size + rng.randrange(RECORD_HEAD_SIZE)
            else:  # entry-size: the size now runs far past the end of the segment
                at = h.pos + 1
                assert raw[at] & 0x80 == 0
        raw[at] ^= 0x80
        path.write_bytes(raw)
        return s, where, hit
    raise AssertionError(f"no middle segment has an entry for mode {mode}")


def expected(w: Workload, jd_commits: list[Commit], bad: tuple[int, int], hit: Commit | None):
    """(PIT list, first damaged seq, the COMMIT the scanner resynchronises at)."""
    before = [c for c in jd_commits if (c.segment, c.pos) < bad]
    first = (before[-1].last_seq if before else 0) + 1
    resync = [c for c in jd_commits if (c.segment, c.pos) > bad][0]
    pits = [Pit(p.seq, p.time_ns, p.batch_id, p.consistent and p.seq != resync.last_seq, p.seq < first)
            for p in w.expected_pits() if hit is None or p.seq != hit.last_seq]
    return pits, first, resync


def make_journal(jd: Path, seed: int, sealed: bool, nbatches: int = 60, vdisks=None) -> Workload:
    if sealed:
        atrest.ensure(atrest.keyring_path(jd.parent.parent.parent), True)
    w = Workload.generate(seed, nbatches=nbatches, vdisks=vdisks)
    w.write_journal(jd, segment_size=16 << 10)
    assert len(list(jd.glob("*.seg"))) >= 6
    return w
