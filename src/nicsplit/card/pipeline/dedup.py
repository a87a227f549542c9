"""Stage 4, dedup: send a reference instead of a 4 KiB block the appliance
already holds.

Each WRITE item's payload is cut into 4 KiB blocks counted from the record's
start (block i = bytes ``[i*4096, (i+1)*4096)``); every full block is
fingerprinted (`nicsplit.wire.frames.fingerprint`, xxh3-128) on the *plain*
data — before compression and encryption, the borg/restic order. A block
whose fingerprint is in the known set becomes a ``(block index, fingerprint)``
ref and leaves the record's data; the other blocks stay, in order, so
``frames.expand(record, lookup)`` rebuilds the payload byte for byte. A
partial last block is always sent as data.

The known set holds only fingerprints the appliance *confirmed* it holds
(``Ack.known``, fed through `learn`), never ones the card merely sent: a ref
to a block still in flight could reach an appliance that lost that batch.
It is keyed by (CG, fingerprint): the appliance resolves a reference in the
CG's own journal only (docs/wire.md), so a block known in one CG is sent as
data to another. It is an LRU bounded by ``dedup_known_max`` entries (a hit
refreshes the entry; the least recently used is forgotten first); an entry
costs about 200 bytes, so the default 65536 is ~13 MB.

A block is referenced at most ``dedup_horizon_s`` after it was last learned
(a hit does not extend that): then it is sent as data again, the appliance
confirms that newer copy, and the old one is no longer needed. Retention
relies on it: it trims nothing appended within twice the horizon, so no
reference can ever name a block whose segment is gone.

Options: ``dedup`` (default on), ``dedup_known_max`` (default 65536),
``dedup_horizon_s`` (default 600).

Example::

    d = Dedup(known_max=65536)
    d.learn(ack.cg, ack.known)
    record, io_ids = d.apply(item)     # frames.Record with refs, io ids to free

No queue: a synchronous one-item-in, one-record-out transform.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from dataclasses import dataclass
from time import monotonic_ns
from typing import Iterable

import xxhash

from nicsplit.core.records import BLOCK_SIZE as BLOCK
from nicsplit.core.records import Op
from nicsplit.wire.frames import RECORD_HEAD, Record, fingerprint

from .encode import encode_record_fields
from .items import Item

_WRITE = Op.WRITE
_xxh3_128 = xxhash.xxh3_128_digest
_head = RECORD_HEAD.pack


@dataclass(frozen=True)
class DedupStats:
    enabled: bool
    records: int
    blocks: int  # full blocks fingerprinted
    ref_blocks: int  # sent by reference
    bytes_saved: int
    known: int  # fingerprints in the LRU
    known_max: int
    learned: int
    evicted: int
    expired: int  # known blocks sent as data again because they were past the horizon


class Dedup:
    def __init__(self, *, known_max: int = 65536, enabled: bool = True, horizon_s: float = 600.0) -> None:
        if known_max < 0:
            raise ValueError("dedup_known_max must be >= 0")
        self.enabled = enabled and known_max > 0
        self.known_max = known_max
        self.horizon_ns = int(horizon_s * 1e9)
        self._known: OrderedDict[tuple[str, bytes], int] = OrderedDict()  # -> monotonic ns when learned
        self._records = self._blocks = self._refs = self._learned = self._evicted = self._expired = 0

    def learn(self, cg: str, fps: Iterable[bytes]) -> None:
        """The appliance confirmed it holds these blocks in CG ``cg``'s journal."""
        if not self.enabled:
            return
        known = self._known
        now = monotonic_ns()
        keys = [(cg, fp) for fp in fps]
        if len(set(keys)) == len(keys) and not known.keys() & keys:
            # All new and distinct (a durable batch of new blocks, the steady
            # case): inserted in order, the oldest forgotten after. A loop of
            # stores, not `known.update(dict.fromkeys(keys, now))`: that one
            # C call costs ~350 ns a key on an OrderedDict, the loop ~150.
            for key in keys:
                known[key] = now
            self._learned += len(keys)
            over = len(known) - self.known_max
            if over > 0:
                pop = known.popitem
                for _ in range(over):
                    pop(last=False)
                self._evicted += over
            return
        for key in keys:
            if key in known:
                known[key] = now  # a newer copy: the horizon starts again
                known.move_to_end(key)
                continue
            known[key] = now
            self._learned += 1
            if len(known) > self.known_max:
                known.popitem(last=False)
                self._evicted += 1

    def apply(self, item: Item) -> tuple[Record, tuple[int, ...]]:
        return self.record(item.cg, item.seq, item.io_ids[-1], item.vdisk_id, int(item.op), item.flags,
                           item.offset, item.length, item.time_ns, item.data), item.io_ids

    def record(self, cg: str, seq: int, io_id: int, vdisk_id: int, op: int, flags: int, offset: int, length: int,
               time_ns: int, data: bytes | bytearray | memoryview) -> Record:
        """The record of one write (or merged item): full blocks the appliance
        already holds become references. Takes fields, not an `Item`, so the
        merge-off path builds no item per write."""
        self._records += 1
        refs: list[tuple[int, bytes]] = []
        if self.enabled and op == Op.WRITE and len(data) >= BLOCK:
            mv = memoryview(data)
            known = self._known
            kept: list[memoryview] = []
            nfull = len(data) // BLOCK
            self._blocks += nfull
            oldest = monotonic_ns() - self.horizon_ns
            for i in range(nfull):
                block = mv[i * BLOCK : (i + 1) * BLOCK]
                fp = fingerprint(block)
                t = known.get((cg, fp))
                if t is not None and t >= oldest:
                    known.move_to_end((cg, fp))
                    refs.append((i, fp))
                else:
                    if t is not None:  # past the horizon: send it again (the appliance re-homes it)
                        del known[(cg, fp)]
                        self._expired += 1
                    kept.append(block)
            if refs:
                self._refs += len(refs)
                kept.append(mv[nfull * BLOCK :])
                data = b"".join(kept)
        return Record(seq=seq, io_id=io_id, vdisk_id=vdisk_id, op=op, flags=flags, offset=offset, length=length,
                      time_ns=time_ns, data=bytes(data), refs=tuple(refs))

    def encode(self, cg: str, seq: int, io_id: int, vdisk_id: int, op: int, flags: int, offset: int, length: int,
               time_ns: int, data: bytes | bytearray | memoryview) -> tuple[bytes, int, int]:
        """`record` encoded at once (``encode.encode_record_fields``), for the
        pipeline's steady path: (encoded record, data bytes kept, blocks by
        reference). The same bytes ``encode_record(record(...))`` gives."""
        self._records += 1
        n = len(data)
        if not self.enabled or op != _WRITE or n < BLOCK:
            return encode_record_fields(seq, io_id, vdisk_id, op, flags, offset, length, time_ns, data), n, 0
        known = self._known
        if n == BLOCK:  # one block, the common write: no slicing
            self._blocks += 1
            fp = _xxh3_128(data)  # = frames.fingerprint, without its wrapper call
            t = known.get((cg, fp))
            if t is None:  # a new block (the steady case): `encode_record_fields` inline, no call
                try:
                    return _head(seq, io_id, vdisk_id, op, flags, offset, length, time_ns, 0, n) + data, n, 0
                except struct.error:  # a field out of range: encode_record names it
                    return encode_record_fields(seq, io_id, vdisk_id, op, flags, offset, length, time_ns, data), n, 0
            if t >= monotonic_ns() - self.horizon_ns:
                known.move_to_end((cg, fp))
                self._refs += 1
                return encode_record_fields(seq, io_id, vdisk_id, op, flags, offset, length, time_ns, b"",
                                            ((0, fp),)), 0, 1
            del known[(cg, fp)]  # past the horizon: send it again (the appliance re-homes it)
            self._expired += 1
            return encode_record_fields(seq, io_id, vdisk_id, op, flags, offset, length, time_ns, data), n, 0
        r = self.record(cg, seq, io_id, vdisk_id, op, flags, offset, length, time_ns, data)
        self._records -= 1  # counted above
        return (encode_record_fields(seq, io_id, vdisk_id, op, flags, offset, length, time_ns, r.data, r.refs),
                len(r.data), len(r.refs))

    @property
    def known(self) -> "OrderedDict[tuple[str, bytes], int] | None":
        """The known set ((CG, fingerprint) → when learned), for a caller
        that checks a run of 4 KiB blocks itself (`counted` then counts
        them); None when dedup is off."""
        return self._known if self.enabled else None

    def counted(self, records: int, blocks: int) -> None:
        """``records`` records (``blocks`` full blocks fingerprinted, none
        known) that the caller encoded as `encode` would have."""
        self._records += records
        self._blocks += blocks

    def statistics(self) -> DedupStats:
        return DedupStats(
            enabled=self.enabled, records=self._records, blocks=self._blocks, ref_blocks=self._refs,
            bytes_saved=self._refs * BLOCK, known=len(self._known), known_max=self.known_max,
            learned=self._learned, evicted=self._evicted, expired=self._expired,
        )
