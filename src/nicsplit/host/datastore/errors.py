"""Errors raised by the datastore. Every message is one line that names the
file, vdisk or process involved, so a log line alone explains the failure."""

from __future__ import annotations


class DatastoreError(Exception):
    """Any datastore failure: bad input, bad files, wrong state."""


class VdiskExists(DatastoreError):
    """A vdisk with this name already exists."""


class UnknownVdisk(DatastoreError):
    """No vdisk with this name (or it was deleted while a handle was open)."""


class DatastoreBusy(DatastoreError):
    """Another process (or another handle) holds the datastore IO lock."""


class CorruptDatastore(DatastoreError):
    """A datastore file fails validation (bad magic, CRC, impossible map)."""
