#!/usr/bin/env python3
"""The card's pipeline worker in one process, on CPU time: the real acker
(`RingAcker`) and the real worker (`CardProcess.poll_once` on a
`HandoffEndpoint`, overflow log on, as `nicsplit card run` builds it) on one
ring, driven by the host's `RingSplitter`; a sans-IO appliance answers each
sealed batch with a durable ack naming its blocks (as the real one does).

Only the worker's side is timed (poll → feed → hold → dedup → encode →
compress → seal → window, and the acks' releases): the splitter, the acker
and the appliance are not. Reports CPU µs per write (median of rounds) and,
with ``--calls``, Python calls per write (cProfile, a separate round) and
the top functions by own time.

    .venv/bin/python bench/card_inproc.py [--rounds 3] [--writes 50000] [--calls] [--bytecodes]

``--bytecodes`` adds a traced round (``sys.settrace`` opcode events, after
an untraced warm-up): Python bytecodes and Python frames per write on the
worker's side, and the functions that run the most. Unlike CPU time these
do not move with the box's load, so a small change shows in one run; they
do not see C (zstd, AES-GCM, hashing, allocation).

4 KiB writes, half random / half zeros (zstd halves them), unique (no
dedup hits). Nothing here asserts on speed.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from nicsplit.card.handoff import Handoff
from nicsplit.card.process import CardConfig, CardProcess
from nicsplit.card.transports.ring_acker import RingAcker
from nicsplit.card.transports.ring_handoff import HandoffEndpoint
from nicsplit.card.transports.ring_splitter import RingSplitter
from nicsplit.core.records import BLOCK_SIZE, AugmentedWrite, Op, Status, WFlag
from nicsplit.testing.pipeline import FakeCatalog
from nicsplit.wire.envelope import unseal
from nicsplit.wire.frames import (NEED_DATA, Ack, Batch, FrameDecoder, batch_aad,
                                  decode_records, encode, fingerprint)

KEY = bytes(range(32))
BS = 4096
FAR = 10 * 1_000_000_000


class Appliance:
    """Acks every batch durable with the fingerprints of its full blocks."""

    def __init__(self) -> None:
        self.dec = FrameDecoder()
        self.durable: dict[str, int] = {}

    def receive(self, data: bytes) -> list[Ack]:
        self.dec.receive_data(data)
        acks = []
        while (b := self.dec.next_event()) is not NEED_DATA:
            if isinstance(b, Batch):
                head = replace(b, body=b"")
                fps = [fingerprint(r.data[i:i + BLOCK_SIZE]) for r in decode_records(unseal(b.body, KEY, batch_aad(head)))
                       for i in range(0, len(r.data) - BLOCK_SIZE + 1, BLOCK_SIZE)]
                self.durable[b.cg] = b.last_seq
                acks.append(Ack(b.batch_id, b.cg, b.last_seq, True, tuple(fps)))
        return acks


def one_round(tmp: Path, n: int, prof: cProfile.Profile | None) -> float:
    ho = Handoff.create()
    acker = RingAcker(str(tmp / "run"), handoff=ho, data_size=256 << 20)
    who = Handoff(os.dup(ho.fd))
    ep = HandoffEndpoint(who, acker.volume_path, acker.fake_uid, acker.wake_fd,
                         on_refused=lambda *a: None)  # the card replaces it with its lost log
    sp = RingSplitter.connect(str(acker.socket_path))
    cfg = CardConfig.from_mapping(tmp / "data", {"tls": False, "cpus": []})

    async def never():  # the link is driven by hand below
        raise OSError("no link")

    card = CardProcess(cfg, ep, FakeCatalog({1: ("k", "v", 1 << 40)}), key=KEY, connect=never)
    app = Appliance()
    wire: list[bytes] = []
    window = card.pipeline.window
    window.connected({"k": 0}, wire.append, ["k"])
    half = [os.urandom(BS // 2) + bytes(BS // 2) for _ in range(256)]
    cpu = [0.0]
    dec = FrameDecoder()
    pt = time.process_time

    def work() -> None:
        """The worker's side until it has nothing to do (timed), the
        appliance's answers (not timed) and the acks' releases (timed)."""
        while True:
            t0 = pt()
            if prof:
                prof.enable()
            while card.poll_once()[0]:
                pass
            if prof:
                prof.disable()
            cpu[0] += pt() - t0
            if not wire:
                return
            frames = b"".join(wire)
            wire.clear()
            acks = b"".join(encode(a) for a in app.receive(frames))
            t0 = pt()
            if prof:
                prof.enable()
            dec.receive_data(acks)  # the worker decodes the acks off the wire (as `Shipper` does)
            while (a := dec.next_event()) is not NEED_DATA:
                window.on_ack(a)
            card.pipeline.pump(time.monotonic_ns())
            if prof:
                prof.disable()
            cpu[0] += pt() - t0

    try:
        s = 0
        while s < n:
            burst = []
            for _ in range(32):
                s += 1
                w = AugmentedWrite(s, 1, s, 1, Op.WRITE, WFlag.NONE, (s % 4096) * BS, BS, time.time_ns(),
                                   s.to_bytes(8, "little") + half[s % 256][8:])
                while not sp.submit(w):  # the ring is full: let the card catch up
                    acker.pump()
                    sp.reap()
                    work()
                burst.append(w)
            acker.pump()
            acker.heartbeat()  # (the acker's own loop does this: the splitter refuses a card gone quiet)
            for w in burst:
                assert sp.wait_ack(w.io_id, time.monotonic_ns() + FAR)
                sp.post_outcome(w.io_id, Status.COMMITTED)
            acker.pump()
            work()
        deadline = time.monotonic() + 30
        while card.pipeline.statistics().released < s and time.monotonic() < deadline:  # the last batches
            work()
        st = card.pipeline.statistics()
        assert st.writes_in == s and not st.lost, (st.writes_in, st.lost)
        assert card.overflow is None or card.overflow.diverted == 0, "diverted to the overflow log: not the steady path"
    finally:
        sp.close()
        ep.close()
        who.close()
        os.close(who.fd)
        acker.close()
        ho.close()
        os.close(ho.fd)
    return cpu[0]


try:  # the product's processes tune malloc first thing (nicsplit.core.malloc); so does this stand-in
    from nicsplit.core.malloc import tune as _tune_malloc
except ImportError:  # a tree from before it (--tree comparisons)
    def _tune_malloc() -> bool:
        return False


class OpcodeCounter:
    """`one_round`'s profiler stand-in: counts bytecodes per function (by
    code object) and Python frames while enabled."""

    def __init__(self) -> None:
        self.ops: dict[tuple[str, str], int] = {}
        self.frames = 0

    def _local(self, frame, event, arg):  # noqa: ANN001 (a trace function)
        if event == "opcode":
            k = (Path(frame.f_code.co_filename).name, frame.f_code.co_name)
            self.ops[k] = self.ops.get(k, 0) + 1
        return self._local

    def _global(self, frame, event, arg):  # noqa: ANN001
        frame.f_trace_opcodes = True
        self.frames += 1
        return self._local

    def enable(self) -> None:
        sys.settrace(self._global)

    def disable(self) -> None:
        sys.settrace(None)


def main(argv: list[str] | None = None) -> int:
    _tune_malloc()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--writes", type=int, default=30_000)
    ap.add_argument("--calls", action="store_true", help="also one profiled round: Python calls per write")
    ap.add_argument("--bytecodes", action="store_true",
                    help="also one traced round: Python bytecodes and frames per write (load-blind)")
    a = ap.parse_args(argv)
    us = []
    with tempfile.TemporaryDirectory(prefix="nicsplit-inproc-") as tmp:
        for i in range(a.rounds):
            cpu = one_round(Path(tmp) / f"r{i}", a.writes, None)
            us.append(1e6 * cpu / a.writes)
            print(f"round {i + 1}: worker {us[-1]:.2f} µs CPU per write", flush=True)
        if us:
            print(f"median {statistics.median(us):.2f} µs per write, spread {min(us):.2f}..{max(us):.2f} "
                  f"(load {os.getloadavg()[0]:.2f})")
        if a.calls:
            prof = cProfile.Profile()
            one_round(Path(tmp) / "prof", a.writes, prof)
            st = pstats.Stats(prof)
            calls = sum(v[1] for v in st.stats.values())  # type: ignore[attr-defined]
            print(f"Python calls per write: {calls / a.writes:.1f}")
            rows = sorted(st.stats.items(), key=lambda kv: -kv[1][1])[:25]  # type: ignore[attr-defined]
            for (f, line, name), (cc, nc, tt, ct, _) in rows:
                print(f"  {nc / a.writes:7.3f}/write  {1e6 * tt / a.writes:6.2f} µs own  {Path(f).name}:{line} {name}")
        if a.bytecodes:
            n = min(a.writes, 5000)  # tracing costs ~50x: a smaller round, after a warm-up one
            one_round(Path(tmp) / "warm", 2000, None)
            oc = OpcodeCounter()
            one_round(Path(tmp) / "traced", n, oc)  # type: ignore[arg-type]
            print(f"Python bytecodes per write: {sum(oc.ops.values()) / n:.1f}, Python frames per write: "
                  f"{oc.frames / n:.2f}")
            for (f, name), k in sorted(oc.ops.items(), key=lambda kv: -kv[1])[:12]:
                print(f"  {k / n:7.1f}/write  {f}:{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
