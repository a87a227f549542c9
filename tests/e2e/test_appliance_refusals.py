"""Issue 11: what the appliance refuses, and that a refusal costs only what
was refused.  The appliance is a real process (``nicsplit appliance run``);
the client is the stand-in card `CardClient` with the card certificate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nicsplit.core import pki
from nicsplit.core.records import Op
from nicsplit.testing.appliance import ApplianceProcess, CardClient, make_batch
from nicsplit.testing.datadir import init_data
from nicsplit.testing.procs import run_cli
from nicsplit.wire import frames as F

BAD_CGS = ("_x", ".", "..", ".hidden", "--", "db.json")


@pytest.fixture
def adata(tmp_path: Path) -> Path:
    return init_data(tmp_path / "data")


@pytest.fixture
def appliance(adata: Path):
    started: list[ApplianceProcess] = []

    def start(*args: str) -> ApplianceProcess:
        a = ApplianceProcess(adata, *args).start()
        started.append(a)
        return a

    yield start
    for a in started:
        if a.proc is not None and a.proc.poll() is None:
            assert a.stop() == 0, f"appliance exited non-zero on SIGTERM; log:\n{a.log()}"


def card(data: Path, app: ApplianceProcess, name: str = "card") -> CardClient:
    return CardClient.connect(app.host_port, pki.client_context(data / "pki", name))


def barrier(batch_id: int, cg: str, seq: int, data: Path) -> F.Batch:
    return make_batch(batch_id, cg, [F.Record(seq, batch_id, 1, Op.BARRIER, 0, 0, 0, 5)], pki.load_batch_key(data / "pki"))


def seqs(data: Path, cg: str) -> list[int]:
    p = subprocess.run([sys.executable, "-m", "nicsplit", "--data", str(data), "journal", "dump", cg, "--json"],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, check=True)
    return [r["seq"] for r in json.loads(p.stdout)["records"]]


def test_hello_with_bad_cgs_still_journals_the_good_one(adata: Path, appliance):
    app = appliance()
    with card(adata, app) as c:
        ack = c.hello(("db", *BAD_CGS))
        assert ack.resume == {"db": 0}  # each bad CG left out; the session lives
        for n in (1, 2, 3):
            c.send(barrier(n, "db", n, adata))
            a = c.recv()
            assert isinstance(a, F.Ack) and a.durable and a.last_seq == n
    assert seqs(adata, "db") == [1, 2, 3]
    assert sorted(p.name for p in (adata / "appliance" / "journal").iterdir()) == ["db"]
    log = app.log()
    for cg in BAD_CGS:
        assert f"CG {cg!r} refused" in log, log
    assert "Traceback" not in log


def test_batch_with_a_wild_seq_is_refused_and_real_writes_go_on(adata: Path, appliance):
    app = appliance()
    with card(adata, app) as c:
        c.hello(("db",))
        c.send(barrier(1, "db", 1, adata))
        assert c.recv().last_seq == 1
        c.send(barrier(2, "db", 1 << 62, adata))
        err = c.recv()
        assert isinstance(err, F.Error) and err.code == F.ErrorCode.BAD_BATCH, err
        assert "above the largest seq a CG reaches" in err.message
    with card(adata, app) as c:  # far past the last seq, though below the absolute bound
        c.hello(("db",))
        c.send(barrier(2, "db", 1 << 40, adata))
        err = c.recv()
        assert isinstance(err, F.Error) and err.code == F.ErrorCode.BAD_BATCH, err
        assert "past the journal's last seq 1" in err.message
    with card(adata, app) as c:
        assert c.hello(("db",)).resume == {"db": 1}
        c.send(barrier(3, "db", 2, adata))
        a = c.recv()
        assert isinstance(a, F.Ack) and a.durable and a.last_seq == 2
    assert seqs(adata, "db") == [1, 2]  # journaled, not taken for a duplicate of seq 2^62


def test_hello_creates_journals_only_for_known_cgs_or_up_to_the_limit(tmp_path: Path):
    data = init_data(tmp_path / "data", sections={"appliance": {"max_unknown_cgs": 2}})
    run_cli(data, "cg", "create", "k1")
    run_cli(data, "vdisk", "create", "solo", "--size", "1M")  # in no CG: ships as CG "solo"
    with ApplianceProcess(data) as app:
        with card(data, app) as c:
            ack = c.hello(("u1", "u2", "u3", "u4", "k1", "solo"))
            assert ack.resume == {"u1": 0, "u2": 0, "k1": 0, "solo": 0}
            c.send(barrier(1, "k1", 1, data))
            assert c.recv().durable
        assert "unknown CG 'u3' (not in cgs.json or the catalog) and 2 journals of unknown CGs exist already " \
               "([appliance] max_unknown_cgs = 2)" in app.log()
        with card(data, app) as c:  # existing journals are never refused; the limit still holds
            assert c.hello(("u2", "u5")).resume == {"u2": 0}
        assert app.stop() == 0
    assert sorted(p.name for p in (data / "appliance" / "journal").iterdir()) == ["k1", "solo", "u1", "u2"]
    # after a restart the journals of unknown CGs still count
    with ApplianceProcess(data) as app:
        with card(data, app) as c:
            assert c.hello(("u1", "u6", "k1")).resume == {"u1": 0, "k1": 1}
        assert app.stop() == 0


def test_only_the_card_certificate_may_ship_by_default(adata: Path, appliance):
    app = appliance()
    for who in ("host", "appliance"):  # valid certificates of our CA, but not cards
        with card(adata, app, who) as c:
            err = c.recv()
            assert isinstance(err, F.Error) and err.code == F.ErrorCode.UNAUTHENTICATED, err
            assert c.recv() is None
    assert "certificate CN 'host' is not an accepted peer (card)" in app.log()
    with card(adata, app) as c:
        assert c.hello(("db",)).resume == {"db": 0}
    assert sorted(p.name for p in (adata / "appliance" / "journal").iterdir()) == ["db"]


def test_peers_can_admit_more(tmp_path: Path):
    data = init_data(tmp_path / "data", sections={"appliance": {"peers": ["card", "host"]}})
    with ApplianceProcess(data) as app:
        with card(data, app, "host") as c:
            assert c.hello(("db",)).resume == {"db": 0}
        assert app.stop() == 0
