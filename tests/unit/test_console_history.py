"""The dashboard's history ring (console/history.py): bounded, rates from
the status totals between samples, the status's own throughput preferred,
a counter reset gives no rate, ``since`` returns only newer samples."""

from __future__ import annotations

from nicsplit.console.history import History


def doc(host: int, durable: int, *, state: str = "protected", rpo: float | None = 0.0, totals: tuple | None = None,
        rates: tuple | None = None) -> dict:
    c = {"name": "cg1", "state": state, "rpo_seconds": rpo, "host_last_seq": host, "last_durable_seq": durable,
         "protection_window": {"seconds": 60.0}}
    if totals or rates:
        c["throughput"] = {}
        if totals:
            c["throughput"].update(in_bytes_total=totals[0], out_bytes_total=totals[1])
        if rates:
            c["throughput"].update(in_bytes_per_s=rates[0], out_bytes_per_s=rates[1])
    return {"cgs": [c], "processes": {}}


def test_rates_from_sequence_numbers_and_byte_totals():
    h = History(interval=2.0, window=60.0)
    h.add(100.0, doc(10, 5, totals=(1000, 0)))
    h.add(102.0, doc(30, 25, totals=(5000, 4000)))
    first, second = h.series("cg1")
    assert first["writes_per_s"] is None and first["in_bytes_per_s"] is None  # one sample: no rate yet
    assert second["writes_per_s"] == 10.0 and second["durable_per_s"] == 10.0
    assert second["in_bytes_per_s"] == 2000.0 and second["out_bytes_per_s"] == 2000.0
    assert second["protection_window_seconds"] == 60.0 and second["state"] == "protected"
    # A process restart resets its totals: no negative rate.
    h.add(104.0, doc(3, 2, totals=(10, 10)))
    assert h.series("cg1")[-1]["writes_per_s"] is None and h.series("cg1")[-1]["in_bytes_per_s"] is None


def test_the_status_documents_own_throughput_wins():
    h = History()
    h.add(1.0, doc(1, 1, totals=(0, 0)))
    h.add(3.0, doc(2, 2, totals=(100, 100), rates=(7.0, 6.0)))
    assert (h.series("cg1")[-1]["in_bytes_per_s"], h.series("cg1")[-1]["out_bytes_per_s"]) == (7.0, 6.0)


def test_ring_is_bounded_and_since_filters():
    h = History(interval=2.0, window=20.0)
    for i in range(50):
        h.add(float(i * 2), doc(i, i, rpo=None if i % 7 == 0 else float(i)))
    s = h.series("cg1")
    assert len(s) == 10 and s[0]["t"] == 80.0 and s[-1]["t"] == 98.0
    assert [p["t"] for p in h.series("cg1", since=94.0)] == [96.0, 98.0]
    assert s[-2]["rpo_seconds"] == 48.0 and s[-1]["rpo_seconds"] is None  # 49 % 7 == 0: unknown stays null
    assert h.cgs() == ["cg1"] and h.series("other") == []


def test_a_cg_that_goes_away_keeps_its_past():
    h = History()
    h.add(1.0, doc(1, 1))
    h.add(3.0, {"cgs": [], "processes": {}})
    assert [p["t"] for p in h.series("cg1")] == [1.0]
