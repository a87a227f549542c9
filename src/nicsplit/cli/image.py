"""Image access commands: ``image export|list|close|serve``.

    nicsplit image export CG (--at TIME | --seq N | --bookmark NAME | --latest)
                          [--writable] [--listen HOST:PORT] [--json]
    nicsplit image list [--json]
    nicsplit image close ID [--json]
    nicsplit image serve CG (--at ... | --latest) [--id ID] [--writable] [--listen HOST:PORT]

``export`` prints ``{"id", "cg", "seq", "time", "writable", "pid", "exports":
{VDISK: "nbd://HOST:PORT/VDISK"}, "ready_seconds"}`` with ``--json``, a
table otherwise. ``serve`` (what export starts, detached, when no appliance
serves the image) prints one JSON line: ``{"event": "ready", ...}`` once it
listens, or ``{"event": "error", "error": ...}`` and exits 1. The work is
done by `nicsplit.recovery.images`.

Example::

    nicsplit image export cg1 --bookmark before-upgrade --json
    qemu-img compare nbd://127.0.0.1:40123/vm1-root golden.raw
    nicsplit image close 3f9a12bc
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import time
from typing import Any, Callable

from nicsplit.cli.common import USER_ERRORS, add_when, ready_printer, selector
from nicsplit.cli.progress import Bar
from nicsplit.control import ops
from nicsplit.core import config as cfgmod
from nicsplit.recovery import images
from nicsplit.recovery.select import format_time


def cmd_serve(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    if not getattr(args, "verbose", 0):
        logging.getLogger("nicsplit").setLevel(logging.INFO)  # a server logs its life (to DATA/run/image-ID.log)
    image_id = images.check_id(args.id or secrets.token_hex(4))
    try:
        prep = images.prepare(cfgmod.data_dir(args.data), args.cg, selector(args), args.listen,
                              progress=progress_events() if args.progress_events else None)
    except USER_ERRORS as e:  # said on stdout too: the exporter reads it there
        print(json.dumps({"event": "error", "error": str(e)}), flush=True)
        raise

    images.run_async(images.serve(prep, image_id, args.writable, t0,
                                 ready_printer(args.detach_stdout, {"event": "ready"})))
    return 0


def progress_events(interval: float = 0.1) -> Callable[[int, int], None]:
    """``progress(done, total)`` as JSON lines on stdout for the exporter
    (`images.spawn_detached`), at most one per ``interval`` s and the last."""
    last = [0.0]

    def emit(done: int, total: int) -> None:
        now = time.monotonic()
        if done >= total or now - last[0] >= interval:
            last[0] = now
            print(json.dumps({"event": "progress", "done": done, "total": total}), flush=True)

    return emit


def cmd_export(args: argparse.Namespace) -> int:
    cfg = cfgmod.load(cfgmod.data_dir(args.data))
    with Bar(args, f"image export {args.cg}") as bar:
        out = ops.export_doc(cfg, args.cg, selector(args), writable=args.writable, listen=args.listen,
                             progress=bar.update)
        bar.extra = f"ready in {out['ready_seconds']:.2f} s"
    if args.json:
        print(json.dumps(out))
        return 0
    mode = "writable (throw-away overlay)" if out["writable"] else "read-only"
    print(f"image {out['id']}: {out['cg']} at seq {out['seq']} ({format_time(out['time'])}), {mode}, "
          f"pid {out['pid']}, ready in {out['ready_seconds']:.2f} s")
    width = max(len(n) for n in out["exports"])
    for name, url in out["exports"].items():
        print(f"  {name:<{width}}  {url}")
    print(f"close with: nicsplit image close {out['id']}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    cfg = cfgmod.load(cfgmod.data_dir(args.data))
    found = ops.images_doc(cfg)["images"]
    if args.json:
        print(json.dumps({"images": found}))
        return 0
    if not found:
        print("no images (open one with: nicsplit image export CG --latest)")
        return 0
    for i in found:
        state = "" if i["alive"] else "  (server gone: nicsplit image close " + i["id"] + ")"
        mode = "rw" if i.get("writable") else "ro"
        print(f"{i['id']:<10} {i['cg']:<16} seq {i['seq']:<10} {mode}  pid {i['pid']}{state}")
        for name, url in i.get("exports", {}).items():
            print(f"    {name:<20} {url}")
    return 0


def cmd_close(args: argparse.Namespace) -> int:
    out = ops.close_doc(cfgmod.load(cfgmod.data_dir(args.data)), args.id)
    if args.json:
        print(json.dumps(out))
    else:
        print(f"closed image {args.id}{' (killed after ' + str(int(images.CLOSE_TIMEOUT)) + ' s)' if out['killed'] else ''}")
    return 0


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``image export|list|close|serve`` on the ``nicsplit``
    subparsers object ``sub``."""
    ip = sub.add_parser("image", parents=[common], help="expose a consistency group at a point in time over NBD")
    isub = ip.add_subparsers(dest="sub", metavar="SUBCOMMAND", required=True)

    s = isub.add_parser("export", parents=[common], help="export every vdisk of a CG at a point in time (background)")
    s.add_argument("cg")
    add_when(s)
    s.add_argument("--writable", action="store_true", help="accept writes into a throw-away overlay")
    s.add_argument("--listen", metavar="HOST:PORT", help="default 127.0.0.1:0 (a free port)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_export)

    s = isub.add_parser("list", parents=[common], help="list exported images")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_list)

    s = isub.add_parser("close", parents=[common], help="stop an exported image and discard its overlay")
    s.add_argument("id")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_close)

    s = isub.add_parser("serve", parents=[common], help="serve an image in the foreground (export runs this)")
    s.add_argument("cg")
    add_when(s)
    s.add_argument("--id", metavar="ID", help="image id (default: random)")
    s.add_argument("--writable", action="store_true")
    s.add_argument("--listen", metavar="HOST:PORT", help="default 127.0.0.1:0 (a free port)")
    s.add_argument("--detach-stdout", action="store_true", help=argparse.SUPPRESS)
    s.add_argument("--progress-events", action="store_true", help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_serve)
