"""The quick subset of the fault soak (`make soak` runs 200 random cases;
docs/faults.md): one `nicsplit up`, eight cases with a fixed plan of faults
so every kind of process fault runs on each `make test` (kill -9 and
SIGSTOP of processes, failpoints), each with the soak's seeded timings
(kill -9 of the supervisor costs a minute of restarts here: `make soak`
and tests/e2e/test_supervisor_crash.py cover it). After every case: recovery,
then no acknowledged ledger write lost, no phantom write in the journal,
sampled consistent PITs exact prefixes, replica == production (verify).
Rerun one case: ``make soak SEED=<seed> CASE=<k>`` gives the same timings
for a random fault; the plan's fault is in the printed line."""

from __future__ import annotations

import json

import pytest

from nicsplit.testing.soak import FAILPOINTS, run_soak

pytestmark = pytest.mark.usefixtures("peers")

PLAN = [
    "kill:worker",
    "kill:host",
    "stop:appliance",
    "failpoint:appliance.after-fsync=kill",
    "failpoint:card.acker.after-ack=kill",
    "kill:appliance",
    "stop:card",
    "failpoint:host.split.after-submit=kill",
]


@pytest.mark.timeout(600)
def test_quick_fault_soak(tmp_path, seed):
    assert all(p.split(":", 1)[1].split("=")[0] in FAILPOINTS for p in PLAN if p.startswith("failpoint:"))
    out = tmp_path / "soak.json"
    s = run_soak(len(PLAN), seed, out, workdir=tmp_path, plan=PLAN)
    print(out.with_suffix(".md").read_text())
    assert s["cases"] == len(PLAN)
    assert s["failed"] == 0, json.dumps(s["failures"], indent=1)[:20000]
    assert not s["failpoints_not_reached"], s["failpoints_not_reached"]
    # every case checked something: the latest PIT, and journal records of the ledger's vdisk
    for r in s["results"]:
        assert r["notes"]["records_checked"] > 0 and r["notes"]["verified_seq"] >= r["notes"]["latest"], r
