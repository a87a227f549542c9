"""What the fault soak (`nicsplit.testing.soak`) checks after each case,
in-process (no command started per check):

- `wait_recovered` — every vdisk of the CG protected, the journal holding
  every seq the host handed out, the replica at the newest PIT;
- `check_case` — (a) production and the latest PIT hold every acknowledged
  ledger write; (b) no phantom write in the journal since the last case;
  (c) sampled consistent PITs of the case are exact prefixes of the write
  order, in order; (d) the replica equals production at the latest PIT
  (`verify_cg`).
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import Any

from nicsplit.control.ops import pits_doc
from nicsplit.control.status import system_status
from nicsplit.core.catalog import open_catalog
from nicsplit.core.config import Config
from nicsplit.core.ctl import request
from nicsplit.core.layout import Layout
from nicsplit.core.records import Op
from nicsplit.recovery.replay import open_journal
from nicsplit.recovery.restore import restore_source, restore_to_file
from nicsplit.recovery.select import Selector
from nicsplit.recovery.verify import verify_cg
from nicsplit.testing.ledger import BS
from nicsplit.testing.procs import nbd_connect, wait_for
from nicsplit.testing.soakledger import SoakLedger, check_prefix, check_record

PITS_PER_CASE = 2


def _cg(cfg: Config, cg: str) -> dict:
    return next(c for c in system_status(cfg)["cgs"] if c["name"] == cg)


def wait_recovered(cfg: Config, cg: str, timeout: float) -> int:
    """Protected and caught up (module docstring); the latest PIT's seq."""
    last: dict = {}

    def protected() -> bool:
        c = last["cg"] = _cg(cfg, cg)
        return (c["state"] == "protected" and all(v["state"] == "protected" for v in c["vdisks"])
                and c["host_last_seq"] is not None and (c["last_durable_seq"] or 0) >= c["host_last_seq"])

    try:
        wait_for(protected, timeout, f"CG {cg} protected with the journal caught up", interval=0.2)
    except TimeoutError as e:
        c = last.get("cg", {})
        raise TimeoutError(f"{e}: state {c.get('state')}, vdisks "
                           f"{[(v['name'], v['state'], v.get('reason')) for v in c.get('vdisks', [])]}, "
                           f"host seq {c.get('host_last_seq')}, durable {c.get('last_durable_seq')}") from None
    latest = pits_doc(cfg, cg)["pits"][-1]["seq"]

    def replica_done() -> bool:
        r = request(Layout(cfg.data).appliance_sock, {"cmd": "status"}, 5)
        d = ((((r or {}).get("status") or {}).get("cgs") or {}).get(cg) or {}).get("distribution") or {}
        return d.get("applied_seq", -1) >= latest and d.get("lag_records") == 0

    wait_for(replica_done, timeout, f"the replica of {cg} reaching seq {latest}", interval=0.1)
    return latest


def _restore(cfg: Config, vdisk: str, sel: Selector, tmp: Path) -> tuple[int, bytes]:
    out = tmp / f"{vdisk}.raw"
    res = restore_to_file(cfg, restore_source(cfg, vdisk), sel, out, force=True)
    return res["seq"], out.read_bytes()


def production(uri: str, size: int) -> bytes:
    h = nbd_connect(uri)
    try:
        return b"".join(h.pread(min(1 << 20, size - o), o) for o in range(0, size, 1 << 20))
    finally:
        h.shutdown()


def record_blocks(length: int, refs: tuple, data: bytes) -> list[tuple[int, bytes]]:
    """(block number in the record, bytes) of the blocks a WRITE record
    carries itself (blocks sent by reference were checked when first seen)."""
    by_ref = {b for b, _ in refs}
    out, pos = [], 0
    for k in range(-(-length // BS)):
        if k in by_ref:
            continue
        n = min(BS, length - k * BS)
        out.append((k, data[pos:pos + n]))
        pos += n
    return out


def check_journal(cfg: Config, cg: str, vid: int, ledger: SoakLedger, from_seq: int) -> tuple[int, int]:
    """(b): every record of the ledger's vdisk from ``from_seq`` on; returns
    (records checked, last seq seen)."""
    n, last = 0, from_seq - 1
    with open_journal(cfg, cg) as j:
        if j.damage:
            raise AssertionError(f"journal {cg} is damaged: {j.damage}")
        for r in j.iter_records(from_seq, None):
            last = max(last, r.seq)
            if r.vdisk_id != vid or r.op == Op.BARRIER:
                continue
            op = "write" if r.op == Op.WRITE else Op(r.op).name.lower()
            try:
                check_record(op, r.offset, r.length, record_blocks(r.length, r.refs, r.data) if op == "write" else [],
                             ledger)
            except AssertionError as e:
                raise AssertionError(f"phantom write in journal record seq {r.seq}: {e}") from None
            n += 1
    return n, last


def check_case(cfg: Config, cg: str, dep: Any, ledger: SoakLedger, state: dict, rng: random.Random) -> dict:
    notes: dict = {}
    with tempfile.TemporaryDirectory(prefix="soak-check-", dir=dep.root) as t:
        tmp = Path(t)
        # (a) production holds every acknowledged write, and nothing else
        prod = production(dep.uri("ledger"), ledger.size)
        n = check_prefix(prod, ledger)
        if n != ledger.acked:
            raise AssertionError(f"production holds the first {n} ledger writes, {ledger.acked} were acknowledged")
        # (a) the latest PIT is production
        seq, img = _restore(cfg, "ledger", Selector(latest=True), tmp)
        if img != prod:
            raise AssertionError(f"the latest PIT (seq {seq}) is not production: it holds the first "
                                 f"{check_prefix(img, ledger)} of {ledger.acked} acknowledged writes")
        notes["latest"] = seq
        # (b) no phantom write
        vid = open_catalog(cfg.datastore_dir).get("ledger").id
        recs, last = check_journal(cfg, cg, vid, ledger, state["checked_seq"] + 1)
        notes["records_checked"] = recs
        # (c) sampled consistent PITs of this case: exact prefixes, growing with the seq
        pits = pits_doc(cfg, cg, every=True)["pits"]
        mine = [p for p in pits if state["last_latest"] < p["seq"] < seq and p["consistent"] and p["usable"]]
        sample = sorted(rng.sample(mine, min(PITS_PER_CASE, len(mine))), key=lambda p: p["seq"])
        prev = state.get("last_prefix", 0)
        prefixes = []
        for p in sample:
            s, img = _restore(cfg, "ledger", Selector(seq=p["seq"]), tmp)
            k = check_prefix(img, ledger)
            if k < prev:
                raise AssertionError(f"PIT seq {s} holds the first {k} writes, an earlier PIT {prev}")
            prev = k
            prefixes.append((s, k))
        notes["pits"] = prefixes
        notes["gap_pits"] = sum(1 for p in pits if state["last_latest"] < p["seq"] and not p["consistent"])
        # (d) replica == production at the latest PIT
        rep = verify_cg(cfg, cg)
        if not rep.clean:
            raise AssertionError(f"verify: replica differs from production at seq {rep.seq}: "
                                 f"{[d.to_json() for d in rep.differing + rep.unsettled][:10]}")
        notes["verified_seq"] = rep.seq
    state["checked_seq"] = last
    state["last_latest"] = seq
    state["last_prefix"] = ledger.acked
    return notes
