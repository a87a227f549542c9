"""The embedded default that ``nicsplit up`` (``make run``) starts with: a
demo VM of two 1 GiB vdisks in one consistency group, created only when the
datastore has no vdisk at all, so a user's own setup is never touched."""

from __future__ import annotations

from nicsplit.core.cgs import CGCatalog
from nicsplit.core.config import Config
from nicsplit.host.datastore import Datastore

DEMO_CG = "demo-vm"
DEMO_VDISKS = ("demo-vm-root", "demo-vm-data")
DEMO_SIZE = 1 << 30


def ensure_demo(cfg: Config) -> bool:
    """Create the demo VM in an empty datastore; True if it was created."""
    ds = Datastore.open(cfg.datastore_dir)
    if ds.list_vdisks():
        return False
    CGCatalog(cfg.data).create(DEMO_CG)
    for name in DEMO_VDISKS:
        ds.create_vdisk(name, DEMO_SIZE, owner="vm:demo", extra={"cg": DEMO_CG})
    return True
