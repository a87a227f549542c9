"""The datastore: virtual → physical translation with thin provisioning.

Many vdisks share volume files (`vol-NNNN.dsk`); a catalog (`catalog.json`)
names them and an append-only extent log (`extents.log`) maps each vdisk's
virtual extents to physical ones, allocated on first write. See
docs/datastore.md for the formats and the crash story.

Example::

    ds = Datastore.create("DATA/datastore", volume_size=64 << 30)
    ds.create_vdisk("web1-root", 20 << 30, owner="vm:web1")
    ds.open_io()
    disk = ds.vdisk("web1-root")
    disk.pwrite(4096, b"x" * 4096)
    ds.sync()
    ds.close()
"""

from nicsplit.core.catalog import VdiskInfo

from .errors import CorruptDatastore, DatastoreBusy, DatastoreError, UnknownVdisk, VdiskExists
from .store import Datastore, DatastoreStats, VdiskStore

__all__ = [
    "CorruptDatastore", "Datastore", "DatastoreBusy", "DatastoreError", "DatastoreStats",
    "UnknownVdisk", "VdiskExists", "VdiskInfo", "VdiskStore",
]
