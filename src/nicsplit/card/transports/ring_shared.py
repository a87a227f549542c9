"""What both halves of the ring transport share: the control socket's name
and message bound, hot-path constants pulled out of the `nicsplit.wire.ring`
enums and structs, and small helpers for logging and the control socket.
The transport itself is described in `nicsplit.card.transports.ring`."""

from __future__ import annotations

import logging
import socket

from nicsplit.core.layout import Layout
from nicsplit.core.records import AugmentedWrite, Op, Status, WFlag
from nicsplit.wire import ring as R

__all__ = [
    "SOCKET_NAME", "DEFAULT_STALE_AFTER_NS", "MAX_CONTROL_MSG", "M32", "RateLimitedLog", "peer_alive",
    "reason_name", "brief",
]

log = logging.getLogger("nicsplit.card.transports.ring")  # one logger for both halves

SOCKET_NAME = Layout(".").card_sock.name  # `Layout.card_sock`, in the run directory the endpoint is given
# A card whose heartbeat is this old is dead (the splitter stops handing it
# writes and marks what it holds). Seconds, not the card's 10 ms doorbell
# sleep times ten: a busy 2-core machine deschedules a live card for tens of
# milliseconds, and a late ack is not a lost write (the write waits in the
# ring, in order), so only a card that makes no progress for this long is.
DEFAULT_STALE_AFTER_NS = 2_000_000_000
MAX_CONTROL_MSG = 4096  # the JSON hello is ~400 bytes
M32 = 0xFFFFFFFF

# Hot-path constants pulled out of the enums (attribute lookups on IntEnum
# classes cost ~40 ns each).
SQ_TAIL, SQ_HEAD = int(R.Counter.SQ_TAIL), int(R.Counter.SQ_HEAD)
CQ_TAIL, CQ_HEAD = int(R.Counter.CQ_TAIL), int(R.Counter.CQ_HEAD)
DATA_TAIL, DATA_HEAD = int(R.Counter.DATA_TAIL), int(R.Counter.DATA_HEAD)
STATE, HEARTBEAT = int(R.Counter.CARD_STATE), int(R.Counter.CARD_HEARTBEAT)
HOST_WAITING = int(R.Counter.HOST_WAITING)
SLEEPING, POLLING, CLOSED = int(R.CardState.SLEEPING), int(R.CardState.POLLING), int(R.CardState.CLOSED)
K_WRITE, K_OUTCOME = int(R.Kind.WRITE), int(R.Kind.OUTCOME)
OK, FAILED = int(R.AckStatus.OK), int(R.AckStatus.FAILED)
DF_CSUM = int(R.DescFlag.CSUM)
R_FULL = int(R.AckReason.FULL)
OPS = {int(o): o for o in Op}
WFLAGS = {int(f): WFlag(f) for f in (0, 1, 2, 3)}  # FUA, GAP
STATUSES = {int(s): s for s in Status}

desc_pack = R.DESC.pack_into
desc_unpack = R.DESC.unpack_from
cqe_pack = R.CQE.pack_into
cqe_unpack = R.CQE.unpack_from
fence = R.full_fence

class RateLimitedLog:
    """Log the first ``burst`` events, then one in ``every`` (with a count)."""

    def __init__(self, burst: int = 20, every: int = 1000) -> None:
        self.n = 0
        self.burst, self.every = burst, every

    def __call__(self, msg: str, *args: object) -> None:
        self.n += 1
        if self.n <= self.burst or self.n % self.every == 0:
            log.warning(msg + " (event %d)", *args, self.n)


def peer_alive(sock: socket.socket) -> bool:
    """False once the peer closed its end (EOF) or the socket failed.  The
    host never sends anything after connecting; stray bytes are discarded."""
    try:
        data = sock.recv(MAX_CONTROL_MSG, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return data != b""


def reason_name(reason: int) -> str:
    try:
        return R.AckReason(reason).name
    except ValueError:
        return f"reason {reason}"


def brief(w: AugmentedWrite) -> str:
    return (f"io={w.io_id} cg={w.cg_id}/{w.cg_seq} vdisk={w.vdisk_id} op={w.op!r} flags={w.flags!r} "
            f"voffset={w.voffset} length={w.length}")