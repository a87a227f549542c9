"""Errors raised by the datastore. Every message is one line that names the
file, vdisk or process involved, so a log line alone explains the failure."""

from __future__ import annotations

# The catalog's codec (nicsplit.core.catalog) raises these too, so they live
# there; every datastore error is still a DatastoreError.
from nicsplit.core.catalog import CorruptDatastore, DatastoreError
from nicsplit.core.errors import Conflict, NotFound

__all__ = ["CorruptDatastore", "DatastoreBusy", "DatastoreError", "UnknownVdisk", "VdiskExists"]


class VdiskExists(DatastoreError, Conflict):
    """A vdisk with this name already exists."""


class UnknownVdisk(DatastoreError, NotFound):
    """No vdisk with this name (or it was deleted while a handle was open)."""


class DatastoreBusy(DatastoreError, Conflict):
    """Another process (or another handle) holds the datastore IO lock."""
