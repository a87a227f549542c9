#!/usr/bin/env python3
"""The appliance's write path in one process, per record, on CPU time: what
ingest (frame decode → unseal → decode → journal append + seal → group
fsync → block-index refresh) and distribution (undo read + seal, image
seal + write, fsyncs) cost per 4 KiB record, without a card, TLS or the
scheduler of a shared machine in the way.

Synthetic batches as a card ships them: ``--records`` 4 KiB records each
(half random, half zeros: zstd halves them; unique, so no dedup), sealed
with a batch key, ``--group`` batches per group commit.  The journal and the
replica are sealed at rest (a keyring with an active key), as by default.

    .venv/bin/python bench/appliance_path.py [--batches 200] [--records 256] [--group 4]
        [--rounds 3] [--span BLOCKS] [--profile ingest|distribution] [--part both|ingest] [--handoff] [--json OUT]

Prints records per CPU-second (one core's worth) for ingest and for
distribution, medians of ``--rounds`` (spread min–max), and with
``--profile`` the top of a cProfile of one round's part.  Nothing here
asserts on speed (bench/keepup.py is the whole-system measure).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nicsplit.core.layout import Layout
from nicsplit.core.records import Op
from nicsplit.journal.writer import Journal
from nicsplit.recovery.blockindex import BlockIndex
from nicsplit.recovery.distribution import PayloadHandoff, journaled_payloads
from nicsplit.recovery.replica import Distributor
from nicsplit.storage import atrest
from nicsplit.wire import envelope, frames as F

BS = 4096


@dataclass
class Vd:
    id: int
    name: str
    size: int


def make_batches(n: int, per: int, key: bytes, cg: str, seed: int, span: int = 1 << 18) -> list[bytes]:
    """``n`` Batch frames (encoded, as read off the wire) of ``per`` records."""
    rnd = os.urandom(BS // 2 * 64)
    out = []
    seq = 0
    for b in range(n):
        recs = []
        t = time.time_ns()
        for _ in range(per):
            seq += 1
            r = (seq * 2654435761 + seed) % 64
            data = seq.to_bytes(8, "little") + rnd[r * (BS // 2) + 8 : (r + 1) * (BS // 2)] + bytes(BS // 2)
            off = ((seq * 7919) % span) * BS  # random-ish 4 KiB offsets in the first ``span`` blocks
            recs.append(F.Record(seq, seq, 1, Op.WRITE, 0, off, BS, t, data))
        meta = F.Batch(b + 1, cg, seq - per + 1, seq, t, t, b"")
        body = envelope.seal(F.encode_records(recs), key, F.batch_aad(meta))
        out.append(F.encode(F.Batch(meta.batch_id, cg, meta.first_seq, meta.last_seq, t, t, body)))
    return out


def ingest(jdir: Path, frames: list[bytes], key: bytes, group: int, handoff: Any = None) -> int:
    """The server's per-group work (Appliance._ingest_group), in one thread;
    with ``handoff``, each group's journaled payloads are offered to it after
    the group's fdatasync, as the appliance does (docs/recovery.md §11)."""
    try:  # the appliance's one-pass decode; a tree from before it decodes Records (before/after runs)
        from nicsplit.wire.wirerecords import decode_wire_records as decode
    except ImportError:
        decode = F.decode_records
    dec = F.FrameDecoder()
    j = Journal.open(jdir)
    idx = BlockIndex(jdir)
    n = 0
    try:
        for i in range(0, len(frames), group):
            batches = []
            for fr in frames[i : i + group]:
                dec.receive_data(fr)
                batches.append(dec.next_event())
            fed = True
            results, decoded = [], []
            for b in batches:
                recs = decode(envelope.unseal(b.body, key, F.batch_aad(b)))
                res = j.append_batch(b, recs, sync=False)
                results.append(res)
                decoded.append(recs)
                n += len(recs)
                if fed:  # the appliance's index update (a scan when the writer's heads do not fit)
                    fed = bool(getattr(idx, "feed", None)) and idx.feed(res.batch)
            j.sync()
            if handoff is not None:
                handoff.offer(journaled_payloads(results, decoded))
            if not fed:
                idx.refresh()
    finally:
        j.close()
    return n


def distribute(j: Journal, d: Distributor) -> int:
    """CGDistribution's steps (the journal and the replica are open already)."""
    n = 0
    while (k := d.step(1024, j.durable_seq, 8 << 20)):
        n += k
    return n


