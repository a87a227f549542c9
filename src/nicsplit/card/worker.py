"""The card's pipeline worker: ``python -m nicsplit.card.worker``, spawned by
the acker (`nicsplit.card.fastpath`) with the handoff queue and its doorbell
inherited and a JSON spec in ``NICSPLIT_CARD_WORKER``. It runs the usual
`CardProcess` (pipeline, overflow log, shipper, control socket) on a
`HandoffEndpoint`, and dies with the acker."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
from pathlib import Path

from nicsplit.card.fastpath import WORKER_ENV
from nicsplit.card.handoff import Handoff
from nicsplit.card.lostlog import LostLog
from nicsplit.card.process import CardConfig, run_card
from nicsplit.card.transports.ring_handoff import HandoffEndpoint
from nicsplit.core import malloc

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """SIGKILL when the acker dies: what this worker holds is in the acker's
    memory, and a new card starts a new worker."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it died before the signal was armed
        os._exit(1)


def main() -> int:
    spec = json.loads(os.environ.pop(WORKER_ENV))
    die_with_parent(int(spec["parent"]))
    malloc.tune()  # a batch's buffers stay mapped between batches (nicsplit.core.malloc)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s card-worker %(levelname)s %(name)s: %(message)s")
    cfg = CardConfig.from_mapping(Path(spec["data"]), spec["card"], worker=True)
    # The card's lost log, from the endpoint's first poll on: a payload found
    # bad after its ack goes there (the endpoint refuses to run without one).
    # `CardProcess` puts its own writer of the same log in its place.
    lost = LostLog(cfg.layout.card_lost_log)

    def refused(io_id: int, vdisk_id: int, offset: int, length: int, reason: str) -> None:
        lost.append(io_id, vdisk_id, offset, length, f"card refused it ({reason})")

    ep = HandoffEndpoint(Handoff(int(spec["handoff_fd"])), spec["volume"], spec["uid"], int(spec["wake_fd"]),
                         on_refused=refused,
                         verify_checksums=bool(cfg.transport_options.get("verify_checksums", True)),
                         transport=cfg.transport, match_timeout_ms=cfg.pipeline.outcome_timeout_ms)
    try:
        import uvloop  # optional, as in nicsplit.card.process.main

        return uvloop.run(run_card(cfg, endpoint=ep))
    except ImportError:
        import asyncio  # the fallback loop

        return asyncio.run(run_card(cfg, endpoint=ep))
    finally:
        ep.close()
        lost.close()


if __name__ == "__main__":
    sys.exit(main())
