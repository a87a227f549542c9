"""What kind of refusal a domain error is, for whoever turns errors into
replies (the REST API: 404 and 409; the CLI prints every one the same way).

Both are mixins: a domain's own error class stays what it was (a
`CGError`, a `DatastoreError`...) and also says its kind, e.g.
``class UnknownCG(CGError, NotFound)``. An error that is neither is a bad
request.
"""

from __future__ import annotations

__all__ = ["NotFound", "Conflict"]


class NotFound(Exception):
    """The request names a CG, vdisk, bookmark or image that does not exist."""


class Conflict(Exception):
    """The request collides with the current state: a name already taken, a
    CG already failed over, a datastore held by another process."""
