"""The card's two ends of a ring in one process, for tests: an acker
(`RingAcker`), the pipeline worker's endpoint (`HandoffEndpoint`) on the
same handoff queue, and the host's `RingSplitter`, stepped by hand.
``transport="nvme-pi"`` makes it `NvmeAcker` and `NvmePiSplitter`;
``transport="shadow"`` `ShadowAcker` (``acker_options``: its ``volume_dir``,
device geometry, match timeout) and `ShadowSplitter`."""

from __future__ import annotations

import os
from typing import Callable

from nicsplit.card.handoff import Handoff
from nicsplit.card.transports.nvme_acker import NvmeAcker
from nicsplit.card.transports.nvme_splitter import NvmePiSplitter
from nicsplit.card.transports.ring_acker import RingAcker
from nicsplit.card.transports.ring_handoff import HandoffEndpoint
from nicsplit.card.transports.ring_splitter import RingSplitter
from nicsplit.card.transports.shadow_acker import ShadowAcker
from nicsplit.card.transports.shadow_splitter import ShadowSplitter

_ACKERS = {"ring": RingAcker, "nvme-pi": NvmeAcker, "shadow": ShadowAcker}
_SPLITTERS = {"ring": RingSplitter, "nvme-pi": NvmePiSplitter, "shadow": ShadowSplitter}


def no_refusal(*refused) -> None:
    """A lost log for rigs whose payloads are all intact: any report fails the test."""
    raise AssertionError(f"an intact payload was reported bad: {refused}")


class CardRig:
    """Acker, worker endpoint and splitter on one ring; `close` undoes all three."""

    def __init__(self, run: str, *, slots: int = 1024, data_size: int = 4 << 20, sq: int = 64,
                 on_refused: Callable[..., None] = no_refusal, verify: bool = True, transport: str = "ring",
                 acker_options: dict | None = None, **splitter_options) -> None:
        self.ho = Handoff.create(slots=slots)
        self.acker = _ACKERS[transport](run, handoff=self.ho, data_size=data_size, sq_entries=sq, cq_entries=sq,
                                        **(acker_options or {}))
        self.worker_ho = Handoff(os.dup(self.ho.fd))
        self.worker = HandoffEndpoint(self.worker_ho, self.acker.volume_path, self.acker.fake_uid,
                                      self.acker.wake_fd, on_refused=on_refused, verify_checksums=verify,
                                      transport=transport,
                                      match_timeout_ms=(acker_options or {}).get("match_timeout_ms", 5000))
        self.sp = _SPLITTERS[transport].connect(str(self.acker.socket_path), **splitter_options)

    def close(self) -> None:
        self.sp.close()
        self.worker.close()
        self.worker_ho.close()
        os.close(self.worker_ho.fd)
        self.acker.close()
        self.ho.close()
        os.close(self.ho.fd)
