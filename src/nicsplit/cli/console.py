"""``nicsplit console run``: the operator console (REST API, metrics,
dashboard) in the foreground; ``nicsplit up`` runs it supervised.
``add_parsers(sub, common)`` registers it on an argparse subparsers object."""

from __future__ import annotations

import argparse
import json
from typing import Any

from nicsplit.core import config as cfgmod
from nicsplit.recovery.images import run_async


def cmd_console_run(args: argparse.Namespace) -> int:
    from nicsplit.console.server import serve  # lazy: aiohttp serves this command only

    cfg = cfgmod.load(cfgmod.data_dir(args.data))
    run_async(serve(cfg, listen=args.listen, ready=lambda info: print(json.dumps(info), flush=True)))
    return 0


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    cp = sub.add_parser("console", parents=[common], help="the operator console: REST API, metrics, dashboard").add_subparsers(
        dest="sub", metavar="SUBCOMMAND", required=True)
    s = cp.add_parser("run", parents=[common], help="serve the console in the foreground (nicsplit up runs it)")
    s.add_argument("--listen", help="HOST:PORT (default: [console] listen, 127.0.0.1:10811)")
    s.set_defaults(func=cmd_console_run)
