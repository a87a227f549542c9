"""Appliance commands for the ``nicsplit`` CLI (wired in by control/cli.py).

    nicsplit appliance run [--listen HOST:PORT]
    nicsplit appliance keys [--json]              at-rest keys and the segments and image blocks using each
    nicsplit appliance rotate-key [--json]        a new at-rest key, active for new segments and images
    nicsplit appliance retire-key ID [--json]     remove a key nothing uses any more
    nicsplit journal dump CG [--json] [--from SEQ] [--upto SEQ]
    nicsplit journal replay CG --out DIR [--upto SEQ] [--json]
    nicsplit pki init [--appliance-name NAME ...]

``add_parsers(sub, common)`` registers them on an argparse subparsers object.
The work is done by `nicsplit.appliance.server` (run), `nicsplit.recovery.keys`
and `nicsplit.recovery.replay`.  Configuration: the ``[appliance]`` table of
nicsplit.toml, documented in DEFAULT_TOML (nicsplit.core.config);
`server_config` maps it onto the server's ServerConfig.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

from nicsplit.cli.common import CliError, seq
from nicsplit.core import config as cfgmod
from nicsplit.core.config import parse_listen, parse_size
from nicsplit.core.pki import init_pki
from nicsplit.recovery import keys, replay
from nicsplit.recovery.retention import Policy, RetentionError
from nicsplit.storage import atrest

DEFAULT_LISTEN = "127.0.0.1:10810"

# The documented [appliance] section lives in nicsplit.core.config.DEFAULT_TOML.


def _section(cfg: cfgmod.Config) -> dict[str, Any]:
    sec = cfg.raw.get("appliance", {})
    if not isinstance(sec, dict):
        raise cfgmod.ConfigError(f"{cfg.data / cfgmod.CONFIG_NAME}: [appliance] must be a table")
    return sec


def _pki_dir(cfg: cfgmod.Config) -> Path:
    p = Path(str(_section(cfg).get("pki", "pki")))
    return p if p.is_absolute() else cfg.data / p


def server_config(cfg: cfgmod.Config, listen: str | None = None) -> Any:
    """The ServerConfig for a data directory (``[appliance]`` + overrides)."""
    from nicsplit.appliance.server import ServerConfig  # lazy: see cli.main.main()

    sec = _section(cfg)
    known = {"listen", "pki", "peers", "encryption", "segment_size", "heartbeat_interval", "idle_timeout", "queue_depth",
             "at_rest_encryption"}
    unknown = set(sec) - known
    if unknown:
        raise cfgmod.ConfigError(f"[appliance]: unknown key(s) {', '.join(sorted(unknown))}")

    def positive(key: str, default: float) -> float:
        v = sec.get(key, default)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
            raise cfgmod.ConfigError(f"[appliance] {key} = {v!r}: must be a positive number")
        return v

    peers = sec.get("peers", ["card", "host"])
    if not isinstance(peers, list) or not all(isinstance(p, str) and p for p in peers):
        raise cfgmod.ConfigError("[appliance] peers must be a list of certificate names")
    return ServerConfig(
        data=cfg.data,
        listen=parse_listen(listen or str(sec.get("listen", DEFAULT_LISTEN))),
        pki_dir=_pki_dir(cfg),
        peers=tuple(peers),
        encryption=bool(sec.get("encryption", True)),
        segment_size=parse_size(sec.get("segment_size", "64M"), "segment_size"),
        heartbeat_interval=positive("heartbeat_interval", 5),
        idle_timeout=positive("idle_timeout", 30),
        queue_depth=int(positive("queue_depth", 16)),
        retention=_retention(cfg),
        dedup_min_age_s=_dedup_min_age(cfg),
    )


def _retention(cfg: cfgmod.Config) -> Any:
    """``[retention]`` as a `retention.Policy` (ConfigError when bad)."""
    try:
        return Policy.from_config(cfg.raw.get("retention"))
    except RetentionError as e:
        raise cfgmod.ConfigError(str(e)) from None


def _dedup_min_age(cfg: cfgmod.Config) -> float:
    """Retention rule 6: twice the card's dedup horizon (0 with dedup off)."""
    card = cfg.raw.get("card", {})
    if card.get("dedup") is False:
        return 0.0
    try:
        return 2 * float(card.get("dedup_horizon_s", 600))
    except (TypeError, ValueError):
        raise cfgmod.ConfigError(f"[card] dedup_horizon_s = {card.get('dedup_horizon_s')!r}: a number of seconds") from None


