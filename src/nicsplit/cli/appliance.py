"""Appliance commands for the ``nicsplit`` CLI (wired in by control/cli.py).

    nicsplit appliance run [--listen HOST:PORT]
    nicsplit appliance keys [--json]              at-rest keys and the segments and image blocks using each
    nicsplit appliance rotate-key [--json]        a new at-rest key, active for new segments and images
    nicsplit appliance retire-key ID [--json]     remove a key nothing uses any more
    nicsplit journal dump CG [--json] [--from SEQ] [--upto SEQ]
    nicsplit journal replay CG --out DIR [--upto SEQ] [--json]
    nicsplit pki init [--appliance-name NAME ...]

``add_parsers(sub, common)`` registers them on an argparse subparsers object;
each command raises ``nicsplit.cli.main.CliError`` (one line, exit 1) on
user-facing failures.  Configuration: the ``[appliance]`` table of
nicsplit.toml, documented in DEFAULT_TOML (nicsplit.core.config).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from nicsplit.core import config as cfgmod
from nicsplit.core.fsutil import punch_hole
from nicsplit.core.config import parse_listen, parse_size

DEFAULT_LISTEN = "127.0.0.1:10810"

# The documented [appliance] section lives in nicsplit.core.config.DEFAULT_TOML.

_OP_NAMES = {1: "write", 2: "zero", 3: "trim", 4: "barrier"}


def _cli_errors(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn appliance / PKI errors into the CLI's one-line CliError."""

    @functools.wraps(fn)
    def wrapper(args: argparse.Namespace) -> int:
        from nicsplit.storage.atrest import AtRestError
        from nicsplit.journal.writer import JournalError
        from nicsplit.cli.main import CliError
        from nicsplit.core.pki import PkiError

        try:
            return fn(args)
        except (JournalError, PkiError, AtRestError) as e:
            raise CliError(str(e)) from None

    return wrapper


def _section(cfg: cfgmod.Config) -> dict[str, Any]:
    sec = cfg.raw.get("appliance", {})
    if not isinstance(sec, dict):
        raise cfgmod.ConfigError(f"{cfg.data / cfgmod.CONFIG_NAME}: [appliance] must be a table")
    return sec


def _pki_dir(cfg: cfgmod.Config) -> Path:
    p = Path(str(_section(cfg).get("pki", "pki")))
    return p if p.is_absolute() else cfg.data / p


def journal_dir(data: Path, cg: str) -> Path:
    return Path(data) / "appliance" / "journal" / cg


def server_config(cfg: cfgmod.Config, listen: str | None = None):
    """The ServerConfig for a data directory (``[appliance]`` + overrides)."""
    from nicsplit.appliance.server import ServerConfig

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
    from nicsplit.recovery.retention import Policy, RetentionError

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


@_cli_errors
def cmd_appliance_run(args: argparse.Namespace) -> int:
    from nicsplit.storage import atrest
    from nicsplit.appliance.server import run

    cfg = cfgmod.load(cfgmod.data_dir(args.data))
    scfg = server_config(cfg, args.listen)
    # The keyring says what the journals do (they read it themselves, also
    # while running): make it match the configuration before any opens.
    atrest.ensure(atrest.keyring_path(cfg.data), at_rest_encryption(cfg))
    return run(scfg)


def _key_use(data: Path) -> tuple[dict[int, dict[str, int]], list[str]]:
    """{key id: {cg: segments}} over every journal, and unreadable headers."""
    from nicsplit.journal.reader import segment_key_ids

    use: dict[int, dict[str, int]] = {}
    bad: list[str] = []
    root = Path(data) / "appliance" / "journal"
    for jd in sorted(root.iterdir()) if root.is_dir() else []:
        if not jd.is_dir():
            continue
        ids, unreadable = segment_key_ids(jd)
        for k, n in ids.items():
            use.setdefault(k, {})[jd.name] = n
        bad += [f"{jd.name}/{name}" for name in unreadable]
    return use, bad


def _image_key_use(data: Path) -> dict[int, dict[str, int]]:
    """{key id: {"<cg>/<replicas|base>": blocks or undo entries}} over every
    sealed replica and base image and every replica's undo log."""
    from nicsplit.recovery.replica import undo_key_usage
    from nicsplit.storage.image import open_image
    from nicsplit.storage.sealing import tags_path

    from nicsplit.storage import atrest

    use: dict[int, dict[str, int]] = {}
    kr = atrest.keyring_in(Path(data) / "appliance")  # opening a sealed image checks its header's keys

    def add(k: int, where: str, n: int) -> None:
        use.setdefault(k, {})[where] = use.get(k, {}).get(where, 0) + n

    for kind in ("replicas", "base"):
        root = Path(data) / "appliance" / kind
        for d in sorted(root.iterdir()) if root.is_dir() else []:
            if not d.is_dir():
                continue
            for p in sorted(d.glob("*.img")):
                if not tags_path(p).exists():
                    continue  # a raw image (written while at-rest encryption was off)
                with open_image(p, p.stat().st_size, kr, writable=False) as img:
                    for k, n in img.key_usage().items():
                        add(k, f"{d.name}/{kind}", n)
            if kind == "replicas":
                for k, n in undo_key_usage(d / "undo.log").items():
                    add(k, f"{d.name}/{kind}", n)
    return use


