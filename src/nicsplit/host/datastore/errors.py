"""Errors raised by the datastore. Every message is one line that names the
file, vdisk or process involved, so a log line alone explains the failure."""

from __future__ import annotations

# The catalog's codec (nicsplit.core.catalog) raises these too, so they live
# there; every datastore error is still a DatastoreError.
from nicsplit.core.catalog import CorruptDatastore, DatastoreError

__all__ = ["CorruptDatastore", "DatastoreBusy", "DatastoreError", "UnknownVdisk", "VdiskExists"]


class VdiskExists(DatastoreError):
    """A vdisk with this name already exists."""


class UnknownVdisk(DatastoreError):
    """No vdisk with this name (or it was deleted while a handle was open)."""


class DatastoreBusy(DatastoreError):
    """Another process (or another handle) holds the datastore IO lock."""
