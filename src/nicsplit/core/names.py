"""Names of consistency groups and vdisks: one rule for every layer.

The CLI, the config loader, the catalog, the CG catalog, the card and the
appliance all check a name with `check_name` (or `is_name`), so a name one
of them accepts is a name every other one accepts too.

Rules
-----
A name is 1-64 characters of ``A-Z a-z 0-9 . _ -`` that

1. starts with a letter or a digit: so it is never ``.``, ``..``, a hidden
   file (``.x``), an option to the CLI (``-x``, ``--``) or ``_x``;
2. does not end in ``.json`` or ``.lock``: a CG's directories sit beside
   files named after the CG (``failover/CG/`` next to ``failover/CG.json``,
   ``replicas/CG/`` next to ``replicas/CG.lock``), so CG ``a.json`` would
   be CG ``a``'s failover state.

A vdisk that is in no CG is shipped as its own CG, named after it (the
card's catalog), which is why vdisk names follow the same rule.

Names stored by an earlier version may break rules 1-2; `check_name` with
``stored=True`` accepts those (the character set and length only) so such a
catalog still opens, its vdisk can still be deleted, and the card and the
appliance refuse only that CG.

Example::

    check_name("web-1", "consistency group")   # -> "web-1"
    check_name("..", "vdisk")                  # BadName: bad vdisk name '..': ...
"""

from __future__ import annotations

import re

MAX_LEN = 64
RULE = "use 1-64 of A-Z a-z 0-9 . _ -, starting with a letter or digit, not ending in .json or .lock"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_STORED = re.compile(r"[A-Za-z0-9._-]{1,64}")  # what earlier versions let in (rule 3 of the docstring)
_RESERVED_SUFFIXES = (".json", ".lock")


class BadName(ValueError):
    """A name breaks the rule; the message says which name and the rule."""


def is_name(name: object) -> bool:
    """True when ``name`` is a valid CG / vdisk name (rules 1-2)."""
    return (isinstance(name, str) and _NAME.fullmatch(name) is not None
            and not name.endswith(_RESERVED_SUFFIXES))


def check_name(name: object, what: str = "consistency group", *, stored: bool = False) -> str:
    """``name`` if valid, else `BadName` naming ``what`` (``"vdisk"``,
    ``"consistency group"``).  ``stored=True``: a name read back from a file
    an earlier version wrote, checked for its characters and length only."""
    if stored:
        if isinstance(name, str) and _STORED.fullmatch(name):
            return name
    elif is_name(name):
        return name  # type: ignore[return-value]  # is_name checked it is a str
    raise BadName(f"bad {what} name {name!r}: {RULE}")
