"""Read a CG's journal record by record: list it (`dump`) or apply it in seq
order onto fresh raw images, one per vdisk (`replay`).

Both open the journal read-only and stop at damage: what is before the
damage is still listed or replayed (docs/recovery.md §9); `replay` refuses
to reach past it before any image is created.

Example::

    replay(cfg, "cg1", Path("/tmp/out"), upto=1200)   # /tmp/out/<vdisk>.raw
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from nicsplit.core.config import Config
from nicsplit.core.fsutil import punch_hole
from nicsplit.core.layout import Layout
from nicsplit.core.records import Op, WFlag
from nicsplit.core.catalog import open_catalog
from nicsplit.journal.writer import Journal
from nicsplit.recovery.errors import RecoveryError
from nicsplit.recovery.target import check_target, new_temp, publish

OP_NAMES = {int(Op.WRITE): "write", int(Op.ZERO): "zero", int(Op.TRIM): "trim", int(Op.BARRIER): "barrier"}


def open_journal(cfg: Config, cg: str) -> Journal:
    """The CG's journal, read-only, stopping at damage (``.damage`` says where)."""
    path = Layout(cfg.data).journal(cg)
    if not path.is_dir():
        raise RecoveryError(f"no journal for CG {cg!r} (looked in {path})")
    return Journal.open(path, readonly=True, stop_at_damage=True)


def dump(cfg: Config, cg: str, from_seq: int = 1, upto: int | None = None) -> tuple[list[dict[str, Any]], str | None]:
    """The records from ``from_seq`` to ``upto`` as `journal dump --json`
    rows, and the damage that stopped the listing (None when whole)."""
    names: dict[int, str] = {}
    if Layout(cfg.data).catalog.exists():
        names = {v.id: v.name for v in open_catalog(cfg.datastore_dir).vdisks()}
    with open_journal(cfg, cg) as j:
        damage = j.damage
        rows = [{"seq": r.seq, "vdisk": names.get(r.vdisk_id, f"#{r.vdisk_id}"), "offset": r.offset,
                 "length": r.length, "op": OP_NAMES.get(r.op, str(r.op)), "time": r.time_ns / 1e9,
                 "gap": bool(r.flags & WFlag.GAP)}
                for r in j.iter_records(from_seq, upto)]
    return rows, damage


def replay(cfg: Config, cg: str, out: Path, upto: int | None = None, *, force: bool = False) -> dict[str, Any]:
    """Apply the journal up to ``upto`` onto ``out/<vdisk>.raw``; the result
    as `journal replay --json` prints it (records, last_seq, images).
    Each image is written to a temp file made with O_EXCL and put under its
    name at the end (`nicsplit.recovery.target`): an existing image is
    replaced only with ``force``; a symbolic link or device is refused."""
    if not Layout(cfg.data).catalog.exists():
        raise RecoveryError(f"no datastore catalog in {cfg.datastore_dir}: replay needs the vdisk sizes")
    by_id = {v.id: v for v in open_catalog(cfg.datastore_dir).vdisks()}
    with open_journal(cfg, cg) as j:  # refuse a damaged range before any image is created
        if j.damage and (upto is None or upto > j.last_seq):
            raise RecoveryError(f"{j.damage}; replay can reach seq {j.last_seq} at most (--upto {j.last_seq})")
        vids = {v.id for v in by_id.values() if v.extra.get("cg") == cg}  # an image even without records
        vids |= {r.vdisk_id for r in j.iter_records(1, upto)}
    out = Path(out)
    if out.is_symlink():
        raise RecoveryError(f"{out} is a symbolic link (to {os.readlink(out)}); refusing to write through it: "
                            "give the real path")
    out.mkdir(parents=True, exist_ok=True)
    for vid in sorted(vids):  # refuse before anything is written
        v = by_id.get(vid)
        if v is None:
            raise RecoveryError(f"journal {cg} has records of vdisk id {vid}, which is not in the catalog")
        check_target(out / f"{v.name}.raw", force=force)
    fds: dict[int, tuple[int, Path]] = {}

    def image(vid: int) -> int:
        got = fds.get(vid)
        if got is None:
            v = by_id[vid]
            got = new_temp(out / f"{v.name}.raw")
            fds[vid] = got
            os.ftruncate(got[0], v.size)
        return got[0]

    count = last = 0
    try:
        for vid in sorted(vids):
            image(vid)
        with open_journal(cfg, cg) as j:
            for rec, payload in j.records(1, upto):
                fd = image(rec.vdisk_id)
                size = by_id[rec.vdisk_id].size
                if rec.offset + rec.length > size:
                    raise RecoveryError(f"record seq {rec.seq}: {rec.offset}+{rec.length} is past the end of "
                                        f"vdisk {by_id[rec.vdisk_id].name} ({size} bytes)")
                if rec.op == Op.WRITE:
                    os.pwrite(fd, payload, rec.offset)
                elif rec.op in (Op.ZERO, Op.TRIM):
                    punch_hole(fd, rec.offset, rec.length)
                count += 1
                last = rec.seq
        for fd, _ in fds.values():
            os.fsync(fd)
        for vid, (fd, tmp) in list(fds.items()):
            os.close(fd)
            fds[vid] = (-1, tmp)
        for vid, (_, tmp) in list(fds.items()):
            publish(tmp, out / f"{by_id[vid].name}.raw", force=force)
            del fds[vid]
    finally:
        for fd, tmp in fds.values():
            if fd >= 0:
                os.close(fd)
            if os.path.lexists(tmp):
                tmp.unlink()
    images = {by_id[vid].name: str(out / f"{by_id[vid].name}.raw") for vid in sorted(vids)}
    return {"records": count, "last_seq": last, "images": images}
