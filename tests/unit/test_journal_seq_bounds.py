"""Issue 11: a wild seq is refused, not journaled (it would make every later
real write a duplicate); ordinary gaps stay accepted."""

from __future__ import annotations

from pathlib import Path

import pytest

from nicsplit.journal.writer import BatchRejected, Journal
from nicsplit.testing.workload import batch, write

pytestmark = pytest.mark.unit


def test_wild_seq_is_refused_and_later_writes_are_journaled(tmp_path: Path):
    with Journal.open(tmp_path / "j") as j:
        j.append_batch(batch(1, [write(1, b"a")]), [write(1, b"a")])
        with pytest.raises(BatchRejected, match=r"seqs 4611686018427387904\.\.4611686018427387904 .* past the "
                                                r"journal's last seq 1|above the largest seq"):
            j.append_batch(batch(2, [write(1 << 62, b"x")]), [write(1 << 62, b"x")])
        far = 1 + (1 << 32) + 1  # MAX_SEQ_GAP + 1 past the last seq
        with pytest.raises(BatchRejected, match="more than 4294967296 past the journal's last seq 1"):
            j.append_batch(batch(3, [write(far, b"x")]), [write(far, b"x")])
        assert j.last_seq == 1
        r = j.append_batch(batch(4, [write(2, b"b")]), [write(2, b"b")])
        assert r.applied and j.last_seq == 2  # the real next write is no duplicate
        # a gap of a few host restarts (2^16 seqs each) is still a gap, accepted
        j.append_batch(batch(5, [write(2 + 3 * (1 << 16), b"c")]), [write(2 + 3 * (1 << 16), b"c")])
        assert j.statistics().gaps == 1
    with Journal.open(tmp_path / "j") as j:
        assert j.last_seq == 2 + 3 * (1 << 16)


def test_first_batch_of_a_journal_is_bounded_too(tmp_path: Path):
    with Journal.open(tmp_path / "j") as j:
        with pytest.raises(BatchRejected, match="above the largest seq a CG reaches"):
            j.append_batch(batch(1, [write(1 << 62, b"x")]), [write(1 << 62, b"x")])
        big = (1 << 48) - 5  # a CG with a long history and a fresh journal: accepted
        assert j.append_batch(batch(2, [write(big, b"y")]), [write(big, b"y")]).applied