@_cli_errors
def cmd_appliance_keys(args: argparse.Namespace) -> int:
    """The at-rest keys and which journal segments use each: a key with no
    segments (and not active) can be retired."""
    from nicsplit.storage import atrest

    cfg = cfgmod.load(cfgmod.data_dir(args.data))
    path = atrest.keyring_path(cfg.data)
    kr = atrest.Keyring.load(path) if path.exists() else None
    use, bad = _key_use(cfg.data)
    iuse = _image_key_use(cfg.data)
    keys = [{"id": k.id, "created": k.created, "active": kr.active == k.id, "segments": sum(use.get(k.id, {}).values()),
             "journals": use.get(k.id, {}), "image_blocks": sum(iuse.get(k.id, {}).values()),
             "images": iuse.get(k.id, {})} for k in (kr.keys() if kr else [])]
    missing = sorted(k for k in set(use) | set(iuse) if k and (kr is None or not kr.has(k)))
    out = {"keyring": str(path) if kr else None, "enabled": at_rest_encryption(cfg), "active": kr.active if kr else None,
           "keys": keys, "clear_segments": sum(use.get(0, {}).values()), "missing_keys": missing,
           "unreadable_headers": bad}
    if args.json:
        print(json.dumps(out))
        return 0
    if kr is None:
        print(f"no at-rest keyring ({path}); journal segments are written in clear")
    for k in keys:
        state = "active" if k["active"] else (
            "in use" if k["segments"] or k["image_blocks"] else "unused: can be retired")
        print(f"key {k['id']:>4}  created {_when(k['created'])}  {k['segments']:>6} segment(s)  "
              f"{k['image_blocks']:>9} image block(s) and undo entries  {state}")
    print(f"{out['clear_segments']} segment(s) in clear")
    for k in missing:
        print(f"warning: segments or images use key {k}, which the keyring does not hold: they cannot be read",
              file=sys.stderr)
    return 0


def _when(t: float) -> str:
    import datetime as _dt

    return _dt.datetime.fromtimestamp(t).isoformat(timespec="seconds")


@_cli_errors
def cmd_appliance_rotate_key(args: argparse.Namespace) -> int:
    """Add an at-rest key; new journal segments use it from the next segment
    each journal starts (a running appliance re-reads the keyring)."""
    from nicsplit.storage import atrest
    from nicsplit.cli.main import CliError

    cfg = cfgmod.load(cfgmod.data_dir(args.data))
    if not at_rest_encryption(cfg):
        raise CliError("[appliance] at_rest_encryption is false: the appliance would deactivate the key at its "
                       "next start; turn it on first")
    new, old = atrest.rotate(atrest.keyring_path(cfg.data))
    if args.json:
        print(json.dumps({"key_id": new, "previous": old}))
    else:
        print(f"at-rest key {new} is active for new journal segments" + (f" (was key {old})" if old else ""))
    return 0


@_cli_errors
def cmd_appliance_retire_key(args: argparse.Namespace) -> int:
    from nicsplit.storage import atrest
    from nicsplit.cli.main import CliError

    cfg = cfgmod.load(cfgmod.data_dir(args.data))
    use, bad = _key_use(cfg.data)
    if bad:
        raise CliError(f"cannot tell which key {bad[0]} uses (unreadable segment header): not retiring any key")
    in_use = {k: sum(v.values()) for k, v in use.items()}
    for k, v in _image_key_use(cfg.data).items():  # images re-sealed after a rotation by the appliance
        in_use[k] = in_use.get(k, 0) + sum(v.values())
    atrest.retire(atrest.keyring_path(cfg.data), args.key_id, in_use)
    if args.json:
        print(json.dumps({"retired": args.key_id}))
    else:
        print(f"at-rest key {args.key_id} retired")
    return 0


@_cli_errors
def cmd_pki_init(args: argparse.Namespace) -> int:
    from nicsplit.core.pki import init_pki

    data = cfgmod.data_dir(args.data)
    cfg = cfgmod.load(data)
    d = _pki_dir(cfg)
    created = init_pki(d, appliance_names=tuple(args.appliance_name or ()))
    print(f"created {', '.join(created)} in {d}" if created else f"{d} is complete; nothing created")
    return 0


def _catalog(cfg: cfgmod.Config) -> list[Any]:
    from nicsplit.host.datastore import Datastore

    return Datastore.open(cfg.datastore_dir).list_vdisks()


def _open_journal(cfg: cfgmod.Config, cg: str):
    from nicsplit.journal.writer import Journal
    from nicsplit.cli.main import CliError

    path = journal_dir(cfg.data, cg)
    if not path.is_dir():
        raise CliError(f"no journal for CG {cg!r} (looked in {path})")
    # A damaged journal: what is before the damage is still listed / replayed (docs/recovery.md §9).
    return Journal.open(path, readonly=True, stop_at_damage=True)


