"""How the two halves of shadow writes meet, counted: `HalfMatcher`.

The hold stage (`nicsplit.card.pipeline.hold`) matches a write's fake half
with its real half's ``Outcome(COMMITTED)`` for real; this only counts what
happened, for the card's statistics: pairs matched, pairs whose real half
came first (*reversed*), fake halves dropped by a FAILED outcome
(commit-only), and halves left unmatched at the timeout (*orphans*). The
io_ids of unmatched halves are kept in bounded tables, expired at the
hold's outcome timeout. Run by whichever process reads both halves: the
inline `ShadowEndpoint`, or the pipeline worker's `HandoffEndpoint` when
the acker serves the device queue (`shadow_acker.ShadowAcker`).
"""

from __future__ import annotations

import collections

__all__ = ["HalfMatcher", "MATCH_CAP"]

MATCH_CAP = 1 << 18  # unmatched io_ids remembered for the statistics (hold's max_writes is 65536)


class HalfMatcher:
    def __init__(self, timeout_ms: float) -> None:
        self.timeout_ns = int(timeout_ms * 1_000_000)
        self.fakes: collections.OrderedDict[int, int] = collections.OrderedDict()  # io_id -> arrival ns
        self.reals: collections.OrderedDict[int, int] = collections.OrderedDict()
        self.n_fake = self.n_real = self.matched = self.reversed = self.failed = 0
        self.orphan_fake = self.orphan_real = 0
        self._expire_at = 0

    def real(self, io_id: int, now: int) -> None:
        """A real half completed OK on the device queue."""
        self.n_real += 1
        if self.fakes.pop(io_id, None) is not None:
            self.matched += 1
        else:
            self.reals[io_id] = now

    def fake(self, io_id: int, now: int) -> None:
        """A fake half (a data write) taken from the ring."""
        self.n_fake += 1
        if self.reals.pop(io_id, None) is not None:
            self.matched += 1
            self.reversed += 1
        else:
            self.fakes[io_id] = now

    def outcome(self, io_id: int, committed: bool) -> None:
        """An outcome on the ring ends its write's wait: a FAILED one drops
        the fake half (commit-only); a COMMITTED one is a resync copy's,
        whose outcome the filter posts (no real half comes)."""
        if self.fakes.pop(io_id, None) is not None and not committed:
            self.failed += 1

    def expire(self, now: int) -> None:
        """Count (and forget) halves unmatched for longer than the timeout;
        at most every 100 ms."""
        if now < self._expire_at or not (self.fakes or self.reals):
            return
        self._expire_at = now + 100_000_000
        limit = now - self.timeout_ns
        self.orphan_fake += _expire(self.fakes, limit)
        self.orphan_real += _expire(self.reals, limit)

    def statistics(self) -> dict:
        return {"fake_halves": self.n_fake, "real_halves": self.n_real, "matched": self.matched,
                "reversed": self.reversed, "failed_fake": self.failed, "orphan_fake": self.orphan_fake,
                "orphan_real": self.orphan_real, "unmatched_fake": len(self.fakes),
                "unmatched_real": len(self.reals)}


def _expire(table: collections.OrderedDict[int, int], limit: int) -> int:
    n = 0
    while table:
        t = next(iter(table.values()))
        if t > limit and len(table) <= MATCH_CAP:
            break
        table.popitem(last=False)
        n += 1
    return n
