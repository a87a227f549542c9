"""``python -m nicsplit.appliance`` — the appliance commands on their own.

Same commands and contract as ``nicsplit appliance|journal|pki ...`` (one
error line, exit 1; JSON ready line on stdout), usable before or without the
main CLI wiring::

    python -m nicsplit.appliance --data DIR run --listen 127.0.0.1:0
    python -m nicsplit.appliance --data DIR journal dump CG --json
"""

from __future__ import annotations

import argparse
import logging
import sys

from nicsplit.appliance.cli import add_parsers
from nicsplit.control import config as cfgmod


def main(argv: list[str] | None = None) -> int:
    from nicsplit.control.cli import CliError

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data", metavar="DIR", default=argparse.SUPPRESS,
                        help=f"data directory (env {cfgmod.ENV_DATA}, default {cfgmod.DEFAULT_DATA})")
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more logging")
    p = argparse.ArgumentParser(prog="python -m nicsplit.appliance", parents=[common])
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # `run` directly, plus the nicsplit-style groups (appliance run, journal ..., pki ...).
    add_parsers(sub, common)
    run = sub.add_parser("run", parents=[common], help="same as 'appliance run'")
    run.add_argument("--listen", metavar="HOST:PORT")
    from nicsplit.appliance.cli import cmd_appliance_run

    run.set_defaults(func=cmd_appliance_run)
    args = p.parse_args(argv)
    args.data = getattr(args, "data", None)
    verbose = getattr(args, "verbose", 0) or 0
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose or args.command in ("run", "appliance") else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.func(args) or 0
    except (CliError, cfgmod.ConfigError) as e:
        print(f"nicsplit: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"nicsplit: error: {e.strerror or e}{': ' + e.filename if e.filename else ''}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
