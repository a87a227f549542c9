"""At-rest keys through the commands (`nicsplit appliance keys / rotate-key /
retire-key`) on a real data directory; split from tests/unit/test_atrest.py
because ``nicsplit init`` and the commands run as subprocesses."""

from __future__ import annotations

import json
from pathlib import Path

from nicsplit.testing.workload import Workload

from nicsplit.storage import atrest
from nicsplit.testing.procs import run_cli


def test_cli_keys_rotate_retire(tmp_path: Path):
    from nicsplit.testing.datadir import init_data

    data = init_data(tmp_path / "data")
    krp = atrest.keyring_path(data)
    out = json.loads(run_cli(data, "appliance", "keys", "--json").stdout)
    assert out["keyring"] is None and out["enabled"] is True and out["keys"] == []
    assert json.loads(run_cli(data, "appliance", "rotate-key", "--json").stdout) == {"key_id": 1, "previous": None}
    jd = data / "appliance" / "journal" / "cg1"
    Workload.generate(1, nbatches=4).write_journal(jd)
    assert json.loads(run_cli(data, "appliance", "rotate-key", "--json").stdout) == {"key_id": 2, "previous": 1}
    out = json.loads(run_cli(data, "appliance", "keys", "--json").stdout)
    assert out["active"] == 2 and out["keyring"] == str(krp)
    n = len(list(jd.glob("*.seg")))
    assert [(k["id"], k["active"], k["segments"], k["journals"]) for k in out["keys"]] == [
        (1, False, n, {"cg1": n}), (2, True, 0, {})]
    p = run_cli(data, "appliance", "retire-key", "1", check=False)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and f"key 1 still encrypts {n} journal segment" in p.stderr
    assert "unused: can be retired" not in run_cli(data, "appliance", "keys").stdout
    for s in jd.glob("*.seg"):  # retention (not built yet) would remove them
        s.unlink()
    run_cli(data, "appliance", "rotate-key")
    assert "unused: can be retired" in run_cli(data, "appliance", "keys").stdout
    run_cli(data, "appliance", "retire-key", "1")
    assert [k["id"] for k in json.loads(run_cli(data, "appliance", "keys", "--json").stdout)["keys"]] == [2, 3]
    # switched off in the configuration: rotate-key refuses (the appliance would deactivate it)
    cfg = data / "nicsplit.toml"
    cfg.write_text(cfg.read_text().replace("at_rest_encryption = true", "at_rest_encryption = false"))
    p = run_cli(data, "appliance", "rotate-key", check=False)
    assert p.returncode == 1 and "at_rest_encryption is false" in p.stderr
