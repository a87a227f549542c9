"""Fakes for testing the card pipeline in-process (no ring, no network).

* `FakeCatalog` — a `CardCatalog` from a dict.
* `FakeEndpoint` — a `CardEndpoint`: tests `push` writes and outcomes, the
  pipeline polls them; `release` behaves like the ring's (an unknown or
  twice-released io id raises), and ``released`` records the order.
* `FakeAppliance` — the appliance's ingest rules, sans-IO: answers Hello
  with resume, opens batch frames with ``envelope.unseal``, expands refs,
  journals every record above the CG's durable seq exactly once, and acks
  durable with the fingerprints of the blocks it now holds.
* `write(...)` — an `AugmentedWrite` with defaults.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, replace

from nicsplit.core.records import BLOCK_SIZE, AugmentedWrite, Op, Outcome, Status, WFlag
from nicsplit.wire.frames import (
    NEED_DATA, PROTOCOL_VERSION, Ack, Batch, FrameDecoder, Heartbeat, Hello, HelloAck, Record, batch_aad,
    decode_records, encode, expand, fingerprint,
)
from nicsplit.wire.envelope import unseal


def write(io_id: int, cg_seq: int, *, cg_id: int = 1, vdisk_id: int = 1, offset: int = 0, data: bytes = b"",
          op: Op = Op.WRITE, length: int | None = None, flags: WFlag = WFlag.NONE,
          ts: int | None = None) -> AugmentedWrite:
    if length is None:
        length = len(data) if op == Op.WRITE else 0
    return AugmentedWrite(io_id, cg_id, cg_seq, vdisk_id, op, flags, offset, length,
                          time.time_ns() if ts is None else ts, data if op == Op.WRITE else None)


def committed(io_id: int) -> Outcome:
    return Outcome(io_id, Status.COMMITTED)


def failed(io_id: int) -> Outcome:
    return Outcome(io_id, Status.FAILED)


class FakeCatalog:
    def __init__(self, vdisks: dict[int, tuple[str, str, int]]) -> None:
        self.vdisks = dict(vdisks)

    def lookup(self, vdisk_id: int) -> tuple[str, str, int] | None:
        return self.vdisks.get(vdisk_id)

    def cg_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(cg for cg, _, _ in self.vdisks.values()))


class FakeEndpoint:
    def __init__(self) -> None:
        self.queue: deque[AugmentedWrite | Outcome] = deque()
        self.held: set[int] = set()
        self.released: list[int] = []
        self.sleeping = False
        self.full_flag = False
        self.heartbeats = 0
        self.closed = False

    def push(self, *entries: AugmentedWrite | Outcome) -> None:
        for e in entries:
            if isinstance(e, AugmentedWrite) and e.op == Op.WRITE and e.data is not None:
                self.held.add(e.io_id)
            self.queue.append(e)

    def poll(self, max_entries: int = 256) -> list[AugmentedWrite | Outcome]:
        out = []
        while self.queue and len(out) < max_entries:
            out.append(self.queue.popleft())
        return out

    def release(self, io_id: int) -> None:
        if io_id not in self.held:
            raise KeyError(f"io {io_id} is not held (never received, or released twice)")
        self.held.remove(io_id)
        self.released.append(io_id)

    def pending(self) -> bool:
        return bool(self.queue)

    def set_sleeping(self, sleeping: bool) -> None:
        self.sleeping = sleeping

    def set_full(self, full: bool) -> None:
        self.full_flag = full

    def wait_doorbell(self, timeout: float) -> bool:
        time.sleep(min(timeout, 0.001))
        return self.pending()

    def heartbeat(self) -> None:
        self.heartbeats += 1

    def statistics(self) -> dict:
        return {"held": len(self.held), "released": len(self.released)}

    def close(self) -> None:
        self.closed = True


@dataclass(frozen=True)
class Journaled:
    cg: str
    record: Record  # with the full payload (refs expanded)
    batch_id: int


class FakeAppliance:
    """Sans-IO appliance ingest (see module docstring). ``durable_acks=False``
    makes it answer non-durable acks only (nothing may be released)."""

    def __init__(self, key: bytes | None, *, appliance_id: str = "fake-appliance") -> None:
        self.key = key
        self.appliance_id = appliance_id
        self.durable: dict[str, int] = {}
        self.journal: list[Journaled] = []
        self.blocks: dict[str, dict[bytes, bytes]] = {}  # per CG: references resolve in the CG's journal
        self.batches = 0
        self.duplicates = 0
        self.durable_acks = True
        self.refuse: set[str] = set()  # CGs a Hello names that HelloAck leaves out (the appliance's rule 2)
        self._dec = FrameDecoder()

    def connect(self) -> None:
        self._dec = FrameDecoder()  # a new connection: the old stream's tail is gone

    def hello(self, hello: Hello) -> HelloAck:
        return HelloAck(self.appliance_id, PROTOCOL_VERSION,
                        {cg: self.durable.get(cg, 0) for cg in hello.cgs if cg not in self.refuse})

    def receive(self, data: bytes) -> list[Ack]:
        self._dec.receive_data(data)
        acks = []
        while (f := self._dec.next_event()) is not NEED_DATA:
            if isinstance(f, Batch):
                acks.append(self.batch(f))
        return acks

    def batch(self, b: Batch) -> Ack:
        self.batches += 1
        head = replace(b, body=b"")
        records = decode_records(unseal(b.body, self.key, batch_aad(head)))
        assert [r.seq for r in records] == sorted({r.seq for r in records}), "records out of order"
        assert records[0].seq == b.first_seq and records[-1].seq == b.last_seq
        if not self.durable_acks:  # received, not yet fsynced: nothing journaled, nothing durable
            return Ack(b.batch_id, b.cg, b.last_seq, False, ())
        done = self.durable.get(b.cg, 0)
        known: list[bytes] = []
        blocks = self.blocks.setdefault(b.cg, {})
        for r in records:
            if r.seq <= done:
                self.duplicates += 1
                continue
            full = expand(r, blocks.__getitem__)  # KeyError: a ref to a block this CG does not hold
            for i in range(len(full) // BLOCK_SIZE):
                block = full[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]
                fp = fingerprint(block)
                blocks[fp] = block
                known.append(fp)
            self.journal.append(Journaled(b.cg, replace(r, data=full, refs=()), b.batch_id))
        self.durable[b.cg] = max(done, b.last_seq)
        return Ack(b.batch_id, b.cg, self.durable[b.cg], True, tuple(dict.fromkeys(known)))

    def records(self, cg: str) -> list[Record]:
        return [j.record for j in self.journal if j.cg == cg]


class FakeApplianceServer:
    """`FakeAppliance` behind asyncio streams (e.g. ``asyncio.start_unix_server``):
    Hello → HelloAck, batches → acks. ``drop_after_batches=N`` closes the
    connection after the N-th batch of a connection, before acking it (a
    link that dies mid-stream), ``connections`` counts sessions."""

    def __init__(self, app: FakeAppliance, *, drop_after_batches: int | None = None) -> None:
        self.app = app
        self.drop_after_batches = drop_after_batches
        self.connections = 0
        self.hellos: list[Hello] = []
        self.unknown_cg = 0  # batches refused: CG not accepted in this connection's Hello

    async def handle(self, reader, writer) -> None:
        self.connections += 1
        dec = FrameDecoder()
        self.app.connect()
        batches = 0
        accepted: dict[str, int] = {}
        try:
            while data := await reader.read(1 << 16):
                dec.receive_data(data)
                while (f := dec.next_event()) is not NEED_DATA:
                    if isinstance(f, Hello):
                        self.hellos.append(f)
                        ack = self.app.hello(f)
                        accepted = ack.resume
                        writer.write(encode(ack))
                    elif isinstance(f, Batch):
                        if f.cg not in accepted:
                            self.unknown_cg += 1
                            return  # the real appliance sends Error(UNKNOWN_CG) and closes
                        batches += 1
                        if self.drop_after_batches is not None and batches >= self.drop_after_batches:
                            self.drop_after_batches = None  # once
                            return
                        writer.write(encode(self.app.batch(f)))
                    elif isinstance(f, Heartbeat):
                        writer.write(encode(Heartbeat(f.time_ns)))
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
