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
