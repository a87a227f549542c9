"""Journal workloads for tests, and their oracles.

* `Workload` — TESTING.md D1/D2: a seeded stream of batches of
  self-describing blocks (`sd_block`) over two vdisks of one CG (overlapping
  and unaligned writes, zero, trim, barriers, deduplicated blocks, merge
  windows), with the ledger of what every seq did; `golden_at` replays the
  ledger prefix up to a seq (the D3 oracle).
* `rand_batches` — a simpler random batch stream for the journal's own
  tests; `check_after_cut` — D5: after a power cut, every acknowledged batch
  is back, no partial batch survived, and the journal takes the next batch.
"""

from __future__ import annotations

import random
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from nicsplit.core.records import BLOCK_SIZE, RFLAG_IN_WINDOW, Op
from nicsplit.journal.writer import Journal
from nicsplit.recovery.pits import Pit
from nicsplit.testing.appliance import CrashFilesystem
from nicsplit.wire.frames import Record, fingerprint

BS = BLOCK_SIZE
T0 = 1_700_000_000 * 10**9  # ns; record times are T0 + seq * 1 ms


# -- workload: ledger + self-describing blocks (D1, D2) ----------------------------------------

_BLOCK_HEAD = struct.Struct(">4sQQQ")  # magic b"NSTB", vdisk, block, seq; crc32 of the rest in the last 4 bytes


def sd_block(vdisk: int, block: int, seq: int) -> bytes:
    """A self-describing 4 KiB block (D2): who/where/when, filler, CRC."""
    head = _BLOCK_HEAD.pack(b"NSTB", vdisk, block, seq)
    filler = random.Random(hash((vdisk, block, seq))).randbytes(BS - len(head) - 4)
    body = head + filler
    return body + struct.pack(">I", zlib.crc32(body))


def check_sd(block: bytes, upto: int) -> bool:
    """D2 check of one block read back: zeros, or a self-describing block with
    a valid CRC and a seq not after the PIT (unaligned writes break the CRC:
    the golden image is the oracle for those)."""
    if block.count(0) == len(block):
        return True
    if block[:4] != b"NSTB" or zlib.crc32(block[:-4]) != struct.unpack(">I", block[-4:])[0]:
        return False
    return _BLOCK_HEAD.unpack_from(block)[3] <= upto


@dataclass
class V:
    id: int
    name: str
    size: int
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Meta:
    batch_id: int
    first_seq: int
    last_seq: int
    t_first_ns: int = 0
    t_last_ns: int = 0


