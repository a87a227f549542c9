"""Alerts judged from crafted status documents (`nicsplit.control.alerts`),
the console's fire/clear diff, the status schema checker and the rate window."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path

import pytest
from aiohttp import web

from nicsplit.console import alerting
from nicsplit.console.alerting import AlertState
from nicsplit.control.alerts import AlertSettings, evaluate
from nicsplit.control.schema import STATUS, check
from nicsplit.core.config import Config, ConfigError
from nicsplit.core.rates import RateWindow

H = 86400.0  # the default history ([retention] keep_all = 24h)


def cfg(alerts: dict | None = None, retention: dict | None = None) -> Config:
    raw = {}
    if alerts is not None:
        raw["alerts"] = alerts
    if retention is not None:
        raw["retention"] = retention
    return Config(data=Path("/nonexistent"), raw=raw)


def vdisk(name: str = "a", state: str = "protected", dirty: int = 0) -> dict:
    return {"name": name, "state": state, "dirty_bytes": dirty, "reason": "", "since": 1.0e9, "resync": None,
            "split_latency_us": {"p50": 30.0, "p99": 90.0}}


def healthy() -> dict:
    """A document of a healthy deployment with one CG (conforms to the schema)."""
    cg = {"name": "cg1", "state": "protected", "role": "production", "rpo_seconds": 0.2, "rpo_bytes": 4096,
          "last_durable_seq": 10, "host_last_seq": 10,
          "protection_window": {"oldest_seq": 1, "oldest_time": 1.0e9, "seconds": 3600.0, "base_seq": 0},
          "journal_bytes": 1 << 20, "last_bookmark": {"name": "b1", "seq": 9, "time": 1.0e9},
          "throughput": {"in_bytes_per_s": 1000.0, "out_bytes_per_s": 500.0, "in_bytes_total": 10 << 20,
                         "out_bytes_total": 5 << 20},
          "compression_ratio": 2.0, "dedup_ratio": 1.0, "split_latency_us": {"p50": 30.0, "p99": 90.0},
          "vdisks": [vdisk()], "retention": None,
          "distribution": {"state": "off", "applied_seq": None, "durable_seq": None, "lag_records": None,
                           "lag_seconds": None, "last_error": None},
          "failover": None}
    procs = {n: {"pid": 100 + i, "answering": True} for i, n in enumerate(("host", "card", "appliance", "console"))}
    return {"cgs": [cg], "processes": procs,
            "endpoints": {"api": None, "metrics": None, "dashboard": None},
            "card": {"hidden_volume_fill": 0.01, "overflow_fill": 0.0, "overflow_bytes": 8}, "alerts": []}


def names(alerts: list[dict]) -> list[tuple[str, str, str | None]]:
    return [(a["name"], a["severity"], a["cg"]) for a in alerts]


def test_a_healthy_deployment_has_no_alert_and_every_alert_conforms():
    doc = healthy()
    assert check(doc) == []
    assert evaluate(doc, cfg()) == []
    doc["processes"]["card"] = {"pid": None, "answering": False}
    doc["cgs"][0]["rpo_seconds"] = 500.0
    doc["alerts"] = evaluate(doc, cfg())
    assert len(doc["alerts"]) == 2 and check(doc) == [], doc["alerts"]


@pytest.mark.parametrize("proc", ["card", "appliance"])
def test_a_process_that_does_not_answer_is_down(proc):
    doc = healthy()
    doc["processes"][proc]["answering"] = False
    (a,) = evaluate(doc, cfg())
    assert (a["name"], a["severity"], a["cg"]) == (f"{proc}_down", "critical", None)
    assert "does not answer" in a["message"] and str(doc["processes"][proc]["pid"]) in a["message"]
    doc["processes"][proc] = {"pid": None, "answering": False}
    assert "not running" in evaluate(doc, cfg())[0]["message"]
    doc["processes"]["host"]["answering"] = False  # the host has its own state (host-down), not an alert here
    doc["processes"][proc] = {"pid": 7, "answering": True}
    assert evaluate(doc, cfg()) == []


@pytest.mark.parametrize("rpo,expect", [(None, None), (0.0, None), (60.0, None), (60.5, "warning"),
                                        (120.0, "warning"), (120.5, "critical")])
def test_rpo_above_target(rpo, expect):
    doc = healthy()
    doc["cgs"][0]["rpo_seconds"] = rpo
    got = evaluate(doc, cfg())
    assert names(got) == ([] if expect is None else [("rpo_above_target", expect, "cg1")])
    if expect:
        assert got[0]["value"] == rpo and got[0]["threshold"] == (120.0 if expect == "critical" else 60.0)
    doc["cgs"][0]["rpo_seconds"] = 3.0
    assert names(evaluate(doc, cfg({"rpo_target": "2s"}))) == [("rpo_above_target", "warning", "cg1")]


def test_a_failed_over_cg_gets_no_cg_alerts():
    doc = healthy()
    c = doc["cgs"][0]
    c.update(role="failed-over", state="failed-over", rpo_seconds=1e6)
    c["vdisks"] = [vdisk(state="marking", dirty=1 << 20)]
    assert evaluate(doc, cfg()) == []


@pytest.mark.parametrize("fraction,base_seq,expect", [
    (0.5, 0, None),          # younger than its history, nothing cut: a fresh deployment
    (0.9, 40, None),
    (0.84, 40, "warning"),
    (0.76, 40, "warning"),
    (0.74, 40, "critical"),
])
def test_window_below_history_only_once_retention_cut(fraction, base_seq, expect):
    doc = healthy()
    doc["cgs"][0]["protection_window"].update(seconds=fraction * H, base_seq=base_seq)
    got = evaluate(doc, cfg())
    assert names(got) == ([] if expect is None else [("window_below_history", expect, "cg1")])
    if expect:
        assert got[0]["threshold"] == pytest.approx((0.75 if expect == "critical" else 0.85) * H)


def test_window_history_comes_from_alerts_history_else_keep_all():
    doc = healthy()
    doc["cgs"][0]["protection_window"].update(seconds=3000.0, base_seq=5)
    assert names(evaluate(doc, cfg(retention={"keep_all": "1h"}))) == [("window_below_history", "warning", "cg1")]
    assert names(evaluate(doc, cfg({"history": "50m"}, {"keep_all": "1h"}))) == []
    assert names(evaluate(doc, cfg({"history": "2h"}))) == [("window_below_history", "critical", "cg1")]
    doc["cgs"][0]["protection_window"] = {"error": "damaged"}
    assert evaluate(doc, cfg({"history": "2h"})) == []


def test_marking_is_critical_resync_and_initial_sync_are_warnings():
    doc = healthy()
    doc["cgs"][0]["vdisks"] = [vdisk("a", "resyncing", 1 << 20), vdisk("b", "protected")]
    (a,) = evaluate(doc, cfg())
    assert (a["name"], a["severity"], a["value"]) == ("marking", "warning", 1 << 20) and "a resyncing" in a["message"]
    doc["cgs"][0]["vdisks"] = [vdisk("a", "initializing", 1 << 20), vdisk("b", "marking", 2 << 20)]
    (a,) = evaluate(doc, cfg())
    assert (a["name"], a["severity"], a["value"]) == ("marking", "critical", 3 << 20)
    doc["cgs"][0]["vdisks"] = [vdisk("a", "lagging")]
    assert evaluate(doc, cfg()) == []


def test_journal_forecast():
    doc = healthy()
    c = doc["cgs"][0]
    c["throughput"]["in_bytes_per_s"] = 1 << 20  # 1 MiB/s: 1 GiB holds ~17 min, less than 24 h of history
    c["journal_bytes"] = 512 << 20
    assert evaluate(doc, cfg()) == []  # no size limit: no forecast
    got = evaluate(doc, cfg(retention={"max_journal_size": "1G"}))
    assert names(got) == [("journal_forecast", "warning", "cg1")]
    assert got[0]["value"] == pytest.approx(512.0) and got[0]["threshold"] == 86400.0
    assert evaluate(doc, cfg({"forecast_horizon": "5m"}, {"max_journal_size": "1G"})) == []  # 8.5 min left
    assert evaluate(doc, cfg(retention={"max_journal_size": "1T"})) == []  # 1 TiB holds 12 days at 1 MiB/s
    c["journal_bytes"] = 2 << 30
    assert evaluate(doc, cfg(retention={"max_journal_size": "1G"}))[0]["value"] == 0  # cutting already
    c["throughput"]["in_bytes_per_s"] = 0.0
    assert evaluate(doc, cfg(retention={"max_journal_size": "1G"})) == []  # no ingest, no forecast
    c["throughput"]["in_bytes_per_s"] = None
    assert evaluate(doc, cfg(retention={"max_journal_size": "1G"})) == []  # card down: unknown


@pytest.mark.parametrize("alerts,fragment", [
    ({"rpo_tagret": "1s"}, "unknown setting"),
    ({"rpo_target": "soon"}, "rpo_target"),
    ({"rpo_target": 0}, "must be > 0"),
    ({"webhook": "ftp://x"}, "http"),
    ({"interval": "-1s"}, "interval"),
])
def test_bad_alert_settings_are_one_clear_error(alerts, fragment):
    with pytest.raises(ConfigError, match=fragment):
        evaluate(healthy(), cfg(alerts))


def test_settings_defaults():
    s = AlertSettings.from_config(cfg())
    assert (s.rpo_target_s, s.history_s, s.forecast_horizon_s, s.webhook, s.interval_s, s.max_journal_bytes) == \
        (60.0, H, H, "", 2.0, 0)


def test_alert_state_fires_once_keeps_since_refires_on_severity_and_clears():
    st = AlertState()
    a = {"name": "rpo_above_target", "severity": "warning", "cg": "cg1", "message": "m", "value": 3.0, "threshold": 2.0}
    down = {"name": "card_down", "severity": "critical", "cg": None, "message": "m", "value": None, "threshold": None}
    ev = st.update([a, down], 100.0)
    assert [(e["event"], e["alert"]["name"], e["alert"]["since"]) for e in ev] == \
        [("fire", "rpo_above_target", 100.0), ("fire", "card_down", 100.0)]
    assert st.update([dict(a, value=3.5), down], 102.0) == []  # same alerts: no event
    assert {x["name"]: x["value"] for x in st.current()}["rpo_above_target"] == 3.5  # the latest value
    ev = st.update([dict(a, severity="critical"), down], 104.0)
    assert [(e["event"], e["alert"]["severity"], e["alert"]["since"]) for e in ev] == [("fire", "critical", 100.0)]
    ev = st.update([down], 106.0)
    assert [(e["event"], e["alert"]["name"], e["time"]) for e in ev] == [("clear", "rpo_above_target", 106.0)]
    assert [x["name"] for x in st.current()] == ["card_down"] and st.evaluations == 4
    assert [e["event"] for e in st.update([], 108.0)] == ["clear"] and st.current() == []


def test_schema_check_finds_missing_extra_and_mistyped_keys():
    doc = healthy()
    bad = copy.deepcopy(doc)
    del bad["cgs"][0]["rpo_bytes"]
    bad["cgs"][0]["vdisks"][0]["resync"] = {"percent": "12"}
    bad["card"]["surprise"] = 1
    bad["processes"]["card"]["answering"] = 1  # not a bool
    bad["cgs"][0]["throughput"]["in_bytes_total"] = True  # a bool is no byte count
    bad["cgs"][0]["state"] = "fine"
    problems = check(bad)
    for frag in ("cgs[0].rpo_bytes: missing", "cgs[0].vdisks[0].resync", "card.surprise: not in the schema",
                 "processes.card.answering", "throughput.in_bytes_total", "cgs[0].state"):
        assert any(frag in p for p in problems), (frag, problems)
    assert check(doc, STATUS) == []
    doc["cgs"][0]["refused"] = "bad name"  # optional key
    assert check(doc) == []


def test_rate_window_rates_over_the_last_span():
    rw = RateWindow(span_s=10, every_s=1)
    assert rw.rates(0.0, {"a": 5}) == {"a": 0.0}  # no sample yet
    total = 0
    for t in range(0, 30):
        total += 1000 if t < 20 else 0  # 1000 B/s for 20 s, then nothing
        assert rw.due(float(t))
        rw.sample(float(t), {"a": total})
        assert not rw.due(t + 0.5)
    assert rw.rates(29.0, {"a": total})["a"] == 0.0  # nothing in the last 10 s
    rw2 = RateWindow(span_s=10, every_s=1)
    for t in range(0, 15):
        rw2.sample(float(t), {"a": 1000 * t, "b": 7})
    assert rw2.rates(14.0, {"a": 14000, "b": 7, "new": 500}) == {"a": 1000.0, "b": 0.0, "new": 50.0}


def test_webhook_sender_retries_then_delivers_in_order_and_gives_up_after_its_attempts():
    async def main() -> tuple[list, AlertState]:
        got: list = []
        answers = iter([500, 503, 204, 204] + [500] * alerting.ATTEMPTS)  # 1st: 3 tries; 2nd: 1; 3rd: never

        async def hook(request: web.Request) -> web.Response:
            got.append(await request.json())
            return web.Response(status=next(answers))

        app = web.Application()
        app.router.add_post("/hook", hook)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        state = AlertState()
        queue: asyncio.Queue = asyncio.Queue()
        for i, ev in enumerate(("fire", "clear", "fire")):
            queue.put_nowait({"event": ev, "alert": {"name": f"a{i}"}, "time": float(i)})
        sender = asyncio.create_task(alerting._send_forever(state, f"http://127.0.0.1:{port}/hook", queue))
        deadline = asyncio.get_running_loop().time() + 20
        while state.webhook_failed < 1 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)  # ok-sleep: polling the sender's counters with a deadline
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        await runner.cleanup()
        return got, state

    got, state = asyncio.run(main())
    assert [(e["event"], e["alert"]["name"]) for e in got] == \
        [("fire", "a0")] * 3 + [("clear", "a1")] + [("fire", "a2")] * 3
    assert (state.webhook_sent, state.webhook_failed) == (2, 1)
