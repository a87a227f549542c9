"""`nicsplit doctor` as a command on a fresh `nicsplit init` directory:
nothing fails (warnings allowed, e.g. no realtime permission in CI); after
breaking things, exit 1 and each fix names the file to repair."""

from __future__ import annotations

import json
import os

from nicsplit.testing.datadir import init_data
from nicsplit.testing.procs import run_cli

FREE = {"appliance": {"listen": "127.0.0.1:0"}, "console": {"listen": "127.0.0.1:0"}}


def test_doctor_on_a_fresh_directory_then_broken(tmp_path):
    data = init_data(tmp_path / "data", listen="127.0.0.1:0", sections=FREE)
    p = run_cli(data, "doctor", "--json", check=False)
    doc = json.loads(p.stdout)
    assert p.returncode == 0 and doc["ok"], doc
    assert all(r["level"] in ("ok", "warn") for r in doc["results"]), doc
    assert {r["check"] for r in doc["results"]} >= {"cpu", "shm", "pki", "ports", "datastore", "token", "tools"}
    text = run_cli(data, "doctor").stdout
    assert text.splitlines()[-1].startswith(f"{len(doc['results'])} checks: ")

    token = data / "pki" / "api.token"
    os.chmod(token, 0o644)
    (data / "datastore" / "vol-0000.dsk").rename(data / "datastore" / "vol-0001.dsk")
    p = run_cli(data, "doctor", "--json", check=False)
    doc = json.loads(p.stdout)
    assert p.returncode == 1 and not doc["ok"]
    failed = {r["check"]: r for r in doc["results"] if r["level"] == "fail"}
    assert set(failed) == {"token", "datastore"}, failed
    assert failed["token"]["fix"] == f"chmod 600 {token}"
    assert str(data / "datastore" / "vol-0000.dsk") in failed["datastore"]["fix"]
    p = run_cli(data, "doctor", check=False)
    assert p.returncode == 1 and f"fix: chmod 600 {token}" in p.stdout and "FAIL  token" in p.stdout
    assert "2 failed" in p.stdout.splitlines()[-1]
    # not a data directory: the one-line error of every command
    p = run_cli(tmp_path / "nowhere", "doctor", check=False)
    assert p.returncode == 1 and "nicsplit init" in p.stderr and len(p.stderr.strip().splitlines()) == 1
