"""Appliance commands for the ``nicsplit`` CLI (wired in by control/cli.py).

    nicsplit appliance run [--listen HOST:PORT]
    nicsplit journal dump CG [--json] [--from SEQ] [--upto SEQ]
    nicsplit journal replay CG --out DIR [--upto SEQ] [--json]
    nicsplit pki init [--appliance-name NAME ...]

``add_parsers(sub, common)`` registers them on an argparse subparsers object;
each command raises ``nicsplit.control.cli.CliError`` (one line, exit 1) on
user-facing failures.  Configuration: the ``[appliance]`` table of
nicsplit.toml, documented in DEFAULT_TOML (nicsplit.control.config).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import functools
import json
import os
from pathlib import Path
from typing import Any, Callable

from nicsplit.control import config as cfgmod
from nicsplit.control.config import parse_listen, parse_size

DEFAULT_LISTEN = "127.0.0.1:10810"

# The documented [appliance] section lives in nicsplit.control.config.DEFAULT_TOML.

_OP_NAMES = {1: "write", 2: "zero", 3: "trim", 4: "barrier"}


def _cli_errors(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn appliance / PKI errors into the CLI's one-line CliError."""

    @functools.wraps(fn)
    def wrapper(args: argparse.Namespace) -> int:
        from nicsplit.appliance.journal import JournalError
        from nicsplit.control.cli import CliError
        from nicsplit.control.pki import PkiError

        try:
            return fn(args)
        except (JournalError, PkiError) as e:
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
    known = {"listen", "pki", "peers", "encryption", "segment_size", "heartbeat_interval", "idle_timeout", "queue_depth"}
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
    )


# -- commands ----------------------------------------------------------------------


@_cli_errors
def cmd_appliance_run(args: argparse.Namespace) -> int:
    from nicsplit.appliance.server import run

    cfg = cfgmod.load(cfgmod.data_dir(args.data))
    return run(server_config(cfg, args.listen))


@_cli_errors
def cmd_pki_init(args: argparse.Namespace) -> int:
    from nicsplit.control.pki import init_pki

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
    from nicsplit.appliance.journal import Journal
    from nicsplit.control.cli import CliError

    path = journal_dir(cfg.data, cg)
    if not path.is_dir():
        raise CliError(f"no journal for CG {cg!r} (looked in {path})")
    return Journal.open(path, readonly=True)


@_cli_errors
def cmd_journal_dump(args: argparse.Namespace) -> int:
    cfg = cfgmod.load(cfgmod.data_dir(args.data))
    names: dict[int, str] = {}
    if (cfg.datastore_dir / "catalog.json").exists():
        names = {v.id: v.name for v in _catalog(cfg)}
    with _open_journal(cfg, args.cg) as j:
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
        return 0
    if not rows:
        print(f"journal {args.cg} holds no records")
    for row in rows:
        print(f"{row['seq']:>10} {row['vdisk']:<24} {row['op']:<8} offset={row['offset']:<14} "
              f"length={row['length']:<10} time={row['time']:.6f}")
    return 0


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _zero_range(fd: int, offset: int, length: int) -> None:
    """Make [offset, offset+length) read as zeros: punch a hole (sparse), or
    write zeros where the filesystem cannot punch."""
    if length <= 0:
        return
    rc = _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, ctypes.c_int64(offset), ctypes.c_int64(length))
    if rc == 0:
        return
    zeros = bytes(1 << 20)
    end = offset + length
    while offset < end:
        n = min(len(zeros), end - offset)
        os.pwrite(fd, zeros[:n], offset)
        offset += n


@_cli_errors
def cmd_journal_replay(args: argparse.Namespace) -> int:
    """Apply the journal in seq order onto fresh raw images, one per vdisk."""
    from nicsplit.control.cli import CliError

    cfg = cfgmod.load(cfgmod.data_dir(args.data))
    if not (cfg.datastore_dir / "catalog.json").exists():
        raise CliError(f"no datastore catalog in {cfg.datastore_dir}: replay needs the vdisk sizes")
    by_id = {v.id: v for v in _catalog(cfg)}
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
                    _zero_range(fd, rec.offset, rec.length)
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
    """Register ``appliance run``, ``journal dump``, ``journal replay`` and
    ``pki init`` on the ``nicsplit`` subparsers object ``sub``."""
    ap = sub.add_parser("appliance", parents=[common], help="the protection appliance").add_subparsers(
        dest="sub", metavar="SUBCOMMAND", required=True)
    s = ap.add_parser("run", parents=[common], help="receive batches from cards and journal them (foreground)")
    s.add_argument("--listen", metavar="HOST:PORT", help=f"default {DEFAULT_LISTEN}")
    s.set_defaults(func=cmd_appliance_run)

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