def at_rest_encryption(cfg: cfgmod.Config) -> bool:
    """``[appliance] at_rest_encryption`` (default true)."""
    v = _section(cfg).get("at_rest_encryption", True)
    if not isinstance(v, bool):
        raise cfgmod.ConfigError(f"[appliance] at_rest_encryption = {v!r}: must be true or false")
    return v


# -- commands ----------------------------------------------------------------------


def cmd_appliance_run(args: argparse.Namespace) -> int:
    from nicsplit.appliance.server import run  # lazy: see cli.main.main()

    cfg = cfgmod.load(cfgmod.data_dir(args.data))
    scfg = server_config(cfg, args.listen)
    # The keyring says what the journals do (they read it themselves, also
    # while running): make it match the configuration before any opens.
    atrest.ensure(atrest.keyring_path(cfg.data), at_rest_encryption(cfg))
    return run(scfg)


def cmd_appliance_keys(args: argparse.Namespace) -> int:
    """The at-rest keys and which journal segments use each: a key with no
    segments (and not active) can be retired."""
    cfg = cfgmod.load(cfgmod.data_dir(args.data))
    out = keys.key_report(cfg.data, at_rest_encryption(cfg))
    if args.json:
        print(json.dumps(out))
        return 0
    if out["keyring"] is None:
        print(f"no at-rest keyring ({atrest.keyring_path(cfg.data)}); journal segments are written in clear")
    for k in out["keys"]:
        state = "active" if k["active"] else (
            "in use" if k["segments"] or k["image_blocks"] else "unused: can be retired")
        print(f"key {k['id']:>4}  created {_when(k['created'])}  {k['segments']:>6} segment(s)  "
              f"{k['image_blocks']:>9} image block(s) and undo entries  {state}")
    print(f"{out['clear_segments']} segment(s) in clear")
    for k in out["missing_keys"]:
        print(f"warning: segments or images use key {k}, which the keyring does not hold: they cannot be read",
              file=sys.stderr)
    return 0


def _when(t: float) -> str:
    return dt.datetime.fromtimestamp(t).isoformat(timespec="seconds")


def cmd_appliance_rotate_key(args: argparse.Namespace) -> int:
    """Add an at-rest key; new journal segments use it from the next segment
    each journal starts (a running appliance re-reads the keyring)."""
    cfg = cfgmod.load(cfgmod.data_dir(args.data))
    new, old = keys.rotate_key(cfg.data, at_rest_encryption(cfg))
    if args.json:
        print(json.dumps({"key_id": new, "previous": old}))
    else:
        print(f"at-rest key {new} is active for new journal segments" + (f" (was key {old})" if old else ""))
    return 0


def cmd_appliance_retire_key(args: argparse.Namespace) -> int:
    cfg = cfgmod.load(cfgmod.data_dir(args.data))
    keys.retire_key(cfg.data, args.key_id)
    if args.json:
        print(json.dumps({"retired": args.key_id}))
    else:
        print(f"at-rest key {args.key_id} retired")
    return 0


def cmd_pki_init(args: argparse.Namespace) -> int:
    data = cfgmod.data_dir(args.data)
    cfg = cfgmod.load(data)
    d = _pki_dir(cfg)
    created = init_pki(d, appliance_names=tuple(args.appliance_name or ()))
    print(f"created {', '.join(created)} in {d}" if created else f"{d} is complete; nothing created")
    return 0


