"""``nicsplit verify``: production against the latest point in time.

    nicsplit verify CG [--repair] [--json] [--rounds N] [--timeout S]

The work is done by `nicsplit.recovery.verify` (how concurrent writes are
told apart from real differences is described there). Exit status: 0 when
every block is equal (after ``--repair``: equal once repaired), 1 when
blocks differ or kept changing (the report says which), and 1 with one
``nicsplit: error:`` line on stderr and nothing on stdout when verify
could not run (no host, a CG in its protection gap...).

Example::

    nicsplit verify cg1 --json
    {"cg": "cg1", "seq": 812, ..., "differing": [{"vdisk": "a", "offset": 8192, "length": 4096}], ...}
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from nicsplit.cli.progress import Bar
from nicsplit.control import ops
from nicsplit.core import config as cfgmod


def cmd_verify(args: argparse.Namespace) -> int:
    cfg = cfgmod.load(cfgmod.data_dir(args.data))
    with Bar(args, f"verify {args.cg}") as bar:
        r = ops.verify_doc(cfg, args.cg, repair=args.repair, rounds=args.rounds, timeout=args.timeout,
                           progress=bar.update)
        bar.extra = "clean" if r["clean"] else f"{len(r['differing'])} differing, {len(r['unsettled'])} unsettled run(s)"
    if args.json:
        print(json.dumps(r))
        return 0 if r["clean"] else 1
    mib = r["bytes_compared"] / 2**20
    if r.get("repaired"):
        print(f"repaired {len(r['repaired'])} differing run(s) ({sum(d['length'] for d in r['repaired'])} bytes) "
              "by resyncing them from production")
    verdict = "clean" if r["clean"] else f"{len(r['differing'])} differing, {len(r['unsettled'])} unsettled run(s)"
    print(f"{r['cg']}: {len(r['vdisks'])} vdisk(s), {mib:.1f} MiB compared with seq {r['seq']} in {r['seconds']:.2f} s: "
          f"{verdict}")
    rows = [("differs", d) for d in r["differing"]] + [("unsettled", d) for d in r["unsettled"]]
    if rows:
        print(f"{'vdisk':<20} {'offset':>14} {'length':>10}  what")
        for what, d in rows:
            print(f"{d['vdisk']:<20} {d['offset']:>14} {d['length']:>10}  {what}")
    return 0 if r["clean"] else 1


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``verify`` on the ``nicsplit`` subparsers object ``sub``."""
    s = sub.add_parser("verify", parents=[common],
                       help="compare production with the latest point in time, block by block (exit 1: differences)")
    s.add_argument("cg")
    s.add_argument("--repair", action="store_true",
                   help="resync the differing blocks from production, then verify again")
    s.add_argument("--rounds", type=int, default=3, metavar="N",
                   help="re-checks of a differing block that concurrent writes keep changing (default 3)")
    s.add_argument("--timeout", type=float, default=120.0, metavar="S",
                   help="how long to wait for a barrier to be journaled, and for a repair's resync")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_verify)