@dataclass
class Workload:
    """A seeded stream of batches plus the ledger of what each seq did."""

    vdisks: list[V]
    batches: list[tuple[Meta, list[Record]]] = field(default_factory=list)
    ledger: list[tuple[int, int, int, int, int, bytes | None]] = field(default_factory=list)  # seq, vdisk, op, off, len, data
    unaligned: set[tuple[int, int]] = field(default_factory=set)  # (vdisk, block) ever written unaligned

    @classmethod
    def generate(cls, seed: int, nbatches: int = 60, vdisks: list[V] | None = None,
                 windows: bool = True, refs: bool = True, ref_window: int | None = None) -> "Workload":
        """``ref_window``: references pick among the last N blocks stored (the
        card's dedup horizon; None: any block stored so far)."""
        rng = random.Random(seed)
        w = cls(vdisks or [V(11, "alpha", 64 * BS), V(12, "beta", 48 * BS + 2048)])
        seq, bid = 0, 0
        held: list[bytes] = []  # inline blocks written so far (candidates for references)
        for _ in range(nbatches):
            bid += 1
            recs = []
            for _ in range(rng.randint(1, 6)):
                seq += rng.choice([1, 1, 1, 1, 2])  # merged writes leave seq gaps
                v = rng.choice(w.vdisks)
                nblocks = v.size // BS
                kind = rng.random()
                t = T0 + seq * 10**6
                if kind < 0.55:
                    n = rng.randint(1, 8)
                    b0 = rng.randrange(max(1, nblocks - n + 1))
                    n = min(n, nblocks - b0)
                    blocks = [sd_block(v.id, b, seq) for b in range(b0, b0 + n)]
                    data = b"".join(blocks)
                    rrefs: tuple = ()
                    if refs and held and rng.random() < 0.3:
                        i = rng.randrange(n)
                        reused = rng.choice(held[-ref_window:] if ref_window else held)
                        blocks[i] = reused
                        data = b"".join(blocks)
                        rrefs = ((i, fingerprint(reused)),)
                    inline = b"".join(b for i, b in enumerate(blocks) if not rrefs or i != rrefs[0][0])
                    held.extend(b for i, b in enumerate(blocks) if not rrefs or i != rrefs[0][0])
                    recs.append(Record(seq, seq, v.id, Op.WRITE, 0, b0 * BS, n * BS, t, inline, rrefs))
                    w.ledger.append((seq, v.id, Op.WRITE, b0 * BS, n * BS, data))
                elif kind < 0.7:  # unaligned (512-byte sectors), possibly across a block boundary
                    off = rng.randrange(v.size // 512 - 1) * 512
                    ln = min(rng.choice([512, 1024, 3584, 4608, 6144]), v.size - off)
                    data = rng.randbytes(ln)
                    recs.append(Record(seq, seq, v.id, Op.WRITE, 0, off, ln, t, data))
                    w.ledger.append((seq, v.id, Op.WRITE, off, ln, data))
                    w.unaligned.update((v.id, b) for b in range(off // BS, (off + ln - 1) // BS + 1))
                elif kind < 0.93:
                    op = Op.ZERO if kind < 0.82 else Op.TRIM
                    off = rng.randrange(v.size // 512) * 512
                    ln = min(rng.randint(1, 24) * 512, v.size - off)
                    recs.append(Record(seq, seq, v.id, op, 0, off, ln, t))
                    w.ledger.append((seq, v.id, op, off, ln, None))
                    w.unaligned.update((v.id, b) for b in (off // BS, (off + ln - 1) // BS))  # partly zeroed
                else:
                    recs.append(Record(seq, seq, v.id, Op.BARRIER, 1, 0, 0, t))
                    w.ledger.append((seq, v.id, Op.BARRIER, 0, 0, None))
            if windows and rng.random() < 0.15:  # the batch ends inside a merge window
                last = recs[-1]
                recs[-1] = Record(last.seq, last.io_id, last.vdisk_id, last.op, last.flags | RFLAG_IN_WINDOW,
                                  last.offset, last.length, last.time_ns, last.data, last.refs)
            last_seq = recs[-1].seq + rng.choice([0, 0, 0, 1])  # a commit may cover seqs after its last record
            seq = last_seq
            w.batches.append((Meta(bid, recs[0].seq, last_seq, recs[0].time_ns, T0 + last_seq * 10**6), recs))
        return w

    def write_journal(self, d: Path, *, segment_size: int = 64 * 1024, upto_batch: int | None = None,
                      start_batch: int = 0) -> None:
        with Journal.open(d, segment_size=segment_size) as j:
            for meta, recs in self.batches[start_batch:upto_batch]:
                assert j.append_batch(meta, recs).applied

    def expected_pits(self) -> list[Pit]:
        return [Pit(m.last_seq, m.t_last_ns, m.batch_id, not (recs[-1].flags & RFLAG_IN_WINDOW))
                for m, recs in self.batches]

    def goldens(self):
        """(seq, {vdisk id: image}) at every batch boundary, replaying the ledger (D3)."""
        imgs = {v.id: bytearray(v.size) for v in self.vdisks}
        i = 0
        for meta, _ in self.batches:
            while i < len(self.ledger) and self.ledger[i][0] <= meta.last_seq:
                _, vid, op, off, ln, data = self.ledger[i]
                if op == Op.WRITE:
                    imgs[vid][off : off + ln] = data
                elif op in (Op.ZERO, Op.TRIM):
                    imgs[vid][off : off + ln] = bytes(ln)
                i += 1
            yield meta.last_seq, imgs

    def written_blocks(self, upto: int) -> dict[int, set[int]]:
        out: dict[int, set[int]] = {v.id: set() for v in self.vdisks}
        for seq, vid, op, off, ln, _ in self.ledger:
            if seq <= upto and op != Op.BARRIER:
                out[vid].update(range(off // BS, (off + ln - 1) // BS + 1))
        return out


def journaled(tmp_path: Path, seed: int, nbatches: int = 40, segment_size: int = 48 * 1024) -> tuple[Path, Workload]:
    """A seeded workload written to a journal under ``tmp_path`` (many small
    segments, so readers cross segment boundaries)."""
    w = Workload.generate(seed, nbatches=nbatches)
    jd = tmp_path / "journal"
    w.write_journal(jd, segment_size=segment_size)
    return jd, w


def golden_at(w: Workload, seq: int) -> dict[int, bytes]:
    """{vdisk id: image} after replaying the ledger up to ``seq`` (D3)."""
    imgs = {v.id: bytearray(v.size) for v in w.vdisks}
    for s, vid, op, off, ln, data in w.ledger:
        if s > seq:
            break
        if op == Op.WRITE:
            imgs[vid][off : off + ln] = data
        elif op in (Op.ZERO, Op.TRIM):
            imgs[vid][off : off + ln] = bytes(ln)
    return {k: bytes(v) for k, v in imgs.items()}


# -- a simple random batch stream, and the D5 power-cut check ---------------------------------


def write(seq: int, data: bytes, offset: int = 0, vdisk: int = 1) -> Record:
    return Record(seq, 1000 + seq, vdisk, Op.WRITE, 0, offset, len(data), seq * 10, data)


def batch(bid: int, recs: list[Record]) -> Meta:
    return Meta(bid, recs[0].seq, recs[-1].seq, recs[0].time_ns, recs[-1].time_ns)


def rand_batches(rng: random.Random, n: int, per: int = 3, start: int = 1) -> list[tuple[Meta, list[Record]]]:
    out, seq = [], start
    for bid in range(1, n + 1):
        recs = []
        for _ in range(per):
            kind = rng.random()
            if kind < 0.7:
                recs.append(write(seq, rng.randbytes(rng.choice([512, 4096, 9000])), rng.randrange(100) * 4096))
            elif kind < 0.85:
                recs.append(Record(seq, seq, 2, Op.ZERO, 0, 0, 65536, seq * 10))
            else:
                recs.append(Record(seq, seq, 2, Op.BARRIER, 1, 0, 0, seq * 10))
            seq += 1
        out.append((batch(bid, recs), recs))
    return out


def check_after_cut(fs: CrashFilesystem, acked: list[tuple[Meta, list[Record]]], inflight: list[Record] | None,
                    **open_kw) -> None:
    with Journal.open(Path("/j"), fs=fs, segment_size=30000, **open_kw) as j:
        got = [r for r, _ in j.records()]
        want = [r for _, recs in acked for r in recs]
        assert got[: len(want)] == want, "an acknowledged batch is missing or damaged"
        rest = got[len(want) :]
        assert rest in ([], inflight or []), "a partial batch survived"
        assert j.last_seq == (rest[-1].seq if rest else (want[-1].seq if want else 0))
        # and the journal accepts the next batch after recovery
        nxt = write(j.last_seq + 1, b"after")
        j.append_batch(batch(999, [nxt]), [nxt])
