"""The one place that knows every path under a data directory.

Every process (supervisor, host, card, appliance) and every command finds its
files through a `Layout`, so moving a file is a change here and nowhere else.
The tree, with who writes what:

    DATA/
      nicsplit.toml                 configuration (nicsplit init)
      cgs.json, cgs.lock            consistency groups (the CLI, under the lock)
      pki/                          CA, certificates, batch key (nicsplit init)
      datastore/                    vdisk volumes and catalog.json (the host)
      host/cg-seq/CG.json           next cg_seq per CG (the host)
      host/marking/UUID.bitmap      dirty regions of a vdisk in marking (the host)
      host/marking/UUID.state.json  protected or marking, since, reason (the host)
      run/                          sockets, pid files, logs of running processes
      run/card-lost.jsonl           writes the card could not ship (the card)
      run/images/ID.json            image-access registry (the appliance)
      appliance/id                  appliance identity
      appliance/at-rest.key         at-rest keyring
      appliance/journal/CG/         journal segments of a CG
      appliance/bookmarks/CG.json   bookmarks of a CG
      appliance/replicas/CG/        replica images, state.json, undo.log
      appliance/base/CG/            base images left by retention
      appliance/failover/CG.json    failover state of a CG
      appliance/failover/CG/        failover overlays of a CG
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CONFIG_NAME = "nicsplit.toml"
KEYRING_NAME = "at-rest.key"
CATALOG_NAME = "catalog.json"
CATALOG_LOCK_NAME = "catalog.lock"


@dataclass(frozen=True, slots=True)
class Layout:
    data: Path

    def __init__(self, data: Path | str) -> None:
        object.__setattr__(self, "data", Path(data))

    # --- top level
    @property
    def config(self) -> Path:
        return self.data / CONFIG_NAME

    @property
    def cgs(self) -> Path:
        return self.data / "cgs.json"

    @property
    def cgs_lock(self) -> Path:
        return self.data / "cgs.lock"

    @property
    def pki(self) -> Path:
        return self.data / "pki"

    @property
    def datastore(self) -> Path:
        return self.data / "datastore"

    @property
    def catalog(self) -> Path:
        return self.datastore / CATALOG_NAME

    @property
    def catalog_lock(self) -> Path:
        return self.datastore / CATALOG_LOCK_NAME

    # --- host state
    @property
    def host(self) -> Path:
        return self.data / "host"

    def cg_seq(self, cg: str) -> Path:
        return self.host / "cg-seq" / f"{cg}.json"

    @property
    def marking(self) -> Path:
        return self.host / "marking"

    def marking_bitmap(self, vdisk_uuid: str) -> Path:
        return self.marking / f"{vdisk_uuid}.bitmap"

    # --- running processes
    @property
    def run(self) -> Path:
        return self.data / "run"

    def sock(self, name: str) -> Path:
        """Control socket of a process: host, card-ctl, appliance."""
        return self.run / f"{name}.sock"

    def pid(self, name: str) -> Path:
        """Pid file of a process: up, host, card, appliance."""
        return self.run / f"{name}.pid"

    def log(self, name: str) -> Path:
        """Log (stderr) of a process `nicsplit up` supervises: host, card, appliance."""
        return self.run / f"{name}.log"

    @property
    def host_sock(self) -> Path:
        return self.sock("host")

    @property
    def card_sock(self) -> Path:
        """The splitter's transport endpoint (the ring's rendezvous)."""
        return self.sock("card")

    @property
    def card_ctl_sock(self) -> Path:
        return self.sock("card-ctl")

    @property
    def appliance_sock(self) -> Path:
        return self.sock("appliance")

    @property
    def card_lost_log(self) -> Path:
        """Writes the card acknowledged but could not ship (nicsplit.card.lostlog)."""
        return self.run / "card-lost.jsonl"

    @property
    def images_run(self) -> Path:
        return self.run / "images"

    def image_log(self, image_id: str) -> Path:
        return self.run / f"image-{image_id}.log"

    # --- appliance
    @property
    def appliance(self) -> Path:
        return self.data / "appliance"

    @property
    def appliance_id(self) -> Path:
        return self.appliance / "id"

    @property
    def keyring(self) -> Path:
        return self.appliance / KEYRING_NAME

    @property
    def journals(self) -> Path:
        return self.appliance / "journal"

    def journal(self, cg: str) -> Path:
        return self.journals / cg

    def bookmarks(self, cg: str) -> Path:
        return self.appliance / "bookmarks" / f"{cg}.json"

    @property
    def replicas(self) -> Path:
        return self.appliance / "replicas"

    def replica(self, cg: str) -> Path:
        return self.replicas / cg

    def replica_lock(self, cg: str) -> Path:
        return self.replicas / f"{cg}.lock"

    @property
    def bases(self) -> Path:
        return self.appliance / "base"

    def base(self, cg: str) -> Path:
        return self.bases / cg

    @property
    def failovers(self) -> Path:
        return self.appliance / "failover"

    def failover_state(self, cg: str) -> Path:
        return self.failovers / f"{cg}.json"

    def failover_dir(self, cg: str) -> Path:
        return self.failovers / cg


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
