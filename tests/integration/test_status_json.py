"""``nicsplit status`` with nothing running: the JSON still conforms to the
documented schema (every key, null where a process would say), the card and
the appliance are down (alerts), and the human output is tables without a TTY."""

from __future__ import annotations

import json

from nicsplit.control.schema import check
from nicsplit.testing.datadir import init_data
from nicsplit.testing.procs import run_cli


def test_status_json_conforms_with_every_process_down(tmp_path):
    data = init_data(tmp_path / "data")
    run_cli(data, "cg", "create", "cg1")
    run_cli(data, "vdisk", "create", "a", "--size", "16M", "--cg", "cg1")
    doc = json.loads(run_cli(data, "status", "--json").stdout)
    assert check(doc) == [], check(doc)
    (cg,) = doc["cgs"]
    assert cg["state"] == "host-down" and cg["rpo_bytes"] is None and cg["throughput"]["in_bytes_per_s"] is None
    assert cg["last_bookmark"] is None and cg["journal_bytes"] is None and cg["split_latency_us"] == {"p50": None, "p99": None}
    assert doc["card"] == {"hidden_volume_fill": None, "overflow_fill": None, "overflow_bytes": None}
    assert {a["name"] for a in doc["alerts"]} == {"card_down", "appliance_down"}
    assert all(p == {"pid": None, "answering": False} for p in doc["processes"].values()), doc["processes"]
    text = run_cli(data, "status").stdout  # a pipe: no TTY
    for fragment in ("Consistency groups", "cg1", "host-down", "Vdisks", "card: not answering", "Processes",
                     "card_down", "appliance_down"):
        assert fragment in text, (fragment, text)
    assert "\x1b[" not in text  # no colour codes without a terminal


def test_a_bad_alerts_setting_is_one_clear_line(tmp_path):
    data = init_data(tmp_path / "data", sections={"alerts": {"rpo_target": "soon"}})
    p = run_cli(data, "status", check=False)
    assert p.returncode != 0 and "rpo_target" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
