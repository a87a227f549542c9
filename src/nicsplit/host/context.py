"""Host-wide services that filters share: consistency groups and their
sequencers, per-vdisk dirty maps, and the link to the offload card."""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

from nicsplit.core.cgs import CGCatalog
from nicsplit.core.layout import Layout
from nicsplit.host.cardlink import CardLink
from nicsplit.host.marking import MarkingMap
from nicsplit.host.sequencer import Sequencer


class HostContext:
    def __init__(self, data: Path, card: dict[str, Any] | None = None) -> None:
        self.data = Path(data)
        self.layout = Layout(self.data)
        self.cgs = CGCatalog(self.data)
        self._seq: dict[str, Sequencer] = {}
        self._dmaps: dict[str, MarkingMap] = {}
        self.card = CardLink(self.layout.card_sock, self.layout.card_lost_log, **(card or {}))
        # io ids are unique across restarts: time-based high bits, counter below.
        self._io_ids = itertools.count((time.time_ns() // 1000) << 16)

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

    def dirty_map(self, vdisk_uuid: str, size: int) -> MarkingMap:
        d = self._dmaps.get(vdisk_uuid)
        if d is None:
            d = self._dmaps[vdisk_uuid] = MarkingMap(self.layout.marking, vdisk_uuid, size)
        return d

    def close(self) -> None:
        self.card.close()
        for d in self._dmaps.values():
            d.sync()
            d.close()
