"""``nicsplit wait``: follow a CG's initial sync or resync until it is protected.

    nicsplit wait CG [--timeout S] [--json]
    nicsplit cg add CG VDISK --wait [--timeout S]     (the same, after the join)

The work is done by `nicsplit.control.follow` (polling the host's status);
the bar shows the bytes the host's resyncs copied of what they have to copy.
Exit 0 once every vdisk of the CG is protected; 1 with one line on a
timeout (it names what is still not protected) or without a running host.

Example::

    nicsplit cg add web web1-data --wait
    nicsplit wait web --timeout 600 --json
    {"cg": "web", "vdisks": ["web1-root", "web1-data"], "bytes": 1073741824, "seconds": 12.3, "waited_for": ["web1-data"]}
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from nicsplit.cli.progress import Bar
from nicsplit.control.follow import follow_sync
from nicsplit.core import config as cfgmod


def follow(args: argparse.Namespace, cfg: cfgmod.Config, cg: str, vdisks: list[str] | None = None) -> dict[str, Any]:
    """Follow the sync with a bar on stderr; the result document."""
    with Bar(args, f"sync {cg}") as bar:
        r = follow_sync(cfg, cg, timeout=args.timeout, vdisks=vdisks,
                        progress=lambda d, t, state: bar.update(d, t, f"sync {cg}: {state}"))
        bar.extra = "protected"
    return {"cg": r.cg, "vdisks": r.vdisks, "bytes": r.bytes, "seconds": round(r.seconds, 3), "waited_for": r.waited_for}


def cmd_wait(args: argparse.Namespace) -> int:
    cfg = cfgmod.load(cfgmod.data_dir(args.data))
    out = follow(args, cfg, args.cg)
    if args.json:
        print(json.dumps(out))
    else:
        what = f"after {out['seconds']:.1f} s of sync ({', '.join(out['waited_for'])})" if out["waited_for"] else "already"
        print(f"consistency group {args.cg} is protected {what}")
    return 0


def add_timeout(s: argparse.ArgumentParser, default: float = 3600.0) -> None:
    s.add_argument("--timeout", type=float, default=default, metavar="S",
                   help=f"give up after S seconds (default {default:g})")


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``wait`` on the ``nicsplit`` subparsers object ``sub``."""
    s = sub.add_parser("wait", parents=[common],
                       help="follow a consistency group's initial sync / resync until it is protected")
    s.add_argument("cg")
    add_timeout(s)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_wait)
