"""Sans-IO state of the ``net`` transport's host half (the classic splitter):
writes in, Batch frames out, Ack frames in, verdicts out. No socket, no
clock, no event loop: `nicsplit.card.transports.net` is the thin IO loop
around it, and tests wire it to a real appliance or to frame codecs in memory.

It speaks the card's protocol (`nicsplit.wire.frames`, docs/wire.md) unchanged:
the host says Hello with its id and the CGs it ships, the appliance answers
HelloAck, then each Batch carries records of one CG and is answered by an Ack.

Rules
-----
1. One record per write, exactly as the card would ship it: the CG sequence,
   io id, vdisk id, op, flags, *virtual* offset and length, timestamp and the
   payload in full (no references: the host keeps no dedup state). The
   payload is copied when the write is added, so the caller may reuse its
   buffer at once (the transport contract).
2. Writes added between two `take_batches` calls share a batch per CG (the
   IO loop calls it once per event-loop turn, so writes in flight together at
   QD>1 share one frame and one group commit at the appliance). Records of a
   batch are in the order they were added, which is CG order (the splitter
   takes the seq and submits in one synchronous step).
3. A write is acknowledged only by an ``Ack(durable=True)``: of its batch,
   or of a later batch of the same CG whose ``last_seq`` covers it (the
   journal is append-only per CG). ``durable=False`` acks change nothing.
4. Nothing is ever resent: a write without its durable ack when the link
   fails gets False (`fail_all`), and the splitter marks its region; the
   resync copies it again under a new seq. So the state holds only what is
   in flight, bounded by the host's queue depth.
5. A write for a CG the appliance did not accept in HelloAck (or that this
   state cannot name) is refused at `add` (False): the splitter marks it.
6. Protocol errors from the peer (`FrameError`, an Error frame, an
   unexpected frame) are sticky: `broken` holds the reason, and the IO loop
   drops the link.

Example::

    st = NetState({1: "cg1"}, key=None)
    hello = st.hello("host-a")                 # bytes to send
    st.connected(HelloAck("app", 1, {"cg1": 0}))
    st.add(w)                                  # AugmentedWrite of cg 1
    wire = st.take_batches()                   # bytes to send
    verdicts = st.on_frame(Ack(...))           # [(io_id, True)]
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Iterable

from nicsplit.core.records import AugmentedWrite, Op
from nicsplit.wire.frames import (
    PROTOCOL_VERSION, Ack, Batch, Error, Frame, Heartbeat, Hello, HelloAck, Record, batch_aad, encode, encode_records,
)
from nicsplit.wire.envelope import seal

__all__ = ["NetState", "NetStats", "NetProtocolError"]


class NetProtocolError(Exception):
    """The appliance broke the protocol or refused us: drop the link."""


@dataclass(frozen=True, slots=True)
class NetStats:
    submitted: int  # writes added (records built)
    acked: int  # writes acknowledged durable
    failed: int  # writes failed by a lost link or a refusal at add
    batches: int  # Batch frames built
    acks: int  # durable Ack frames applied
    bytes_out: int  # batch frame bytes built
    inflight: int  # writes without a verdict now
    unacked_batches: int  # batches without their durable ack now


class _Unacked:
    __slots__ = ("batch_id", "cg", "last_seq", "io_ids")

    def __init__(self, batch_id: int, cg: str, last_seq: int, io_ids: list[int]) -> None:
        self.batch_id = batch_id
        self.cg = cg
        self.last_seq = last_seq
        self.io_ids = io_ids


class NetState:
    """See the module docstring. ``cg_names``: CG id -> name (from cgs.json);
    ``key``: the AES-256-GCM batch key, None for plaintext bodies."""

    def __init__(self, cg_names: dict[int, str], *, key: bytes | None, compress: bool = False) -> None:
        self.cg_names = dict(cg_names)
        self.key = key
        self.compress = compress
        self.accepted: frozenset[str] = frozenset()
        self.resume: dict[str, int] = {}
        self.appliance_id = ""
        self.broken = ""
        self._pending: dict[str, list[Record]] = {}  # CG -> records added since the last take
        self._pending_ids: dict[str, list[int]] = {}
        self._unacked: dict[str, deque[_Unacked]] = {}  # CG -> its batches in send order
        self._inflight: set[int] = set()
        self._next_batch = 1
        self._submitted = self._acked = self._failed = self._batches = self._acks = self._bytes = 0

    # -- handshake ---------------------------------------------------------
    def hello(self, sender: str) -> bytes:
        """The Hello frame naming every CG this state may ship."""
        return encode(Hello(sender, PROTOCOL_VERSION, tuple(sorted(set(self.cg_names.values())))))

    def connected(self, frame: Frame) -> None:
        """Apply the appliance's answer to Hello; NetProtocolError if it is
        not a HelloAck of our version."""
        if isinstance(frame, Error):
            raise NetProtocolError(f"appliance refused: error {frame.code}: {frame.message}")
        if not isinstance(frame, HelloAck):
            raise NetProtocolError(f"expected HelloAck, got {type(frame).__name__}")
        if frame.version != PROTOCOL_VERSION:
            raise NetProtocolError(f"appliance speaks protocol {frame.version}, we speak {PROTOCOL_VERSION}")
        self.appliance_id = frame.appliance_id
        self.resume = dict(frame.resume)
        self.accepted = frozenset(frame.resume)

    # -- writes out --------------------------------------------------------
    def add(self, w: AugmentedWrite) -> bool:
        """Queue ``w`` for the next batch (payload copied); False when its CG
        is not shipped on this link or the state is broken (rule 5)."""
        cg = self.cg_names.get(w.cg_id)
        if self.broken or cg is None or cg not in self.accepted or w.io_id in self._inflight:
            self._failed += 1
            return False
        data = bytes(w.data) if w.op == Op.WRITE and w.data is not None else b""
        if w.op == Op.WRITE and len(data) != w.length:
            self._failed += 1
            return False
        rec = Record(w.cg_seq, w.io_id, w.vdisk_id, int(w.op), int(w.flags), w.voffset, w.length,
                     w.timestamp_ns, data)
        recs = self._pending.get(cg)
        if recs is None:
            recs = self._pending[cg] = []
            self._pending_ids[cg] = []
        recs.append(rec)
        self._pending_ids[cg].append(w.io_id)
        self._inflight.add(w.io_id)
        self._submitted += 1
        return True

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def take_batches(self) -> bytes:
        """Encode what was added since the last call: one Batch frame per CG
        (rule 2); b"" when nothing is pending."""
        if not self._pending:
            return b""
        out = []
        for cg, recs in self._pending.items():
            head = Batch(self._next_batch, cg, recs[0].seq, recs[-1].seq,
                         min(r.time_ns for r in recs), max(r.time_ns for r in recs), b"")
            self._next_batch += 1
            body = seal(encode_records(recs), self.key, batch_aad(head), compress=self.compress)
            wire = encode(Batch(head.batch_id, cg, head.first_seq, head.last_seq, head.t_first_ns, head.t_last_ns, body))
            self._unacked.setdefault(cg, deque()).append(_Unacked(head.batch_id, cg, head.last_seq,
                                                                  self._pending_ids[cg]))
            self._batches += 1
            self._bytes += len(wire)
            out.append(wire)
        self._pending.clear()
        self._pending_ids.clear()
        return b"".join(out)

    # -- frames in ---------------------------------------------------------
    def on_frame(self, frame: Frame) -> list[tuple[int, bool]]:
        """Apply one frame from the appliance; the verdicts it settles.
        NetProtocolError (sticky, rule 6) for an Error or unexpected frame."""
        if isinstance(frame, Heartbeat):
            return []
        if isinstance(frame, Ack):
            return self._on_ack(frame)
        if isinstance(frame, Error):
            self.broken = f"appliance error {frame.code}: {frame.message}"
        else:
            self.broken = f"unexpected {type(frame).__name__} from the appliance"
        raise NetProtocolError(self.broken)

    def _on_ack(self, ack: Ack) -> list[tuple[int, bool]]:
        if not ack.durable:
            return []
        q = self._unacked.get(ack.cg)
        if not q or not any(u.batch_id == ack.batch_id for u in q):
            return []  # a batch of an earlier link, or one already covered by a later ack
        self._acks += 1
        out: list[tuple[int, bool]] = []
        while q and (q[0].batch_id == ack.batch_id or q[0].last_seq <= ack.last_seq):
            u = q.popleft()
            for io_id in u.io_ids:
                self._inflight.discard(io_id)
                out.append((io_id, True))
            if u.batch_id == ack.batch_id:
                break
        if not q:
            del self._unacked[ack.cg]
        self._acked += len(out)
        return out

    def fail_all(self, why: str = "link lost") -> list[int]:
        """The link is gone: every write without its durable ack (sent or
        not) gets False (rule 4); the io ids, in the order they were added."""
        if not self.broken:
            self.broken = why
        ids = [i for q in self._unacked.values() for u in q for i in u.io_ids]
        ids += [i for v in self._pending_ids.values() for i in v]
        self._unacked.clear()
        self._pending.clear()
        self._pending_ids.clear()
        self._inflight.clear()
        self._failed += len(ids)
        return ids

    def forget(self, io_ids: Iterable[int]) -> None:
        """Stop expecting verdicts for ``io_ids`` (their waits were given up);
        their batches stay in order, their acks are dropped."""
        for i in io_ids:
            self._inflight.discard(i)

    def statistics(self) -> NetStats:
        return NetStats(self._submitted, self._acked, self._failed, self._batches, self._acks, self._bytes,
                        len(self._inflight), sum(len(q) for q in self._unacked.values()))
