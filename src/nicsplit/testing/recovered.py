"""After a fault: wait until a one-vdisk CG has recovered by itself, then
hold it to the ledger oracle (`nicsplit.testing.ledger`).

* `cg_state` — what ``nicsplit status --json`` says of a CG, computed in
  this process (on a loaded box each CLI start costs seconds, and waits poll).
* `check_recovered` — the journal reaches the host's last seq, the CG is
  protected, the latest PIT restores exactly the whole ledger and equals
  production (``qemu-img compare``), and the consistent PITs around the fault
  (the last before, one inside, the first after) are exact ledger prefixes,
  longer for later PITs.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from nicsplit.control.ops import pits_doc
from nicsplit.control.status import system_status
from nicsplit.core import config
from nicsplit.testing.ledger import Ledger, check_prefix
from nicsplit.testing.procs import run_cli, wait_for


def cg_state(data: Path, cg: str = "cg1") -> dict:
    (c,) = [c for c in system_status(config.load(data))["cgs"] if c["name"] == cg]
    return c


def check_recovered(data: Path, uri: str, ledger: Ledger, tmp_path: Path, fault: tuple[int, int], *,
                    cg: str = "cg1", vdisk: str = "a", timeout: float = 120) -> dict:
    """``fault``: the host's last seq when the fault began and when it ended."""
    last = cg_state(data, cg)["host_last_seq"]
    wait_for(lambda: (cg_state(data, cg)["last_durable_seq"] or 0) >= last, timeout,
             f"the journal reaching seq {last}", interval=0.2)
    st = wait_for(lambda: (s := cg_state(data, cg))["state"] == "protected" and s, timeout, "the CG protected",
                  interval=0.2)
    latest = tmp_path / "latest.raw"
    run_cli(data, "restore", vdisk, "--latest", "--to", str(latest), "--force", timeout=120)
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(latest), uri],
                   check=True, capture_output=True, timeout=120)
    # Every acknowledged write, and nothing else: the whole ledger, as a prefix.
    assert check_prefix(latest.read_bytes(), ledger) == len(ledger.done)
    latest.unlink()
    pits = pits_doc(config.load(data), cg, every=True)["pits"]
    consistent = [p for p in pits if p["consistent"]]
    before = [p for p in consistent if p["seq"] <= fault[0]][-1:]
    inside = [p for p in consistent if fault[0] < p["seq"] < fault[1]]
    after = [p for p in consistent if p["seq"] >= fault[1]][:1]
    assert before and after, (fault, [p["seq"] for p in consistent])
    sample = before + inside[len(inside) // 2:][:1] + after
    lengths = []
    for p in sample:
        out = tmp_path / f"pit-{p['seq']}.raw"
        run_cli(data, "restore", vdisk, "--seq", str(p["seq"]), "--to", str(out), "--force", timeout=120)
        lengths.append(check_prefix(out.read_bytes(), ledger))
        out.unlink()
    print(f"PITs {[p['seq'] for p in sample]} (fault between seq {fault[0]} and {fault[1]}; "
          f"{sum(p['gap'] for p in pits)} PITs in a gap) restore ledger prefixes {lengths}")
    assert lengths == sorted(lengths), lengths  # later PITs hold longer prefixes
    return st
