"""Host-wide services that filters share: consistency groups and their
sequencers, per-vdisk dirty maps, the link to the offload card, and each
CG's protection gap (the vdisks of the CG that are marking or resyncing:
while any is, every record the CG ships carries ``WFlag.GAP``)."""

from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path
from typing import Any

from nicsplit.card.transports.base import has_card_half
from nicsplit.core.cgs import CGCatalog
from nicsplit.core.layout import Layout
from nicsplit.host.actlog import ActivityLog
from nicsplit.host.cardlink import CardLink
from nicsplit.host.load import HostLoad
from nicsplit.host.marking import MarkingMap
from nicsplit.host.sequencer import Sequencer

log = logging.getLogger(__name__)


class CGGap:
    """The vdisks of one CG in the protection gap (marking or resyncing), fed
    by their marking maps' state changes; the splitter reads ``vdisks``."""

    __slots__ = ("cg", "vdisks", "since")

    def __init__(self, cg: str) -> None:
        self.cg = cg
        self.vdisks: set[str] = set()
        self.since = 0.0

    def update(self, dmap: MarkingMap, old: str, new: str) -> None:
        before = bool(self.vdisks)
        if dmap.in_gap:
            self.vdisks.add(dmap.name)
        else:
            self.vdisks.discard(dmap.name)
        if bool(self.vdisks) != before:
            if self.vdisks:
                self.since = time.time()
                log.warning("consistency group %s: protection gap begins (%s is %s): "
                            "no consistent PIT until every vdisk is protected again", self.cg, dmap.name, new)
            else:
                log.info("consistency group %s: protection gap ends after %.1f s (%s is %s)",
                         self.cg, time.time() - self.since, dmap.name, new)


class HostContext:
    def __init__(self, data: Path, card: dict[str, Any] | None = None, al_extents: int = 0,
                 transports: dict[str, dict[str, Any]] | None = None, card_transport: str | None = None) -> None:
        self.data = Path(data)
        self.layout = Layout(self.data)
        self.cgs = CGCatalog(self.data)
        self._seq: dict[str, Sequencer] = {}
        self._dmaps: dict[str, MarkingMap] = {}
        self._gaps: dict[str, CGGap] = {}
        self._link_dmaps: dict[int, Any] = {}  # vdisk id -> dirty map, shared by every link
        card = dict(card or {})
        if card_transport is not None:  # the card transport the vdisks use (HostServer)
            card["transport"] = card_transport
        # Requests executing in this host (sessions count them): a lone waiter spins longer (nicsplit.host.load).
        self.load = HostLoad()
        self.card = CardLink(self.layout.card_sock, self.layout.card_lost_log, dmaps=self._link_dmaps, load=self.load,
                             **card)
        # One link per transport the vdisks use (``[splitter]``, docs/operations.md
        # "Choosing a transport"); the card's always exists and is the one link
        # of a transport with a card half (one card serves one transport): it
        # alone reads the card's lost-writes log, at every start, whatever the
        # vdisks use now.
        self.links: dict[str, CardLink] = {self.card.kind: self.card}
        self._transport_options = dict(transports or {})
        self._card_options = card
        # The activity log (None: off, e.g. a read-only host, which writes nothing).
        self.activity_log = ActivityLog(self.layout.activity_log, extents=al_extents) if al_extents > 0 else None
        # io ids are unique across restarts: time-based high bits, counter below.
        self._io_ids = itertools.count((time.time_ns() // 1000) << 16)

    def link_for(self, transport: str) -> CardLink:
        """The link of transport ``transport`` (created at the first use;
        ValueError for an unknown name)."""
        link = self.links.get(transport)
        if link is None and has_card_half(transport):
            raise ValueError(f"transport {transport!r}: the card serves {self.card.kind!r} "
                             "(one card serves one transport; restart with the vdisks on one)")
        if link is None:
            opts = {k: v for k, v in self._card_options.items() if k in ("retry_s", "max_tracked")}
            link = CardLink(self.layout.card_sock, self.layout.run / f"{transport}-lost.log", transport=transport,
                            options=self._transport_options.get(transport, {}), dmaps=self._link_dmaps,
                            load=self.load, **opts)
            self.links[transport] = link
        return link

    def next_io_id(self) -> int:
        return next(self._io_ids) & 0xFFFF_FFFF_FFFF_FFFF

    def cg_id(self, name: str) -> int:
        return self.cgs.get(name).id  # CGError (one clear line) for an unknown CG

    def sequencer(self, cg: str) -> Sequencer:
        s = self._seq.get(cg)
        if s is None:
            s = self._seq[cg] = Sequencer(self.layout.cg_seq(cg))
        return s

    def cg_last_seqs(self) -> dict[str, int]:
        """The last sequence number handed out per CG this host sequenced."""
        return {name: s.last for name, s in self._seq.items()}

    def gap(self, cg: str) -> CGGap:
        g = self._gaps.get(cg)
        if g is None:
            g = self._gaps[cg] = CGGap(cg)
        return g

    def join_gap(self, cg: str, dmap: MarkingMap) -> CGGap:
        """Count ``dmap`` in its CG's gap from now on (and now, if it is in one)."""
        g = self.gap(cg)
        if g.update not in dmap.listeners:
            dmap.listeners.append(g.update)
            if dmap.in_gap:
                g.update(dmap, "protected", dmap.state)
        return g

    def dirty_map(self, vdisk_uuid: str, size: int) -> MarkingMap:
        d = self._dmaps.get(vdisk_uuid)
        if d is None:
            d = self._dmaps[vdisk_uuid] = MarkingMap(self.layout.marking, vdisk_uuid, size)
        return d

    def close(self) -> None:
        for link in self.links.values():
            link.close()
        for d in self._dmaps.values():
            d.sync()
            d.close()
