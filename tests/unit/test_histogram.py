"""The log-linear latency histogram: percentiles within 1/16 above exact."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from nicsplit.host.filters.stats import Histogram


@settings(max_examples=200, derandomize=True)
@given(st.lists(st.integers(min_value=0, max_value=1 << 40), min_size=1, max_size=300), st.sampled_from([50, 90, 99, 99.9, 100]))
def test_percentile_bounds(values, p):
    h = Histogram()
    for v in values:
        h.record(v)
    exact = sorted(values)[max(0, math.ceil(p / 100 * len(values)) - 1)]
    got = h.percentile(p)
    assert exact <= got <= max(exact * 17 // 16 + 1, exact)
    assert h.total == len(values) and h.max_ns == max(values)


@settings(max_examples=50, derandomize=True)
@given(st.lists(st.lists(st.integers(min_value=0, max_value=1 << 30), max_size=50), max_size=4))
def test_merged_holds_every_sample_of_its_parts(parts):
    """A CG's split latency: its vdisks' histograms together equal one fed every sample."""
    hs, whole = [], Histogram()
    for values in parts:
        h = Histogram()
        for v in values:
            h.record(v)
            whole.record(v)
        hs.append(h)
    m = Histogram.merged(hs)
    assert (m.counts, m.total, m.sum_ns, m.max_ns) == (whole.counts, whole.total, whole.sum_ns, whole.max_ns)
    assert m.percentile(99) == whole.percentile(99)


@settings(max_examples=100, derandomize=True)
@given(st.lists(st.integers(min_value=0, max_value=1 << 40), min_size=0, max_size=300))
def test_sparse_form_is_the_histogram(values):
    """What the host's status carries for /metrics: every non-empty bucket,
    ascending, each sample at or below its bucket's upper edge (by 1/16 at most)."""
    h = Histogram()
    for v in values:
        h.record(v)
    sp = h.sparse()
    uppers = [u for u, _ in sp["buckets"]]
    assert uppers == sorted(set(uppers)) and all(c > 0 for _, c in sp["buckets"])
    assert sum(c for _, c in sp["buckets"]) == sp["count"] == len(values) and sp["sum_ns"] == sum(values)
    for v in values:
        u = next(u for u in uppers if u >= v)  # the bucket it landed in
        assert u <= max(v * 17 // 16 + 1, v)
