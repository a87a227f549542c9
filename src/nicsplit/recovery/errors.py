"""The recovery library's user-facing error.

Restore, image access, failover, failback, bookmarks and journal replay raise
`RecoveryError` when a request cannot be done as asked (a CG without a
journal, a PIT inside a merge window, a hook that failed, a failover already
in progress...). Its message is one complete line: the CLI prints it as is,
the appliance sends it back on its control socket. Errors of the layers below
(PitError, JournalError, CGError, DatastoreError) pass through unchanged;
they are one line too.
"""

from __future__ import annotations

from nicsplit.core.errors import Conflict, NotFound


class RecoveryError(Exception):
    """A recovery request that cannot be done as asked (one clear line)."""


class RecoveryNotFound(RecoveryError, NotFound):
    """The request names an image or vdisk that does not exist."""


class RecoveryConflict(RecoveryError, Conflict):
    """The CG's state refuses the request (already failed over, not failed over)."""
