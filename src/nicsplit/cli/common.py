"""What every command module shares: the CLI's own error, argument types and
the PIT selector options. (main.py imports the command modules, so these
live here rather than there: no import cycle.)"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Callable

from nicsplit.control.ops import DOMAIN_ERRORS
from nicsplit.recovery.select import Selector


class CliError(Exception):
    """A user error found by the CLI itself (a bad combination of options):
    printed as one line, exit status 1, like every domain error."""


# The errors whose message is one complete line for the user: main() prints
# them as ``nicsplit: error: MESSAGE`` and exits 1 (never a traceback).
USER_ERRORS: tuple[type[Exception], ...] = (CliError, *DOMAIN_ERRORS)


def seq(value: str) -> int:
    """A journal sequence number: seqs start at 1, so 0 names no record and no PIT."""
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"bad sequence number {value!r}")
    return int(value)


def add_when(s: argparse.ArgumentParser, *, latest_help: str | None = None) -> Any:
    """The PIT selector options, one of them required; the group (to add more)."""
    when = s.add_mutually_exclusive_group(required=True)
    when.add_argument("--at", metavar="TIME", help="the latest point in time at or before TIME")
    when.add_argument("--seq", type=seq, metavar="N", help="the point in time at seq N")
    when.add_argument("--bookmark", metavar="NAME")
    when.add_argument("--latest", action="store_true", help=latest_help)
    return when


def selector(args: argparse.Namespace) -> Selector:
    return Selector(at=args.at, seq=args.seq, bookmark=args.bookmark, latest=bool(args.latest))


def emit(args: argparse.Namespace, out: dict, text: str) -> None:
    """``out`` as one JSON line with ``--json``, else ``text``."""
    print(json.dumps(out) if args.json else text)


def ready_printer(detach_stdout: bool, extra: dict | None = None) -> Callable[[dict], None]:
    """What a detached server (image serve, failover-serve) does once it
    listens: print its JSON ready line for the process that started it and,
    with ``--detach-stdout``, point stdout at /dev/null, since the starter
    stops reading it then and a later print must not die of a broken pipe."""

    def ready(info: dict) -> None:
        print(json.dumps({**(extra or {}), **info}), flush=True)
        if detach_stdout:
            fd = os.open(os.devnull, os.O_WRONLY)
            os.dup2(fd, 1)
            os.close(fd)

    return ready
