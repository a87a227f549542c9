"""The Prometheus metrics (issue 13 item 3): their names, types and labels
pinned, parsed back with prometheus_client's own parser; optional status
keys give samples when present and nothing when absent; the split-latency
histogram's buckets come from the host's real histogram; scrapes within a
second share one status fetch."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from nicsplit.console.metrics import CG_STATES, SPLIT_BOUNDS, VDISK_STATES, StatusCollector, families, make_registry
from nicsplit.host.filters.stats import Histogram

# name -> (type, label names): the contract dashboards and alert rules are written against.
PINNED = {
    "nicsplit_status_ok": ("gauge", set()),
    "nicsplit_up": ("gauge", {"process"}),
    "nicsplit_cg_state": ("gauge", {"cg", "state"}),
    "nicsplit_vdisk_state": ("gauge", {"cg", "vdisk", "state"}),
    "nicsplit_rpo_seconds": ("gauge", {"cg"}),
    "nicsplit_rpo_bytes": ("gauge", {"cg"}),
    "nicsplit_protection_window_seconds": ("gauge", {"cg"}),
    "nicsplit_journal_bytes": ("gauge", {"cg"}),
    "nicsplit_last_durable_seq": ("gauge", {"cg"}),
    "nicsplit_host_last_seq": ("gauge", {"cg"}),
    "nicsplit_last_bookmark_timestamp_seconds": ("gauge", {"cg"}),
    "nicsplit_compression_ratio": ("gauge", {"cg"}),
    "nicsplit_dedup_ratio": ("gauge", {"cg"}),
    "nicsplit_in_bytes": ("counter", {"cg"}),
    "nicsplit_out_bytes": ("counter", {"cg"}),
    "nicsplit_dirty_bytes": ("gauge", {"cg", "vdisk"}),
    "nicsplit_resync_progress_ratio": ("gauge", {"cg", "vdisk"}),
    "nicsplit_split_latency_seconds": ("histogram", {"cg", "vdisk"}),
    "nicsplit_hidden_volume_fill_ratio": ("gauge", set()),
    "nicsplit_overflow_fill_ratio": ("gauge", set()),
    "nicsplit_overflow_bytes": ("gauge", set()),
    "nicsplit_alert_active": ("gauge", {"name", "severity", "cg"}),
}

LATENCIES_NS = (3_000, 3_000, 40_000, 700_000, 3_000_000, 20_000_000_000)  # each > 7 % from any bound


def _hist() -> dict:
    h = Histogram()
    for ns in LATENCIES_NS:
        h.record(ns)
    return h.sparse()


def full_status() -> dict:
    return {
        "processes": {"host": {"pid": 10}, "card": {"pid": 11}, "appliance": {"pid": None}, "console": {"pid": 12}},
        "card": {"hidden_volume_fill": 0.25, "overflow_fill": 0.0, "overflow_bytes": 0},
        "alerts": [{"name": "rpo_above_target", "severity": "critical", "cg": "cg1", "message": "RPO 12 s > 5 s",
                    "value": 12.0, "threshold": 5.0}],
        "cgs": [
            {"name": "cg1", "state": "resyncing", "rpo_seconds": 12.5, "rpo_bytes": 4096, "journal_bytes": 1 << 20,
             "last_durable_seq": 90, "host_last_seq": 100, "role": "production",
             "protection_window": {"oldest_seq": 1, "oldest_time": 1.0, "seconds": 3600.0},
             "last_bookmark": {"name": "nightly", "seq": 80, "time": 1_700_000_000.0},
             "throughput": {"in_bytes_per_s": 10.0, "out_bytes_per_s": 9.0, "in_bytes_total": 1000, "out_bytes_total": 900},
             "compression_ratio": 2.5, "dedup_ratio": 1.25, "split_latency_us": {"p50": 40.0, "p99": 700.0},
             "vdisks": [
                 {"name": "a", "state": "resyncing", "dirty_bytes": 65536, "reason": "card was down", "since": 1.0,
                  "resync": {"done_bytes": 1, "total_bytes": 4, "percent": 25.0, "rate_mib_s": 1.0, "eta_s": 3.0}},
                 {"name": "b", "state": "protected", "dirty_bytes": 0, "reason": "", "since": None},
             ]},
            {"name": "cg2", "state": "marking", "rpo_seconds": None, "last_durable_seq": None, "host_last_seq": None,
             "protection_window": None, "vdisks": [{"name": "c", "state": "marking", "dirty_bytes": 1 << 16}]},
        ],
    }


def scrape(status: dict, host: dict | None = None) -> dict:
    reg = make_registry(lambda: (status, host or {}))
    text = generate_latest(reg).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict, family: str, sample: str | None = None, **labels: str) -> float:
    hits = [s.value for s in fams[family].samples
            if s.name == (sample or family) and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(hits) == 1, (family, labels, fams[family].samples)
    return hits[0]


def test_metric_names_types_and_labels_are_pinned():
    fams = scrape(full_status(), {"a": {"split_hist": _hist()}, "b": {"split_hist": Histogram().sparse()}})
    assert set(fams) == set(PINNED)
    for name, (kind, labels) in PINNED.items():
        f = fams[name]
        assert f.type == kind, name
        for s in f.samples:
            assert set(s.labels) - {"le"} == labels, (name, s)
            assert s.name.startswith(name), s
    # Prometheus conventions: a counter's samples end in _total, units are base units.
    assert {s.name for s in fams["nicsplit_in_bytes"].samples} == {"nicsplit_in_bytes_total"}
    assert all("_ms" not in n and "_us" not in n for n in fams)


def test_values_follow_the_status_document():
    fams = scrape(full_status())
    assert value(fams, "nicsplit_status_ok") == 1
    assert value(fams, "nicsplit_up", process="host") == 1 and value(fams, "nicsplit_up", process="appliance") == 0
    for s in CG_STATES:
        assert value(fams, "nicsplit_cg_state", cg="cg1", state=s) == (s == "resyncing")
        assert value(fams, "nicsplit_cg_state", cg="cg2", state=s) == (s == "marking")
    for s in VDISK_STATES:
        assert value(fams, "nicsplit_vdisk_state", cg="cg1", vdisk="b", state=s) == (s == "protected")
    assert value(fams, "nicsplit_rpo_seconds", cg="cg1") == 12.5
    assert value(fams, "nicsplit_rpo_bytes", cg="cg1") == 4096
    assert value(fams, "nicsplit_protection_window_seconds", cg="cg1") == 3600
    assert value(fams, "nicsplit_journal_bytes", cg="cg1") == 1 << 20
    assert value(fams, "nicsplit_in_bytes", "nicsplit_in_bytes_total", cg="cg1") == 1000
    assert value(fams, "nicsplit_out_bytes", "nicsplit_out_bytes_total", cg="cg1") == 900
    assert value(fams, "nicsplit_compression_ratio", cg="cg1") == 2.5
    assert value(fams, "nicsplit_dedup_ratio", cg="cg1") == 1.25
    assert value(fams, "nicsplit_last_bookmark_timestamp_seconds", cg="cg1") == 1_700_000_000
    assert value(fams, "nicsplit_hidden_volume_fill_ratio") == 0.25
    assert value(fams, "nicsplit_resync_progress_ratio", cg="cg1", vdisk="a") == 0.25
    assert value(fams, "nicsplit_resync_progress_ratio", cg="cg1", vdisk="b") == 1
    assert value(fams, "nicsplit_resync_progress_ratio", cg="cg2", vdisk="c") == 0  # marking: nothing copied yet
    assert value(fams, "nicsplit_dirty_bytes", cg="cg2", vdisk="c") == 1 << 16
    assert value(fams, "nicsplit_alert_active", name="rpo_above_target", severity="critical", cg="cg1") == 1
    # cg2's unknown RPO and window give no sample (absent is "unknown"), not 0.
    assert not [s for s in fams["nicsplit_rpo_seconds"].samples if s.labels["cg"] == "cg2"]
    assert not [s for s in fams["nicsplit_protection_window_seconds"].samples if s.labels["cg"] == "cg2"]


def test_split_latency_histogram_has_the_hosts_buckets():
    fams = scrape(full_status(), {"a": {"split_hist": _hist()}})
    got = {s.labels["le"]: s.value for s in fams["nicsplit_split_latency_seconds"].samples
           if s.name.endswith("_bucket") and s.labels["vdisk"] == "a"}
    assert len(got) == len(SPLIT_BOUNDS) + 1
    for le, n in got.items():
        bound = float(le)
        assert n == sum(1 for ns in LATENCIES_NS if ns / 1e9 <= bound), (le, n)
    assert value(fams, "nicsplit_split_latency_seconds", "nicsplit_split_latency_seconds_count", vdisk="a") == len(LATENCIES_NS)
    total = value(fams, "nicsplit_split_latency_seconds", "nicsplit_split_latency_seconds_sum", vdisk="a")
    assert total == pytest.approx(sum(LATENCIES_NS) / 1e9)


def test_absent_optional_keys_give_no_sample_and_no_error():
    minimal = {"cgs": [{"name": "cg1", "state": "protected", "rpo_seconds": 0.0,
                        "vdisks": [{"name": "a", "state": "protected", "dirty_bytes": 0}]}],
               "processes": {"host": {"pid": 1}}}
    fams = scrape(minimal)
    assert set(fams) == {"nicsplit_status_ok", "nicsplit_up", "nicsplit_cg_state", "nicsplit_vdisk_state",
                         "nicsplit_rpo_seconds", "nicsplit_dirty_bytes", "nicsplit_resync_progress_ratio"}
    # Every process is named even when the document does not list it.
    assert {s.labels["process"] for s in fams["nicsplit_up"].samples} == {"host", "card", "appliance", "console"}
    # Odd values (strings, booleans, NaN) are skipped, never a crash.
    odd = {"cgs": [{"name": "cg1", "state": "new-state", "rpo_seconds": "soon", "journal_bytes": True,
                    "compression_ratio": float("nan"), "throughput": None, "vdisks": None}],
           "card": None, "alerts": ["not a dict"]}
    fams = scrape(odd)
    assert value(fams, "nicsplit_cg_state", cg="cg1", state="new-state") == 1  # an unknown state still shows
    assert "nicsplit_rpo_seconds" not in fams and "nicsplit_compression_ratio" not in fams
    assert names_of(families(odd)) <= set(PINNED)


def names_of(fams: list) -> set[str]:
    return {f.name for f in fams}


def test_scrapes_within_max_age_share_one_fetch_and_a_failure_is_a_metric():
    now = [100.0]
    calls = []

    def fetch():
        calls.append(now[0])
        return full_status(), {}

    c = StatusCollector(fetch, max_age=1.0, clock=lambda: now[0])
    for _ in range(5):
        list(c.collect())
    assert len(calls) == 1
    now[0] += 1.5
    list(c.collect())
    assert len(calls) == 2

    def broken():
        raise OSError("catalog unreadable")

    fams = {f.name: f for f in StatusCollector(broken).collect()}
    assert set(fams) == {"nicsplit_status_ok"} and fams["nicsplit_status_ok"].samples[0].value == 0
