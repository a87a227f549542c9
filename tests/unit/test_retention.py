"""Retention policy: PIT thinning and the trim plan (pure functions), checked
against a brute-force model over seeded random journals."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nicsplit.journal.writer import SegmentInfo
from nicsplit.recovery.retention import HOUR_NS, Policy, RetentionError, parse_duration, plan_trim, thin

S = 10**9
NOW = 1_800_000_000 * S


def test_parse_duration_and_config():
    assert [parse_duration(v, "x") for v in ("90s", "15m", "24h", "7d", "2w", 30, "1.5h")] == \
        [90, 900, 86400, 7 * 86400, 14 * 86400, 30, 5400]
    for bad in ("-1h", "1y", "h", ""):
        with pytest.raises(RetentionError, match="bad duration"):
            parse_duration(bad, "[retention] keep_all")
    p = Policy.from_config({"keep_all": "1h", "keep_hourly": "2d", "max_journal_size": "10G", "interval": "5s"})
    assert p == Policy(3600, 2 * 86400, 10 << 30, 5)
    assert Policy.from_config(None) == Policy()
    with pytest.raises(RetentionError, match="unknown setting"):
        Policy.from_config({"keep_al": "1h"})
    with pytest.raises(RetentionError, match="keep_all must be > 0"):
        Policy.from_config({"keep_all": 0})


def test_thin_keeps_all_recent_then_newest_per_hour():
    p = Policy(keep_all_s=3600, keep_hourly_s=5 * 3600)
    # one PIT every 10 minutes for 8 hours, ending now
    times = [NOW - k * 600 * S for k in range(48, -1, -1)]
    kept = thin(times, NOW, p)
    ages = [(NOW - t) / S for t in times]
    for age, t, k in zip(ages, times, kept):
        if age <= 3600:
            assert k
        elif age > 5 * 3600:
            assert not k
    band = [t for t, k, a in zip(times, kept, ages) if k and 3600 < a <= 5 * 3600]
    hours = [t // HOUR_NS for t in band]
    assert len(hours) == len(set(hours))  # at most one per clock hour
    for t in band:  # and it is the newest PIT of its hour inside the band
        same = [u for u, a in zip(times, ages) if u // HOUR_NS == t // HOUR_NS and 3600 < a <= 5 * 3600]
        assert t == max(same)
    # a pinned (bookmarked) PIT is offered whatever its age
    pinned = [i == 0 for i in range(len(times))]
    assert thin(times, NOW, p, pinned)[0] and not kept[0]


def _model(segs, now, policy, base, locked):
    """Brute force: the longest prefix (not the last segment) every member of
    which is expired or needed for the size limit, and under every lock."""
    floor = min(locked) if locked else None
    best = []
    for n in range(len(segs)):
        prefix = segs[:n]
        ok = True
        total = sum(s.size for s in segs)
        for s in prefix:
            too_old = s.last_seq > 0 and s.t_last_ns < now - int(policy.max_age_s * 1e9)
            too_big = policy.max_journal_bytes > 0 and total > policy.max_journal_bytes
            if not (too_old or too_big) or (floor is not None and s.last_seq >= floor):
                ok = False
                break
            total -= s.size
        if ok:
            best = prefix
    return [s.number for s in best]


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32), st.integers(1, 12), st.booleans(), st.booleans())
def test_plan_trim_matches_the_model(seed, nseg, sized, locked):
    rng = random.Random(seed)
    seq, t = 0, NOW - 10 * 86400 * S
    segs = []
    for n in range(1, nseg + 1):
        seq += rng.randint(1, 50)
        t += rng.randint(0, 3 * 86400) * S
        segs.append(SegmentInfo(n, seq, min(t, NOW), rng.randint(1, 64) << 20))
    policy = Policy(keep_all_s=86400, keep_hourly_s=rng.choice([0, 2 * 86400, 7 * 86400]),
                    max_journal_bytes=(rng.randint(1, 256) << 20) if sized else 0)
    locks = [rng.randint(1, seq)] if locked else []
    plan = plan_trim(segs, NOW, policy, locked_seqs=locks)
    assert plan.trim == _model(segs, NOW, policy, 0, locks), (seed, policy, locks)
    assert segs[-1].number not in plan.trim  # never the segment being written
    assert plan.base_seq == (segs[len(plan.trim) - 1].last_seq if plan.trim else 0)
    if locks:
        assert plan.base_seq < locks[0]  # the locked PIT stays listed and reachable
    remaining = sum(s.size for s in segs if s.number not in plan.trim)
    if policy.max_journal_bytes and remaining > policy.max_journal_bytes:
        assert plan.blocked_by, "over the size limit without saying why"


def test_locked_bookmark_blocks_the_size_limit_and_says_so():
    segs = [SegmentInfo(n, n * 10, NOW - (10 - n) * S, 64 << 20) for n in range(1, 6)]
    p = Policy(keep_all_s=86400, keep_hourly_s=0, max_journal_bytes=64 << 20)
    plan = plan_trim(segs, NOW, p, locked_seqs=[25])
    assert plan.trim == [1, 2] and plan.base_seq == 20 and "pinned point in time (seq 25" in plan.blocked_by
    assert plan_trim(segs, NOW, p).trim == [1, 2, 3, 4]


def test_rules_5_and_6_cut_the_prefix_back():
    old = NOW - 30 * 86400 * S
    p = Policy(keep_all_s=86400, keep_hourly_s=0)
    segs = [SegmentInfo(1, 10, old, 1, ends_batch=False), SegmentInfo(2, 20, old, 1), SegmentInfo(3, 30, old, 1),
            SegmentInfo(4, 40, NOW, 1)]
    assert plan_trim(segs, NOW, p).trim == [1, 2, 3]
    # segments 1 and 2 hold one batch: they go together or not at all
    assert plan_trim(segs, NOW, p, locked_seqs=[15]).trim == []
    # the card may still reference blocks appended within min_age
    young = [SegmentInfo(1, 10, old, 1), SegmentInfo(2, 20, old, 1, appended_ns=NOW - 60 * S), segs[3]]
    assert plan_trim(young, NOW, p, min_age_s=600).trim == [1]
    assert plan_trim(young, NOW, p, min_age_s=30).trim == [1, 2]
    # with a size limit the reason is said
    sized = Policy(keep_all_s=86400, keep_hourly_s=0, max_journal_bytes=1)
    assert plan_trim(young, NOW, sized, min_age_s=600).blocked_by == "the card may still reference its blocks (dedup horizon)"