@_cli_errors
def cmd_journal_dump(args: argparse.Namespace) -> int:
    cfg = cfgmod.load(cfgmod.data_dir(args.data))
    names: dict[int, str] = {}
    if (cfg.datastore_dir / "catalog.json").exists():
        names = {v.id: v.name for v in _catalog(cfg)}
    with _open_journal(cfg, args.cg) as j:
        damage = j.damage
        rows = [
            {
                "seq": r.seq,
                "vdisk": names.get(r.vdisk_id, f"#{r.vdisk_id}"),
                "offset": r.offset,
                "length": r.length,
                "op": _OP_NAMES.get(r.op, str(r.op)),
                "time": r.time_ns / 1e9,
            }
            for r in j.iter_records(args.from_seq, args.upto)
        ]
    if args.json:
        print(json.dumps({"records": rows}))
    else:
        if not rows:
            print(f"journal {args.cg} holds no records")
        for row in rows:
            print(f"{row['seq']:>10} {row['vdisk']:<24} {row['op']:<8} offset={row['offset']:<14} "
                  f"length={row['length']:<10} time={row['time']:.6f}")
    if damage:
        from nicsplit.cli.main import CliError

        sys.stdout.flush()
        raise CliError(f"{damage}; the records after it are not listed")
    return 0




@_cli_errors
def cmd_journal_replay(args: argparse.Namespace) -> int:
    """Apply the journal in seq order onto fresh raw images, one per vdisk."""
    from nicsplit.cli.main import CliError

    cfg = cfgmod.load(cfgmod.data_dir(args.data))
    if not (cfg.datastore_dir / "catalog.json").exists():
        raise CliError(f"no datastore catalog in {cfg.datastore_dir}: replay needs the vdisk sizes")
    by_id = {v.id: v for v in _catalog(cfg)}
    with _open_journal(cfg, args.cg) as j:  # refuse a damaged range before any image is created
        if j.damage and (args.upto is None or args.upto > j.last_seq):
            raise CliError(f"{j.damage}; replay can reach seq {j.last_seq} at most (--upto {j.last_seq})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fds: dict[int, int] = {}

    def image(vid: int) -> int:
        fd = fds.get(vid)
        if fd is None:
            v = by_id.get(vid)
            if v is None:
                raise CliError(f"journal {args.cg} has records of vdisk id {vid}, which is not in the catalog")
            fd = os.open(out / f"{v.name}.raw", os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            os.ftruncate(fd, v.size)
            fds[vid] = fd
        return fd

    for v in by_id.values():  # vdisks the catalog puts in this CG get an image even without records
        if v.extra.get("cg") == args.cg:
            image(v.id)
    count = last = 0
    try:
        with _open_journal(cfg, args.cg) as j:
            for rec, payload in j.records(1, args.upto):
                fd = image(rec.vdisk_id)
                size = by_id[rec.vdisk_id].size
                if rec.offset + rec.length > size:
                    raise CliError(f"record seq {rec.seq}: {rec.offset}+{rec.length} is past the end of "
                                   f"vdisk {by_id[rec.vdisk_id].name} ({size} bytes)")
                if rec.op == 1:
                    os.pwrite(fd, payload, rec.offset)
                elif rec.op in (2, 3):
                    punch_hole(fd, rec.offset, rec.length)
                count += 1
                last = rec.seq
        for fd in fds.values():
            os.fsync(fd)
    finally:
        for fd in fds.values():
            os.close(fd)
    images = {by_id[vid].name: str(out / f"{by_id[vid].name}.raw") for vid in fds}
    if args.json:
        print(json.dumps({"records": count, "last_seq": last, "images": images}))
    else:
        print(f"replayed {count} records (up to seq {last}) into {out}: {', '.join(sorted(images)) or 'no images'}")
    return 0


# -- parsers -------------------------------------------------------------------------


def _seq(value: str) -> int:
    if not value.isdigit() or int(value) < 0:
        raise argparse.ArgumentTypeError(f"bad sequence number {value!r}")
    return int(value)


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
    s.add_argument("--from", dest="from_seq", type=_seq, default=1, metavar="SEQ")
    s.add_argument("--upto", type=_seq, default=None, metavar="SEQ")
    s.set_defaults(func=cmd_journal_dump)
    s = jp.add_parser("replay", parents=[common], help="apply a CG's journal onto raw images, one per vdisk")
    s.add_argument("cg")
    s.add_argument("--out", required=True, metavar="DIR")
    s.add_argument("--upto", type=_seq, default=None, metavar="SEQ")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_journal_replay)

    pp = sub.add_parser("pki", parents=[common], help="certificates and keys of this deployment").add_subparsers(
        dest="sub", metavar="SUBCOMMAND", required=True)
    s = pp.add_parser("init", parents=[common], help="create the CA, certificates and batch key (idempotent)")
    s.add_argument("--appliance-name", action="append", metavar="NAME",
                   help="extra DNS name or IP for the appliance certificate (repeatable)")
    s.set_defaults(func=cmd_pki_init)
