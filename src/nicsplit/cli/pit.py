"""Point-in-time commands: ``pits``, ``bookmark``, ``restore``.

    nicsplit pits CG [--all] [--json]
    nicsplit bookmark CG NAME [--lock] [--seq N] [--quiesce [CMD]] [--thaw CMD] [--hook-timeout S] [--json]
    nicsplit restore VDISK (--at TIME | --seq N | --bookmark NAME | --latest) --to FILE
                     [--format raw|qcow2] [--force] [--to-device] [--json]
    nicsplit restore VDISK (--at ... | --latest) --in-place [--json]

The work is done by `nicsplit.recovery.select` (PITs, bookmarks) and
`nicsplit.recovery.restore`; TIME is described there.

Example::

    nicsplit bookmark cg1 before-upgrade --lock
    nicsplit restore vm1-root --bookmark before-upgrade --to /tmp/root.raw
    nicsplit restore vm1-root --at -1h --to /tmp/root.qcow2 --format qcow2
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from nicsplit.cli.common import add_when, selector, seq
from nicsplit.cli.progress import Bar
from nicsplit.control import ops
from nicsplit.core import config as cfgmod
from nicsplit.recovery.select import format_time


def cmd_pits(args: argparse.Namespace) -> int:
    cfg = cfgmod.load(cfgmod.data_dir(args.data))
    doc = ops.pits_doc(cfg, args.cg, every=args.all)
    if args.json:
        print(json.dumps(doc))
        return 0
    rows = doc["pits"]
    if not rows:
        print(f"consistency group {args.cg} has no point in time yet")
    for row in rows:
        flag = "" if row["consistent"] else "  (inside a protection gap)" if row["gap"] else "  (inside a merge window)"
        if not row["usable"]:
            flag += "  UNUSABLE (journal damaged)"
        names = f"  [{', '.join(row['bookmarks'])}]" if row["bookmarks"] else ""
        print(f"{row['seq']:>12}  {format_time(row['time'])}{names}{flag}")
    for d in doc["damage"]:
        print(f"damaged: {d['message']}", file=sys.stderr)
    return 0


def cmd_bookmark(args: argparse.Namespace) -> int:
    cfg = cfgmod.load(cfgmod.data_dir(args.data))
    if args.unlock or (args.lock and args.existing):
        out = ops.bookmark_lock_doc(cfg, args.cg, args.name, not args.unlock)
    else:
        out = ops.bookmark_doc(cfg, args.cg, args.name, lock=args.lock, seq=args.seq, quiesce=args.quiesce,
                               thaw=args.thaw, hook_timeout=args.hook_timeout, timeout=args.timeout)
        if out.pop("host_down"):
            print(f"note: the host is not running; bookmarking the latest consistent journaled point in time of {args.cg}",
                  file=sys.stderr)
    if args.json:
        print(json.dumps(out))
    else:
        how = f"{out['consistency']}-consistent" + (f": {out['note']}" if out.get("note") else "")
        print(f"bookmark {out['name']} of {args.cg} at seq {out['seq']} ({format_time(out['time'])})"
              f"{' locked' if out['locked'] else ''}, {how}")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    cfg = cfgmod.load(cfgmod.data_dir(args.data))
    what = f"restore {args.vdisk}" + (" in place" if args.in_place else "")
    with Bar(args, what) as bar:
        out = ops.restore_doc(cfg, args.vdisk, selector(args), to=args.to, fmt=args.format, force=args.force,
                              to_device=args.to_device, in_place=args.in_place, progress=bar.update)
    if args.in_place:
        text = (f"restored {out['vdisk']} in place to seq {out['seq']} ({format_time(out['time'])}) in "
                f"{out['seconds']:.2f} s; still protected: the journal holds the restored data from seq "
                f"{out['covered_by_seq']}")
    else:
        text = (f"restored {out['vdisk']} at seq {out['seq']} ({format_time(out['time'])}) to {out['file']} "
                f"({out['format']}, {out['size']} bytes)")
    print(json.dumps(out) if args.json else text)
    return 0


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``pits``, ``bookmark`` and ``restore`` on the ``nicsplit``
    subparsers object ``sub``."""
    s = sub.add_parser("pits", parents=[common], help="list a consistency group's points in time")
    s.add_argument("cg")
    s.add_argument("--all", action="store_true",
                   help="every PIT the journal holds, also those retention's hourly thinning does not offer")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_pits)

    s = sub.add_parser("bookmark", parents=[common], help="name a point in time of a consistency group")
    s.add_argument("cg")
    s.add_argument("name")
    s.add_argument("--lock", action="store_true", help="keep it whatever the retention policy says")
    s.add_argument("--unlock", action="store_true", help="let retention trim an existing bookmark again")
    s.add_argument("--existing", action="store_true", help="with --lock: lock an existing bookmark")
    s.add_argument("--seq", type=seq, metavar="N",
                   help="the point in time at seq N (default: a barrier through the running host and card)")
    s.add_argument("--quiesce", metavar="CMD", nargs="?", const=True,
                   help="run a pre hook before the barrier: CMD, or without CMD the [hooks.CG] pre/post of nicsplit.toml "
                        "(e.g. virsh domfsfreeze VM); if it fails or times out the bookmark is crash-consistent")
    s.add_argument("--thaw", metavar="CMD", help="post hook run after the barrier, always (also when anything failed)")
    s.add_argument("--hook-timeout", type=float, default=None, metavar="S",
                   help="hard timeout of each hook (default [hooks.CG] timeout, else 60 s)")
    s.add_argument("--timeout", type=float, default=30.0, metavar="S",
                   help="how long to wait for the barrier to be journaled")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_bookmark)

    s = sub.add_parser("restore", parents=[common], help="write a vdisk's image at a point in time to a file")
    s.add_argument("vdisk")
    add_when(s)
    s.add_argument("--to", metavar="FILE")
    s.add_argument("--in-place", action="store_true",
                   help="write the image back onto the production vdisk through the host (stays protected)")
    s.add_argument("--format", choices=("raw", "qcow2"), default="raw")
    s.add_argument("--force", action="store_true", help="replace an existing file at --to")
    s.add_argument("--to-device", action="store_true",
                   help="--to names a block or character device: write the raw image onto it")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_restore)
