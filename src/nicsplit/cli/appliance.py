"""Appliance commands for the ``nicsplit`` CLI (wired in by cli/main.py).

    nicsplit appliance run [--listen HOST:PORT]
    nicsplit appliance keys [--json]              at-rest keys and the segments and image blocks using each
    nicsplit appliance rotate-key [--json]        a new at-rest key, active for new segments and images
    nicsplit appliance retire-key ID [--json]     remove a key nothing uses any more
    nicsplit journal dump CG [--json] [--from SEQ] [--upto SEQ]
    nicsplit journal replay CG --out DIR [--upto SEQ] [--force] [--json]
    nicsplit pki init [--appliance-name NAME ...]
    nicsplit pki nbd-client DIR [--name CN]       a client certificate for NBD over TLS
    nicsplit pki nbd-psk FILE --name NAME         a pre-shared key for NBD over TLS-PSK

``add_parsers(sub, common)`` registers them on an argparse subparsers object.
The work is done by `nicsplit.appliance.server` (run), `nicsplit.recovery.keys`
and `nicsplit.recovery.replay`.  Configuration: the ``[appliance]`` table of
nicsplit.toml, documented in DEFAULT_TOML (nicsplit.core.config);
`nicsplit.appliance.config` maps it onto the server's ServerConfig.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

from nicsplit.appliance.config import DEFAULT_LISTEN, at_rest_encryption, pki_dir, server_config
from nicsplit.cli.common import CliError, seq
from nicsplit.core import config as cfgmod
from nicsplit.core.pki import init_pki, issue_nbd_client
from nicsplit.core.tlspsk import PskError, add_key
from nicsplit.recovery import keys, replay
from nicsplit.storage import atrest

# -- commands ----------------------------------------------------------------------


def cmd_appliance_run(args: argparse.Namespace) -> int:
    from nicsplit.appliance.server import run  # lazy: see cli.main.main()

    cfg = cfgmod.load(cfgmod.data_dir(args.data))
    scfg = server_config(cfg, args.listen)
    if args.peer:  # `nicsplit up --transport net`: the host ships too
        scfg.peers = tuple(dict.fromkeys((*scfg.peers, *args.peer)))
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
    d = pki_dir(cfg)
    created = init_pki(d, appliance_names=tuple(args.appliance_name or ()))
    print(f"created {', '.join(created)} in {d}" if created else f"{d} is complete; nothing created")
    return 0


def cmd_pki_nbd_client(args: argparse.Namespace) -> int:
    cfg = cfgmod.load(cfgmod.data_dir(args.data))
    paths = issue_nbd_client(pki_dir(cfg), Path(args.dir), args.name)
    print(f"issued NBD client certificate {args.name!r}: {', '.join(str(p) for p in paths)}")
    return 0


def cmd_pki_nbd_psk(args: argparse.Namespace) -> int:
    try:
        add_key(Path(args.file), args.name)
    except PskError as e:
        raise CliError(str(e)) from None
    print(f"added a TLS-PSK key for {args.name!r} to {args.file} (mode 0600; give it to the client, "
          f"e.g. as qemu's DIR/keys.psk or libnbd's tls-psk-file)")
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
    res = replay.replay(cfg, args.cg, out, args.upto, force=args.force)
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
    s.add_argument("--peer", metavar="CN", action="append", default=[],
                   help="also accept batches from this certificate name (besides [appliance] peers), "
                        "e.g. host for the net transport")
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
    s.add_argument("--force", action="store_true", help="replace existing images in DIR")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_journal_replay)

    pp = sub.add_parser("pki", parents=[common], help="certificates and keys of this deployment").add_subparsers(
        dest="sub", metavar="SUBCOMMAND", required=True)
    s = pp.add_parser("init", parents=[common], help="create the CA, certificates and batch key (idempotent)")
    s.add_argument("--appliance-name", action="append", metavar="NAME",
                   help="extra DNS name or IP for the appliance certificate (repeatable)")
    s.set_defaults(func=cmd_pki_init)
    s = pp.add_parser("nbd-client", parents=[common],
                      help="issue a client certificate for NBD over TLS into DIR (ca-cert.pem, client-cert.pem, client-key.pem)")
    s.add_argument("dir", metavar="DIR", help="a new or empty directory (libnbd --tls-certificates, qemu tls-creds-x509 dir)")
    s.add_argument("--name", default="nbd-client", help="the certificate's CN (see [host] tls_clients)")
    s.set_defaults(func=cmd_pki_nbd_client)
    s = pp.add_parser("nbd-psk", parents=[common],
                      help="add a random pre-shared key for NBD over TLS-PSK to FILE (psktool format, mode 0600)")
    s.add_argument("file", metavar="FILE", help="the key file ([host] tls_psk; created if missing)")
    s.add_argument("--name", required=True, help="the client's PSK identity (user name)")
    s.set_defaults(func=cmd_pki_nbd_psk)
