"""Failover and failback commands.

    nicsplit failover CG (--seq N | --bookmark NAME | --at TIME | --latest | --resume)
                         [--listen HOST:PORT] [--json]
    nicsplit failback CG [--production-uri URI] [--json]
    nicsplit failover-serve CG --lock-fd FD [--listen HOST:PORT]      (failover runs this, detached)

The state machine, its crash rules and the failback copy are in
`nicsplit.recovery.failover`.

Example::

    nicsplit failover web --bookmark before-upgrade --json
    qemu-system-x86_64 ... -drive file=nbd://APPLIANCE:PORT/web1-root,format=raw
    nicsplit failback web
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from nicsplit.cli.common import USER_ERRORS, add_when, emit, ready_printer, selector
from nicsplit.control import ops
from nicsplit.core import config as cfgmod
from nicsplit.recovery import failover as fo
from nicsplit.recovery.images import run_async
from nicsplit.recovery.select import format_time


def _warn(text: str) -> None:
    print(f"nicsplit: warning: {text}", file=sys.stderr)


def cmd_failover(args: argparse.Namespace) -> int:
    cfg = cfgmod.load(cfgmod.data_dir(args.data))
    cg = args.cg
    if args.resume:
        out = ops.failover_doc(cfg, cg, None, resume=True, listen=args.listen)
        emit(args, out, f"failover of {cg} at seq {out['seq']} serving again:\n"
             + "\n".join(f"  {n:<20} {u}" for n, u in out["exports"].items()))
        return 0
    out = ops.failover_doc(cfg, cg, selector(args), listen=args.listen, warn=_warn)
    lines = [f"failed over {cg} to seq {out['seq']} ({format_time(out['time'])}); production fenced "
             f"({out['fenced_by']}); ready in {out['ready_seconds']:.2f} s"]
    lines += [f"  {n:<20} {u}" for n, u in out["exports"].items()]
    lines.append(f"fail back with: nicsplit failback {cg}")
    emit(args, out, "\n".join(lines))
    return 0


def cmd_failover_serve(args: argparse.Namespace) -> int:
    if not getattr(args, "verbose", 0):
        logging.getLogger("nicsplit").setLevel(logging.INFO)  # a server logs its life (DATA/run/failover-CG.log)
    try:
        cfg = cfgmod.load(cfgmod.data_dir(args.data))
        srv, listen, st = fo.prepare_server(cfg, args.cg, args.listen)
    except USER_ERRORS as e:  # said on stdout too: the starter reads it there
        print(json.dumps({"event": "error", "error": str(e)}), flush=True)
        raise

    run_async(fo.serve(srv, listen, st, args.cg, ready_printer(args.detach_stdout), args.lock_fd))
    return 0


def cmd_failback(args: argparse.Namespace) -> int:
    cfg = cfgmod.load(cfgmod.data_dir(args.data))
    cg = args.cg
    out = ops.failback_doc(cfg, cg, production_uri=args.production_uri, warn=_warn)
    if out.get("aborted"):
        emit(args, out, f"the failover of {cg} had not finished; production unfenced, nothing to copy")
    else:
        emit(args, out, f"failed back {cg}: {out['copied_bytes']} bytes written and {out['zeroed_bytes']} zeroed "
                        f"on production in {out['seconds']:.2f} s; production unfenced, protection goes on")
    return 0


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``failover``, ``failback`` and ``failover-serve``."""
    s = sub.add_parser("failover", parents=[common],
                       help="serve a consistency group from its replicas at a point in time (production fenced)")
    s.add_argument("cg")
    when = add_when(s, latest_help="the latest, after the journal caught up with production")
    when.add_argument("--resume", action="store_true", help="restart the server of a failed-over CG")
    s.add_argument("--listen", metavar="HOST:PORT", help="default 127.0.0.1:0 (a free port)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_failover)

    s = sub.add_parser("failback", parents=[common],
                       help="copy what changed back to production, unfence it, resume replication")
    s.add_argument("cg")
    s.add_argument("--production-uri", metavar="URI",
                   help="the host's NBD address (default: asked from the running host)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_failback)

    s = sub.add_parser("failover-serve", parents=[common], help="serve a failed-over CG (failover runs this)")
    s.add_argument("cg")
    s.add_argument("--lock-fd", type=int, metavar="FD", help=argparse.SUPPRESS)
    s.add_argument("--listen", metavar="HOST:PORT")
    s.add_argument("--detach-stdout", action="store_true", help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_failover_serve)
