"""The one place that knows every path under a data directory.

Every process (supervisor, host, card, appliance) and every command finds its
files through a `Layout`, so moving a file is a change here and nowhere else.
The tree, with who writes what:

    DATA/
      nicsplit.toml                 configuration (nicsplit init)
      cgs.json, cgs.lock            consistency groups (the CLI, under the lock)
      pki/                          CA, certificates, batch key (nicsplit init)
      pki/api.token                 the console API's bearer token (nicsplit init)
      datastore/                    vdisk volumes and catalog.json (the host)
      host/cg-seq/CG.json           next cg_seq per CG (the host)
      host/marking/UUID.bitmap      dirty regions of a vdisk in marking (the host)
      host/marking/UUID.state.json  protected or marking, since, reason (the host)
      host/activity.log             extents with writes in flight: the activity log (the host)
      run/                          sockets, pid files, logs of running processes
      run/card-lost.jsonl           writes the card could not ship (the card)
      run/card-overflow.log         ring entries the card took while behind (the card)
      run/images/ID.json            image-access registry (the appliance)
      run/console.json              the console's address and endpoints (the console)
      appliance/id                  appliance identity
      appliance/at-rest.key         at-rest keyring
      appliance/journal/CG/         journal segments of a CG
      appliance/bookmarks/CG.json   bookmarks of a CG
      appliance/replicas/CG/        replica images vdisk+ID.img, state.json, undo.log, vdisks.json
      appliance/base/CG/            base images vID.img left by retention
      appliance/failover/CG.json    failover state of a CG
      appliance/failover/CG/        failover dirty bitmaps vdisk+ID.dirty of a CG

Per-vdisk files are keyed by the vdisk *id* (catalog ``next_id``: never
reused), never by its name: a vdisk deleted and created again under the same
name is another vdisk, and must not find the old one's replica image or
bitmap (issue 11 item 4). ``vdisk+ID`` cannot be a vdisk name (``+`` is not
in the catalog's NAME_RE), so `migrate_name_keyed` can tell the old
name-keyed files (``NAME.img``) from the new ones and rename them on open.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from nicsplit.core.fsutil import fsync_dir

log = logging.getLogger(__name__)

CONFIG_NAME = "nicsplit.toml"
KEYRING_NAME = "at-rest.key"
CATALOG_NAME = "catalog.json"
CATALOG_LOCK_NAME = "catalog.lock"


class _Under:
    """A fixed path of the tree: ``name`` under the path attribute ``parent``
    (a `Layout` class attribute, read like a property)."""

    def __init__(self, parent: str, name: str, doc: str | None = None) -> None:
        self.parent, self.name, self.__doc__ = parent, name, doc

    def __get__(self, layout: Any, owner: type | None = None) -> Path:
        if layout is None:
            return self  # type: ignore[return-value]  # the descriptor itself, on the class
        return getattr(layout, self.parent) / self.name


def _sock_name(process: str) -> str:
    return f"{process}.sock"


@dataclass(frozen=True, slots=True)
class Layout:
    data: Path

    def __init__(self, data: Path | str) -> None:
        object.__setattr__(self, "data", Path(data))

    # --- top level
    config = _Under("data", CONFIG_NAME)
    cgs = _Under("data", "cgs.json")
    cgs_lock = _Under("data", "cgs.lock")
    pki = _Under("data", "pki")
    api_token = _Under("pki", "api.token")
    datastore = _Under("data", "datastore")
    catalog = _Under("datastore", CATALOG_NAME)
    catalog_lock = _Under("datastore", CATALOG_LOCK_NAME)

    # --- host state
    host = _Under("data", "host")
    marking = _Under("host", "marking")
    activity_log = _Under("host", "activity.log")

    def cg_seq(self, cg: str) -> Path:
        return self.host / "cg-seq" / f"{cg}.json"

    def marking_bitmap(self, vdisk_uuid: str) -> Path:
        return self.marking / f"{vdisk_uuid}.bitmap"

    # --- running processes
    run = _Under("data", "run")
    card_lost_log = _Under("run", "card-lost.jsonl",
                           "Writes the card acknowledged but could not ship (nicsplit.card.lostlog).")
    card_overflow = _Under("run", "card-overflow.log",
                           "The card's ordered overflow log (nicsplit.card.overflow).")
    images_run = _Under("run", "images")
    console_info = _Under("run", "console.json", "The console's address and endpoints (nicsplit.console.server).")

    def sock(self, name: str) -> Path:
        """Control socket of a process: host, card-ctl, appliance."""
        return self.run / _sock_name(name)

    def pid(self, name: str) -> Path:
        """Pid file of a process: up, host, card, appliance."""
        return self.run / f"{name}.pid"

    def log(self, name: str) -> Path:
        """Log (stderr) of a process `nicsplit up` supervises: host, card, appliance."""
        return self.run / f"{name}.log"

    def image_log(self, image_id: str) -> Path:
        return self.run / f"image-{image_id}.log"

    host_sock = _Under("run", _sock_name("host"))
    card_sock = _Under("run", _sock_name("card"), "The splitter's transport endpoint (the ring's rendezvous).")
    card_ctl_sock = _Under("run", _sock_name("card-ctl"))
    appliance_sock = _Under("run", _sock_name("appliance"))

    # --- appliance
    appliance = _Under("data", "appliance")
    appliance_id = _Under("appliance", "id")
    keyring = _Under("appliance", KEYRING_NAME)
    journals = _Under("appliance", "journal")
    replicas = _Under("appliance", "replicas")
    bases = _Under("appliance", "base")
    failovers = _Under("appliance", "failover")

    def journal(self, cg: str) -> Path:
        return self.journals / cg

    def bookmarks(self, cg: str) -> Path:
        return self.appliance / "bookmarks" / f"{cg}.json"

    def replica(self, cg: str) -> Path:
        return self.replicas / cg

    def replica_lock(self, cg: str) -> Path:
        return self.replicas / f"{cg}.lock"

    def base(self, cg: str) -> Path:
        return self.bases / cg

    def failover_state(self, cg: str) -> Path:
        return self.failovers / f"{cg}.json"

    def failover_dir(self, cg: str) -> Path:
        return self.failovers / cg


VDISK_FILE_PREFIX = "vdisk+"  # "+" is in no vdisk name: core.catalog.NAME_RE


def vdisk_file(directory: Path | str, vdisk_id: int, suffix: str) -> Path:
    """The file of vdisk ``vdisk_id`` in a per-CG directory (replica images
    ``.img``, failover dirty bitmaps ``.dirty``): ``vdisk+ID<suffix>``."""
    return Path(directory) / f"{VDISK_FILE_PREFIX}{int(vdisk_id)}{suffix}"


def migrate_name_keyed(directory: Path | str, vdisks: Iterable[Any], suffix: str,
                       sidecars: tuple[str, ...] = ()) -> list[str]:
    """Rename the old layout's ``NAME<suffix>`` (and ``NAME<suffix><sidecar>``)
    files in ``directory`` to `vdisk_file` names, for the vdisks (``id``,
    ``name``) given; idempotent, and safe to repeat after a crash part-way
    (each piece moves on its own; sidecars first, so the main file, whose
    presence marks an unmigrated vdisk, moves last). A name that belongs to
    several of the given vdisks (deleted and created again: their files were
    one file) is not renamed: returned, for the caller to decide. Files of
    names none of ``vdisks`` has are left alone."""
    d = Path(directory)
    if not d.is_dir():
        return []
    owners: dict[str, set[int]] = {}
    for v in vdisks:
        owners.setdefault(v.name, set()).add(int(v.id))
    legacy: set[str] = set()
    for p in d.iterdir():
        n = p.name
        if n.startswith(VDISK_FILE_PREFIX):
            continue
        for tail in (suffix, *(suffix + s for s in sidecars)):
            if n.endswith(tail) and n[: -len(tail)] in owners:
                legacy.add(n[: -len(tail)])
    shared, moved = [], False
    for name in sorted(legacy):
        ids = owners[name]
        if len(ids) != 1:
            shared.append(name)
            continue
        (vid,) = ids
        for tail in (*(suffix + s for s in sidecars), suffix):  # the main file last
            old = d / f"{name}{tail}"
            new = d / f"{VDISK_FILE_PREFIX}{vid}{tail}"
            if old.exists() and not new.exists():
                os.rename(old, new)
                moved = True
                log.info("%s: renamed %s to %s (per-vdisk files are keyed by id)", d, old.name, new.name)
    if moved:
        fsync_dir(d)
    return shared


class InDataDir:
    """Base of the configurations rooted at a data directory (``data``):
    every path under it comes from `layout`; ``run_dir`` (sockets, pid
    files, logs) is the one every process needs."""

    __slots__ = ()
    data: Path

    @property
    def layout(self) -> Layout:
        return Layout(self.data)

    @property
    def run_dir(self) -> Path:
        return self.layout.run