def timed(fn, profile: bool):
    prof = cProfile.Profile() if profile else None
    c0 = time.process_time()
    if prof:
        prof.enable()
    n = fn()
    if prof:
        prof.disable()
    cpu = time.process_time() - c0
    text = None
    if prof:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats(os.environ.get("APP_SORT", "tottime")).print_stats(int(os.environ.get("APP_N", "25")))
        text = s.getvalue()
    return n, cpu, text


def one_round(work: Path, a: argparse.Namespace, seed: int) -> dict:
    data = work / "data"
    lay = Layout(data)
    lay.journals.mkdir(parents=True)
    atrest.ensure(lay.keyring, True)
    key = os.urandom(32)
    frames = make_batches(a.batches, a.records, key, "k", seed, a.span)
    jdir = lay.journal("k")
    # --handoff: held for the whole run (distribution runs after ingest here), not bounded as in the appliance
    handoff = PayloadHandoff(max_bytes=len(frames) * a.records * BS * 2) if a.handoff else None
    n, cpu, prof_i = timed(lambda: ingest(jdir, frames, key, a.group, handoff), a.profile == "ingest")
    out = {"records": n, "ingest_cpu_s": cpu, "ingest_per_core_per_s": n / cpu,
           "ingest_us_per_record": 1e6 * cpu / n}
    if a.part == "ingest":
        out["profile"] = prof_i
        return out
    with Journal.open(jdir) as j, Distributor(jdir, lay.replica("k"), [Vd(1, "v", 1 << 30)], journal=j,
                                               index=BlockIndex(jdir), handoff=handoff) as d:
        n2, cpu2, prof_d = timed(lambda: distribute(j, d), a.profile == "distribution")
    out.update({"distributed": n2, "distribution_cpu_s": cpu2, "distribution_per_core_per_s": n2 / cpu2,
                "distribution_us_per_record": 1e6 * cpu2 / n2})
    if handoff is not None:
        out["handoff_hits"], out["handoff_misses"] = handoff.hits, handoff.misses
    out["profile"] = prof_i or prof_d
    return out


try:  # the product's processes tune malloc first thing (nicsplit.core.malloc); so does this stand-in
    from nicsplit.core.malloc import tune as _tune_malloc
except ImportError:  # a tree from before it (--tree comparisons)
    def _tune_malloc() -> bool:
        return False


def main(argv: list[str] | None = None) -> int:
    _tune_malloc()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--records", type=int, default=256, help="records per batch (the card's 1 MiB batch: 256)")
    ap.add_argument("--group", type=int, default=4, help="batches per group commit")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--span", type=int, default=1 << 18,
                    help="4 KiB blocks the writes land in (default 1 GiB: mostly fresh blocks; a small span "
                         "overwrites: the steady state, where every record's pre-image is read and kept)")
    ap.add_argument("--profile", choices=("ingest", "distribution"))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--part", choices=("both", "ingest"), default="both", help="ingest: skip distribution")
    ap.add_argument("--handoff", action="store_true",
                    help="distribution takes the payloads ingest journaled from a PayloadHandoff, as in the "
                         "appliance, instead of reading them back from the journal")
    a = ap.parse_args(argv)
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}", flush=True)
    rounds = []
    for i in range(a.rounds):
        with tempfile.TemporaryDirectory(prefix="nicsplit-apath-") as tmp:
            rounds.append(one_round(Path(tmp), a, seed + i))
    res: dict = {"batches": a.batches, "records_per_batch": a.records, "group": a.group, "rounds": a.rounds,
                 "span_blocks": a.span}
    for k in ("ingest_per_core_per_s", "ingest_us_per_record", "distribution_per_core_per_s",
              "distribution_us_per_record"):
        if k not in rounds[0]:
            continue
        xs = [r[k] for r in rounds]
        res[k] = {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}
        print(f"{k}: {statistics.median(xs):,.1f} ({min(xs):,.1f}–{max(xs):,.1f})")
    if a.handoff:
        print(f"payloads from the handoff: {sum(r['handoff_hits'] for r in rounds):,}, "
              f"read from the journal: {sum(r['handoff_misses'] for r in rounds):,}")
    if a.profile:
        print(rounds[0]["profile"])
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
