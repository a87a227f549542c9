"""Stage 1, resolve: vdisk id → consistency group name, vdisk name, size.

Each augmented write carries the datastore vdisk id and its *virtual* range.
Resolve looks the vdisk up in a catalog snapshot and checks the range, op and
payload length. A write that fails the check (unknown vdisk, range outside
the vdisk, payload length ≠ length) is logged with its io id and dropped: the
caller frees its hidden-volume slot and tells hold the seq is spoken for, so
the CG's order does not wait for it. Such a write never reaches the appliance
(the front end refuses out-of-range requests, so this is a splitter/catalog
mismatch, counted in ``dropped_*``).

Options: none. The catalog is any object with ``lookup(vdisk_id) ->
(cg_name, vdisk_name, size) | None``; swap ``resolver.catalog`` for a new
snapshot when the datastore catalog changes. If it also has ``refresh()``,
a write that fails the check calls it once and is checked again (a vdisk
created or resized after the snapshot; ``refresh`` should be cheap when
nothing changed, e.g. compare the catalog file's stamp).

Example::

    r = Resolver(catalog)
    got = r.resolve(write)          # Resolved | None (None: dropped, logged)

No queue: resolve is a synchronous transform of one poll's entries, which the
transport already bounds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from nicsplit.core.records import AugmentedWrite, Op

from .items import Resolved

log = logging.getLogger(__name__)

_WRITE, _BARRIER = Op.WRITE, Op.BARRIER


class CardCatalog(Protocol):
    """What the card needs from the datastore catalog (the lead builds it)."""

    def lookup(self, vdisk_id: int) -> tuple[str, str, int] | None:
        """(cg_name, vdisk_name, size in bytes), or None if unknown."""
        ...


@dataclass(frozen=True)
class ResolveStats:
    resolved: int
    dropped_unknown_vdisk: int
    dropped_out_of_range: int
    dropped_bad_payload: int


class Resolver:
    def __init__(self, catalog: CardCatalog) -> None:
        self.catalog = catalog
        self._ok = self._unknown = self._range = self._payload = 0
        self._cg_ids: dict[int, int] = {}  # vdisk id -> the CG id its last write carried

    def resolve(self, w: AugmentedWrite) -> Resolved | None:
        vdisk_id, cg_ids = w.vdisk_id, self._cg_ids
        if vdisk_id not in cg_ids or cg_ids[vdisk_id] != w.cg_id:
            if callable(getattr(self.catalog, "refresh", None)):
                # First write of this vdisk this run, or another CG than its last
                # one: it may have joined a CG since the snapshot (`nicsplit cg add`).
                self.catalog.refresh()
            cg_ids[vdisk_id] = w.cg_id
        # `_check(w, quiet=True)` inline for a write that passes (one per write
        # on the card's steady path); anything else takes the full path below.
        found = self.catalog.lookup(vdisk_id)
        if found is not None:
            cg, vdisk, size = found
            off, length, op = w.voffset, w.length, w.op
            if off >= 0 and length >= 0 and off + length <= size:
                if op == _WRITE:
                    data = w.data
                    if data is not None and len(data) == length:
                        self._ok += 1
                        return Resolved(w, cg, vdisk, length)
                elif op != _BARRIER or not length:
                    self._ok += 1
                    return Resolved(w, cg, vdisk, 0)
        r = self._check(w, quiet=True)
        if r is None and callable(getattr(self.catalog, "refresh", None)):
            self.catalog.refresh()  # a vdisk created or resized since the snapshot
        return r if r is not None else self._check(w, quiet=False)

    def passed(self, n: int) -> None:
        """``n`` writes passed resolve's checks outside `resolve` (the
        pipeline's run of one vdisk, `CardPipeline.feed`)."""
        self._ok += n

    def _check(self, w: AugmentedWrite, *, quiet: bool) -> Resolved | None:
        found = self.catalog.lookup(w.vdisk_id)
        if found is None:
            if quiet:
                return None
            self._unknown += 1
            log.warning("io %d: unknown vdisk %d (cg %d seq %d): dropped", w.io_id, w.vdisk_id, w.cg_id, w.cg_seq)
            return None
        cg, vdisk, size = found
        if w.voffset < 0 or w.length < 0 or w.voffset + w.length > size or (w.op == Op.BARRIER and w.length):
            if quiet:
                return None
            self._range += 1
            log.warning("io %d: %s range %d+%d outside vdisk %s (size %d): dropped",
                        w.io_id, Op(w.op).name, w.voffset, w.length, vdisk, size)
            return None
        nbytes = 0
        if w.op == Op.WRITE:
            nbytes = 0 if w.data is None else len(w.data)
            if nbytes != w.length:
                if quiet:
                    return None
                self._payload += 1
                log.warning("io %d: payload %d bytes for a %d-byte write on %s: dropped", w.io_id, nbytes, w.length, vdisk)
                return None
        self._ok += 1
        return Resolved(w, cg, vdisk, nbytes)

    def statistics(self) -> ResolveStats:
        return ResolveStats(self._ok, self._unknown, self._range, self._payload)