def cmd_journal_dump(args: argparse.Namespace) -> int:
    cfg = cfgmod.load(cfgmod.data_dir(args.data))
    rows, damage = replay.dump(cfg, args.cg, args.from_seq, args.upto)
    if args.json:
        print(json.dumps({"records": rows}))
    else:
        if not rows:
            print(f"journal {args.cg} holds no records")
        for row in rows:
            print(f"{row['seq']:>10} {row['vdisk']:<24} {row['op']:<8} offset={row['offset']:<14} "
                  f"length={row['length']:<10} time={row['time']:.6f}")
    if damage:
        sys.stdout.flush()
        raise CliError(f"{damage}; the records after it are not listed")
    return 0


def cmd_journal_replay(args: argparse.Namespace) -> int:
    """Apply the journal in seq order onto fresh raw images, one per vdisk."""
    cfg = cfgmod.load(cfgmod.data_dir(args.data))
    out = Path(args.out)
    res = replay.replay(cfg, args.cg, out, args.upto)
    if args.json:
        print(json.dumps(res))
    else:
        images = res["images"]
        print(f"replayed {res['records']} records (up to seq {res['last_seq']}) into {out}: "
              f"{', '.join(sorted(images)) or 'no images'}")
    return 0


# -- parsers -------------------------------------------------------------------------


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``appliance run|keys|rotate-key|retire-key``, ``journal
    dump``, ``journal replay`` and ``pki init`` on the ``nicsplit``
    subparsers object ``sub``."""
    ap = sub.add_parser("appliance", parents=[common], help="the protection appliance").add_subparsers(
        dest="sub", metavar="SUBCOMMAND", required=True)
    s = ap.add_parser("run", parents=[common], help="receive batches from cards and journal them (foreground)")
    s.add_argument("--listen", metavar="HOST:PORT", help=f"default {DEFAULT_LISTEN}")
    s.set_defaults(func=cmd_appliance_run)
    s = ap.add_parser("keys", parents=[common], help="at-rest keys and the journal segments and image blocks that use each")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_appliance_keys)
    s = ap.add_parser("rotate-key", parents=[common], help="add an at-rest key; new journal segments use it, the appliance re-seals images under it")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_appliance_rotate_key)
    s = ap.add_parser("retire-key", parents=[common], help="remove an at-rest key that no journal segment or image block uses")
    s.add_argument("key_id", type=int, metavar="ID")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_appliance_retire_key)

    jp = sub.add_parser("journal", parents=[common], help="inspect a CG's journal").add_subparsers(
        dest="sub", metavar="SUBCOMMAND", required=True)
    s = jp.add_parser("dump", parents=[common], help="list a CG's journaled records in order")
    s.add_argument("cg")
    s.add_argument("--json", action="store_true")
    s.add_argument("--from", dest="from_seq", type=seq, default=1, metavar="SEQ")
    s.add_argument("--upto", type=seq, default=None, metavar="SEQ")
    s.set_defaults(func=cmd_journal_dump)
    s = jp.add_parser("replay", parents=[common], help="apply a CG's journal onto raw images, one per vdisk")
    s.add_argument("cg")
    s.add_argument("--out", required=True, metavar="DIR")
    s.add_argument("--upto", type=seq, default=None, metavar="SEQ")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_journal_replay)

    pp = sub.add_parser("pki", parents=[common], help="certificates and keys of this deployment").add_subparsers(
        dest="sub", metavar="SUBCOMMAND", required=True)
    s = pp.add_parser("init", parents=[common], help="create the CA, certificates and batch key (idempotent)")
    s.add_argument("--appliance-name", action="append", metavar="NAME",
                   help="extra DNS name or IP for the appliance certificate (repeatable)")
    s.set_defaults(func=cmd_pki_init)
