"""bench/transports.py's pure helpers (issue 12's five-way table): the
split histogram's percentile over one phase, the paired ratios against
``none``, the verdict per transport and the "not built" row. Nothing here
measures or asserts on speed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "transports.py"
_spec = importlib.util.spec_from_file_location("bench_transports", BENCH)
tb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tb)  # bench/ is not a package: load the file itself


def test_hist_delta_counts_only_the_samples_of_the_phase():
    before = {"buckets": [[1000, 50], [2000, 50]]}  # 100 samples before the phase, all ≤ 2 µs
    after = {"buckets": [[1000, 50], [2000, 50], [10000, 90], [50000, 10]]}
    assert tb.hist_delta_percentile(before, after, 50) == 10.0
    assert tb.hist_delta_percentile(before, after, 99) == 50.0
    # the cumulative histogram alone would put p50 at 2 µs
    assert tb.hist_delta_percentile(None, after, 50) == 2.0


def test_hist_delta_without_new_samples_is_none():
    h = {"buckets": [[1000, 5]]}
    assert tb.hist_delta_percentile(h, h, 50) is None
    assert tb.hist_delta_percentile(None, None, 99) is None


def test_paired_ratios_skip_rounds_missing_either_side():
    assert tb.paired_ratios([110.0, None, 300.0], [100.0, 100.0, None]) == [1.1]
    assert tb.paired_ratios([50.0], [0.0]) == []


def test_verdicts_follow_the_issue_targets():
    assert tb.verdict("none", None, None, 0) == "baseline"
    assert tb.verdict("ring", 1.10, None, 0).startswith("met")
    assert tb.verdict("nvme-pi", 1.11, None, 1000).startswith("**not met**")
    assert tb.verdict("shadow", 1.25, None, 0).startswith("met")
    assert tb.verdict("shadow", 1.35, None, 0).startswith("**not met**")
    # net: at least the round trip (2 x 0.5 ms one-way = 1000 µs) on top of none
    assert tb.verdict("net", 9.0, 1500.0, 1000.0).startswith("met")
    assert tb.verdict("net", 1.5, 400.0, 1000.0) == "**adds < RTT**"
    assert tb.verdict("ring", None, None, 0) == "–"


def test_spread_format():
    assert tb.fmt_spread([3.0, 1.0, 2.0]) == "2 (1..3)"
    assert tb.fmt_spread([None, 4.0], ".1f") == "4.0"
    assert tb.fmt_spread([None]) == "–"


def _phase(p50: float, iops: float) -> dict:
    return {"p50_us": p50, "p99_us": 2 * p50, "iops": iops, "split_p50_us": None, "split_p99_us": None,
            "marked": 0, "cg_state": "protected", "cpu_us_per_write": {"host": 20.0, "appliance": 5.0, "relay": 0.1}}


def test_table_has_ratios_against_none_and_a_not_built_row():
    doc = {"when": "2026-12-03", "commit": "abc", "machine": "2 CPUs", "loadavg_start": 1.0, "loadavg_end": 1.5,
           "rounds": 2, "qd1_s": 8, "qd16_s": 12, "size": 256, "delays_ms": [0.0, 0.5],
           "transports": ["none", "ring", "shadow"], "not_built": {"shadow": "unknown transport 'shadow'"},
           "results": {}}
    for d in (0.0, 0.5):
        doc["results"][f"none@{d}/qd1"] = [_phase(100, 0), _phase(200, 0)]
        extra = (1000, 500) if d else (0, 0)  # the link's cost in the ring's QD1 p50, round by round
        doc["results"][f"ring@{d}/qd1"] = [_phase(105 + extra[0], 0), _phase(260 + extra[1], 0)]
        for t in ("none", "ring"):
            doc["results"][f"{t}@{d}/qd16"] = [_phase(900, 5000), _phase(900, 7000)]
    md = tb.markdown(doc)
    ring = [line for line in md.splitlines() if line.startswith("| ring | 0 ms")]
    assert len(ring) == 1
    assert "1.18 (1.05..1.30)" in ring[0]  # median of the paired ratios 1.05 and 1.30
    assert "**not met**" in ring[0]
    assert "6,000 (5,000..7,000)" in ring[0]
    ring5 = [line for line in md.splitlines() if line.startswith("| ring | 0.5 ms")][0]
    assert ring5.startswith("| ring | 0.5 ms | 932 (760..1105) | 750 (500..1000) |")  # p50, then +link
    assert ring[0].startswith("| ring | 0 ms | 182 (105..260) | – |")
    assert any(line.startswith("| shadow | 0.5 ms | not built") for line in md.splitlines())
    assert "baseline" in [line for line in md.splitlines() if line.startswith("| none | 0 ms")][0]
