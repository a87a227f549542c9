"""The console's metrics, history and dashboard files over real HTTP (curl)
on ``nicsplit console run`` (issue 13 items 3 and 5): /metrics needs no
token and parses with prometheus_client's parser, naming the running host
and its vdisks' split-latency histograms; /api/v1/history needs the token
and fills every interval; / and its static files are served with a CSP."""

from __future__ import annotations

from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from nicsplit.testing.console import ConsoleProcess, api_token, curl, curl_json
from nicsplit.testing.datadir import init_data
from nicsplit.testing.procs import HostProcess, run_cli, wait_for


def _families(base: str) -> dict:
    status, body, headers = curl(f"{base}/metrics")
    assert status == 200, body
    assert headers.get("content-type", "").startswith("text/plain; version="), headers
    return {f.name: f for f in text_string_to_metric_families(body)}


def _sample(fams: dict, name: str, **labels: str) -> float:
    (v,) = [s.value for s in fams[name].samples if s.name == name and all(s.labels.get(k) == x for k, x in labels.items())]
    return v


def test_metrics_history_and_dashboard_over_http(tmp_path):
    data = init_data(tmp_path / "data", filters=["stats", "split"], sections={"console": {"history_interval": 0.5}})
    run_cli(data, "cg", "create", "cg1")
    run_cli(data, "vdisk", "create", "a", "--size", "4M", "--cg", "cg1")
    token = api_token(data)
    with ConsoleProcess(data) as console:
        base = console.base
        fams = _families(base)
        assert _sample(fams, "nicsplit_status_ok") == 1
        assert _sample(fams, "nicsplit_up", process="console") == 1  # it answered
        assert _sample(fams, "nicsplit_up", process="host") == 0
        assert _sample(fams, "nicsplit_cg_state", cg="cg1", state="host-down") == 1
        assert _sample(fams, "nicsplit_cg_state", cg="cg1", state="protected") == 0
        assert "nicsplit_split_latency_seconds" not in fams  # no host, no histogram
        # What Prometheus itself asks for: OpenMetrics, which its own parser reads.
        status, body, headers = curl(f"{base}/metrics", "-H", "Accept: application/openmetrics-text; version=1.0.0")
        assert status == 200 and headers["content-type"].startswith("application/openmetrics-text"), headers
        om = {f.name: f for f in openmetrics_families(body)}
        assert body.endswith("# EOF\n") and set(om) == set(fams)

        with HostProcess(data):
            def host_seen():
                f = _families(base)
                return f if _sample(f, "nicsplit_up", process="host") == 1 else None

            fams = wait_for(host_seen, 30, "/metrics to see the host", interval=0.3)
            assert _sample(fams, "nicsplit_cg_state", cg="cg1", state="host-down") == 0
            hist = fams["nicsplit_split_latency_seconds"]
            assert hist.type == "histogram"
            les = [s.labels["le"] for s in hist.samples if s.name.endswith("_bucket") and s.labels["vdisk"] == "a"]
            assert les[-1] == "+Inf" and len(les) > 10 and [float(x) for x in les] == sorted(float(x) for x in les)

        # History: the token is required, samples accumulate, since= cuts.
        assert curl(f"{base}/api/v1/history?cg=cg1")[0] == 401
        assert curl(f"{base}/api/v1/history?cg=cg1", token="0" * 64)[0] == 401
        doc = wait_for(lambda: (d := curl_json(f"{base}/api/v1/history?cg=cg1", token=token)) and len(d["samples"]) >= 3 and d,
                       30, "three history samples", interval=0.3)
        assert doc["interval"] == 0.5 and doc["cg"] == "cg1"
        ts = [p["t"] for p in doc["samples"]]
        assert ts == sorted(ts) and {"state", "rpo_seconds", "writes_per_s", "in_bytes_per_s"} <= set(doc["samples"][0])
        newer = curl_json(f"{base}/api/v1/history?cg=cg1&since={ts[-2]}", token=token)["samples"]
        assert newer and all(p["t"] > ts[-2] for p in newer)
        assert "cg1" in curl_json(f"{base}/api/v1/history", token=token)["cgs"]
        assert curl(f"{base}/api/v1/history?cg=nope", token=token)[0] == 404
        status, body, _ = curl(f"{base}/api/v1/history?since=yesterday", token=token)
        assert status == 400 and "since" in body

        # The dashboard: no token needed for the page, which holds no data.
        status, body, headers = curl(f"{base}/")
        assert status == 200 and headers["content-type"].startswith("text/html") and 'id="login"' in body
        assert "script-src 'self'" in headers["content-security-policy"]
        for f, kind in (("app.js", "javascript"), ("style.css", "text/css")):
            status, _, headers = curl(f"{base}/static/{f}")
            assert status == 200 and kind in headers["content-type"], (f, headers)
        assert curl(f"{base}/static/../nicsplit.toml")[0] == 404
