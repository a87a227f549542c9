"""``nicsplit doctor``: check the machine and the data directory.

    nicsplit doctor [--json]

Runs the checks of `nicsplit.control.doctor` and prints one line per
result (``ok``, ``WARN``, ``FAIL``) with what to fix; ``--json`` prints
``{"ok": bool, "results": [{"check", "ok", "level", "message", "fix"}]}``.
Exit 0 when nothing failed (warnings allowed), 1 otherwise.

Example::

    $ nicsplit doctor
    ok    cpu           2 CPUs available (0, 1)
    FAIL  token         /srv/nicsplit/pki/api.token has mode 0644: ...
          fix: chmod 600 /srv/nicsplit/pki/api.token
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from nicsplit.control.doctor import run_checks
from nicsplit.core import config as cfgmod

_MARK = {"ok": "ok", "warn": "WARN", "fail": "FAIL"}


def cmd_doctor(args: argparse.Namespace) -> int:
    cfg = cfgmod.load(cfgmod.data_dir(args.data))
    results = run_checks(cfg)
    ok = all(r["ok"] for r in results)
    if args.json:
        print(json.dumps({"ok": ok, "results": results}, indent=2))
        return 0 if ok else 1
    for r in results:
        print(f"{_MARK[r['level']]:<5} {r['check']:<13} {r['message']}")
        if r["level"] != "ok" and r["fix"]:
            print(f"{'':<5} {'':<13} fix: {r['fix']}")
    failed = sum(r["level"] == "fail" for r in results)
    warned = sum(r["level"] == "warn" for r in results)
    print(f"{len(results)} checks: {failed} failed, {warned} warning(s)" if failed or warned else
          f"{len(results)} checks: all ok")
    return 0 if ok else 1


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``doctor`` on the ``nicsplit`` subparsers object ``sub``."""
    s = sub.add_parser("doctor", parents=[common], help="check the environment and say what to fix (exit 1: a check failed)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_doctor)
