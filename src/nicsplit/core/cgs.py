"""Consistency groups (`DATA/cgs.json`).

A CG is a set of vdisks whose writes share one sequence, so every point in
time of the group is a prefix of one order across all its disks (P2). A vdisk
belongs to at most one CG; membership is stored with the vdisk (catalog
``extra["cg"]``) so deleting a vdisk leaves no dangling member.

Rules: ids are small ints from ``next_id``, never reused (journals are keyed
by name, records by id). Changes are read-modify-write under an flock, and
the file is replaced atomically (tmp, fsync, rename).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from nicsplit.core.errors import Conflict, NotFound
from nicsplit.core.fsutil import atomic_write
from nicsplit.core.layout import Layout
from nicsplit.core.names import BadName, check_name


class CGError(Exception):
    """One clear line."""


class UnknownCG(CGError, NotFound):
    """No consistency group of this name."""


class CGConflict(CGError, Conflict):
    """A CG name already taken, or a vdisk already in another CG."""


@dataclass(frozen=True)
class CGInfo:
    name: str
    id: int
    uuid: str
    created: float
    # "production": the host serves the CG's vdisks; "failed-over": the
    # appliance does, and the host serves them read-only (fenced).
    role: str = "production"


ROLES = ("production", "failed-over")


class CGCatalog:
    def __init__(self, data: Path) -> None:
        layout = Layout(data)
        self.path = layout.cgs
        self._lock = layout.cgs_lock

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self._lock, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def _read(self) -> dict:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"next_id": 1, "cgs": {}}
        except ValueError as e:
            raise CGError(f"{self.path}: corrupt ({e})") from None
        return raw

    def _write(self, raw: dict) -> None:
        atomic_write(self.path, json.dumps(raw, indent=2).encode())

    def create(self, name: str) -> CGInfo:
        try:
            check_name(name, "consistency group")  # the rule the card and the appliance apply too
        except BadName as e:
            raise CGError(str(e)) from None
        with self._locked():
            raw = self._read()
            if name in raw["cgs"]:
                raise CGConflict(f"consistency group {name!r} already exists")
            cg = {"id": raw["next_id"], "uuid": str(uuid.uuid4()), "created": time.time()}
            raw["next_id"] += 1
            raw["cgs"][name] = cg
            self._write(raw)
        return CGInfo(name=name, **cg)

    def list(self) -> list[CGInfo]:
        raw = self._read()
        return sorted((CGInfo(name=n, **c) for n, c in raw["cgs"].items()), key=lambda c: c.id)

    def get(self, name: str) -> CGInfo:
        raw = self._read()
        if name not in raw["cgs"]:
            known = ", ".join(sorted(raw["cgs"])) or "none"
            raise UnknownCG(f"unknown consistency group {name!r} (known: {known})")
        return CGInfo(name=name, **raw["cgs"][name])

    def set_role(self, name: str, role: str) -> CGInfo:
        if role not in ROLES:
            raise CGError(f"bad role {role!r}: one of {', '.join(ROLES)}")
        with self._locked():
            raw = self._read()
            if name not in raw["cgs"]:
                raise UnknownCG(f"unknown consistency group {name!r}")
            raw["cgs"][name]["role"] = role
            self._write(raw)
            return CGInfo(name=name, **raw["cgs"][name])

    def role(self, name: str) -> str:
        return self.get(name).role

    def by_id(self) -> dict[int, CGInfo]:
        return {c.id: c for c in self.list()}
