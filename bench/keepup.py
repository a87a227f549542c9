#!/usr/bin/env python3
"""``make bench`` suite for issue 9, keeping up: does the card ack in
microseconds under load, and do the card and the appliance cost less CPU
per write than the host?

Two parts, each on this machine and in one run (ratios, not absolute
numbers, are the point; docs/benchmarks.md):

1. **Components** (``--rounds`` rounds, medians and spread): a real
   appliance (``nicsplit appliance run``, distribution held off the way a
   failover holds it, so its CPU is ingest) and a real card
   (``nicsplit card run``: acker + pipeline worker), driven by a synthetic
   splitter in this process through the real ring (`RingSplitter`, the
   host's own driver), 4 KiB half-compressible unique payloads:
   - *idle*: the card's CPU with no writes for ``--idle-seconds``;
   - *QD1*: submit → ack latency of the card (``split`` then the outcome);
   - *1 MiB QD1*: the same for 1 MiB writes;
   - *stream*: as many writes as the splitter can publish, in bursts of 32,
     until the appliance holds them all durably: per-process CPU per write
     (acker: busy and empty-poll time apart; worker; appliance), and from
     it each component's writes per second of one core.
2. **End to end** (``nicsplit up`` with the default configuration, exactly
   as ``make run`` starts it): fio 4 KiB randwrite QD16 on two vdisks of one
   CG, paced at ``--rate-iops`` in total for ``--seconds``, then unpaced for
   ``--seconds`` on two fresh vdisks of another CG. Sampled every 0.5 s:
   IOPS, RPO, state. Reported: the splitter's added latency (the host's
   ``split`` histogram), per-process CPU per write (host, card acker with its
   empty-poll time, worker, appliance) and the ratio (card work + appliance)
   / host; plus the 4 KiB and the 1 MiB QD1 split latency through the host
   (fio at QD1 on a vdisk of a third CG, before the QD16 phases).

    .venv/bin/python bench/keepup.py [--quick] [--rounds 3] [--seconds 60] [--rate-iops 10000] [--out bench/out]
    .venv/bin/python bench/keepup.py --qd1-only [--host-anywhere] [--rounds 3]   # the 4 KiB QD1 phase alone
    .venv/bin/python bench/keepup.py --e2e-qd1-only [--rounds 3]   # the end-to-end 4 KiB QD1 phase alone
    # (the synthetic host keeps off the acker's CPUs, as `nicsplit up` places the host, unless --host-anywhere)

Writes ``keepup.json``, ``keepup.md`` and ``keepup.png`` into ``--out``.
Nothing here asserts on speed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from time import monotonic_ns
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (cpu_seconds, fio_cmd, idle_poll_hold, kernel_threads_cpu, kernel_threads_cpu_s, loadavg,  # noqa: E402
                     percentile as pct, pyplot, run_fio, runq_wait_s)
from nicsplit.card.transports.net import NetSplitter  # noqa: E402
from nicsplit.card.transports.ring_splitter import RingSplitter  # noqa: E402
from nicsplit.core.catalog import CatalogReader  # noqa: E402
from nicsplit.core.cgs import CGCatalog  # noqa: E402
from nicsplit.core.ctl import request  # noqa: E402
from nicsplit.core.layout import Layout  # noqa: E402
from nicsplit.core.records import AugmentedWrite, Op, Status, WFlag  # noqa: E402
from nicsplit.testing.datadir import init_data  # noqa: E402
from nicsplit.testing.procs import ReadyProcess, UpProcess, nicsplit_cmd, run_cli, wait_for  # noqa: E402
from nicsplit.testing.stack import latest_pit_equals_production  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BS = 4096


def med(xs: list[Any]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def spread(xs: list[Any]) -> tuple[float, float] | None:
    xs = [x for x in xs if x is not None]
    return (min(xs), max(xs)) if xs else None


def payloads(n: int, size: int) -> list[bytes]:
    """Half random, half zeros: zstd halves them; the first 8 bytes are
    overwritten per write so no two are the same block (no dedup)."""
    return [os.urandom(size // 2) + bytes(size - size // 2) for _ in range(n)]


class Appliance(ReadyProcess):
    what = "appliance"

    def argv(self) -> list[str]:
        return nicsplit_cmd("--data", str(self.data), "appliance", "run", "--listen", "127.0.0.1:0")


class Sink(ReadyProcess):
    """bench/sink.py: acks every batch at once (the card measured alone)."""

    what = "sink"

    def argv(self) -> list[str]:
        return [sys.executable, str(Path(__file__).resolve().parent / "sink.py"), "--data", str(self.data)]

    def __enter__(self) -> "Sink":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Card(ReadyProcess):
    what = "card"

    def __init__(self, data: Path, appliance: str) -> None:
        super().__init__(data)
        self.appliance = appliance

    def argv(self) -> list[str]:
        return nicsplit_cmd("--data", str(self.data), "card", "run", "--appliance", self.appliance)


def card_stats(data: Path) -> dict:
    # A loaded machine can miss the control socket's timeout: ask again a while.
    got: dict = {}

    def ask() -> bool:
        got.update((request(Layout(data).card_ctl_sock, {"cmd": "stats"}) or {}).get("stats") or {})
        return bool(got)

    wait_for(ask, 30, "the card's stats", interval=0.2)
    return got


def durable_seq(data: Path, cg: str) -> int:
    st = (request(Layout(data).appliance_sock, {"cmd": "status"}) or {}).get("status") or {}
    return ((st.get("cgs") or {}).get(cg) or {}).get("durable_seq") or 0


def cpu_of(pids: dict[str, int]) -> dict[str, float]:
    return {k: cpu_seconds(p) for k, p in pids.items()}


def diff(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: b[k] - a[k] for k in a}


# -- part 1: components --------------------------------------------------------------


def component_round(work: Path, *, n_qd1: int, n_big: int, n_stream: int, idle_s: float,
                    qd1_only: bool = False, host_off_card: bool = False) -> dict[str, Any]:
    data = init_data(work / "data", sections={"card": {"transport_options": {"data_size": "256M"}},
                                              "appliance": {"peers": ["card", "host"]}})
    run_cli(data, "cg", "create", "k")
    run_cli(data, "vdisk", "create", "v", "--size", "64G", "--cg", "k")
    run_cli(data, "cg", "create", INGEST_CG)
    run_cli(data, "vdisk", "create", "vi", "--size", "64G", "--cg", INGEST_CG)
    for cg in ("k", INGEST_CG):  # distribution held off: ingest alone
        (data / "appliance" / "failover").mkdir(parents=True, exist_ok=True)
        (data / "appliance" / "failover" / f"{cg}.json").write_text("{}")
    out: dict[str, Any] = {}
    allowed = os.sched_getaffinity(0)
    seq = [0]
    small = payloads(256, BS)

    def w(size: int, data_: bytes) -> AugmentedWrite:
        seq[0] += 1
        s = seq[0]
        return AugmentedWrite(s, 1, s, 1, Op.WRITE, WFlag.NONE, (s % 4096) * size, size, time.time_ns(),
                              s.to_bytes(8, "little") + data_[8:])

    with Appliance(data) as app:
        with card_ring(data, app.ready["address"], host_off_card, allowed, out) as (card, r):
            pids = {"acker": card.pid, "worker": card.ready["worker_pid"], "appliance": app.pid}
            if not qd1_only:
                out["idle"] = idle(pids, idle_s)
            st0 = card_stats(data)
            out["qd1"] = qd1(r, [w(BS, small[i % 256]) for i in range(n_qd1)])
            st1 = card_stats(data)
            out["qd1"]["acker_sleeps"] = _hget(st1, "acker_sleeps") - _hget(st0, "acker_sleeps")
            if qd1_only:
                return out
            big = payloads(4, 1 << 20)
            out["qd1_1m"] = qd1(r, [w(1 << 20, big[i % 4]) for i in range(n_big)])
        # The card alone: its batches go to a sink that acks each at once (bench/sink.py).
        with Sink(data).start() as sink, card_ring(data, sink.ready["address"], host_off_card, allowed, {}) as (card, r):
            pids = {"acker": card.pid, "worker": card.ready["worker_pid"], "sink": sink.pid}
            out["stream"] = stream(r, data, pids, lambda: w(BS, small[seq[0] % 256]), n_stream)
        # The appliance's ingest alone: a synthetic card (the net transport's shipper, zstd and
        # the batch key as the card's batches) over real TLS, batches of the card's size.
        out["ingest"] = asyncio.run(ingest(data, app.ready["address"], app.pid, small, n_stream))
    return out


@contextlib.contextmanager
def card_ring(data: Path, appliance: str, host_off_card: bool, allowed: set[int], out: dict
              ) -> Iterator[tuple["Card", RingSplitter]]:
    """`nicsplit card run` shipping to ``appliance``, and the host's ring
    splitter connected to it; the bench process off the acker's CPUs when
    asked (the rule `nicsplit up` applies, [host] cpus = "auto")."""
    card = Card(data, appliance).start()
    try:
        r = RingSplitter.connect(str(Layout(data).card_sock))
        acker = tuple(sorted(os.sched_getaffinity(card.pid)))
        if host_off_card and allowed - set(acker):
            os.sched_setaffinity(0, allowed - set(acker))
        out["host_cpus"] = sorted(os.sched_getaffinity(0))
        out["acker_cpus"] = list(acker)
        out["worker_cpus"] = sorted(os.sched_getaffinity(card.ready["worker_pid"]))
        try:
            yield card, r
        finally:
            r.close()
            os.sched_setaffinity(0, allowed)
    finally:
        card.stop()


def idle(pids: dict[str, int], seconds: float) -> dict[str, Any]:
    c0 = cpu_of(pids)
    t0 = time.monotonic()
    time.sleep(seconds)  # ok-sleep: measuring an idle card over a fixed time
    el = time.monotonic() - t0
    d = diff(c0, cpu_of(pids))
    return {"seconds": round(el, 1), "acker_pct": 100 * d["acker"] / el, "worker_pct": 100 * d["worker"] / el,
            "card_pct": 100 * (d["acker"] + d["worker"]) / el}


def _hget(st: dict, key: str) -> int:
    """A handoff counter from the card's stats (0 where a tree has none)."""
    return int(((st.get("endpoint") or {}).get("handoff") or {}).get(key) or 0)


def qd1(r: RingSplitter, writes: list[AugmentedWrite]) -> dict[str, Any]:
    """Submit -> ack of each write alone, as `split` does it, with the
    submit (copy, checksum, descriptor, tail, doorbell) timed apart from the
    wait for the completion, and the doorbells the host rang."""
    waits, subs = [], []
    refused = 0
    s0 = r.statistics()
    for w in writes:
        t = monotonic_ns()
        ok = r.submit(w)
        t1 = monotonic_ns()
        ok = ok and r.wait_ack(w.io_id, t1 + 1_000_000_000)
        t2 = monotonic_ns()
        waits.append((t2 - t) / 1000)
        subs.append((t1 - t) / 1000)
        refused += not ok
        r.post_outcome(w.io_id, Status.COMMITTED)
    s1 = r.statistics()
    return {"n": len(writes), "refused": refused, "p50_us": pct(waits, 50), "p99_us": pct(waits, 99),
            "p999_us": pct(waits, 99.9), "max_us": max(waits), "submit_p50_us": pct(subs, 50),
            "submit_p99_us": pct(subs, 99), "doorbells": s1.doorbells - s0.doorbells}


def card_cpu(st0: dict, st1: dict, d: dict[str, float], writes: int) -> dict[str, float]:
    """The card's CPU per write, split into work and idle. Idle is what a
    DPU core spends anyway while it waits for writes: the acker's empty
    polls and its doorbell sleeps (CPU in the syscalls and the wake-up, the
    cost of not spinning on a shared core), and the worker's rounds that
    found nothing and closed no batch. Everything else is work."""
    # A card without the acker/worker handoff (nvme-pi: one process) has no acker counters: 0.
    h0, h1 = ((s.get("endpoint") or {}).get("handoff") or {} for s in (st0, st1))
    g = lambda k: h1.get(k, 0) - h0.get(k, 0)  # noqa: E731
    us = lambda x: 1e6 * x / max(1, writes)  # noqa: E731
    w_empty = (st1.get("poller") or {}).get("empty_poll_s", 0) - (st0.get("poller") or {}).get("empty_poll_s", 0)
    out = {"acker": us(d["acker"]), "acker_busy": us(g("acker_busy_s")), "acker_empty_poll": us(g("acker_empty_poll_s")),
           "acker_sleep": us(g("acker_sleep_cpu_s")), "worker": us(d["worker"]), "worker_empty_poll": us(w_empty)}
    out["card_idle"] = out["acker_empty_poll"] + out["acker_sleep"] + out["worker_empty_poll"]
    out["card_work"] = out["acker"] + out["worker"] - out["card_idle"]
    return out


def card_released(data: Path) -> int:
    """Writes the card released after their batches' durable acks."""
    return int(card_stats(data).get("released") or 0)


STREAM_AHEAD = 8192  # writes in flight at most (a quarter of what fills half of the 256 MiB ring)
STREAM_CHECK = 2048  # writes between looks at the card's releases (one control-socket request)


def stream(r: RingSplitter, data: Path, pids: dict[str, int], make, n: int) -> dict[str, Any]:
    """``n`` writes in bursts of 32 through the ring to the card, which
    ships them to the sink; until the card has released them all. The
    splitter stays at most ``STREAM_AHEAD`` writes ahead of the card's
    releases: driven faster than its worker ships, the card fills half its
    ring and diverts writes to its overflow log (by design), and the
    figure would be that path's, not the steady one's."""
    st0 = card_stats(data)
    rel0 = card_released(data)
    c0 = cpu_of(pids)
    t0 = time.monotonic()
    sent = 0
    burst = 32
    while sent < n:
        if sent % STREAM_CHECK == 0 and sent - (card_released(data) - rel0) > STREAM_AHEAD:
            wait_for(lambda: sent - (card_released(data) - rel0) <= STREAM_AHEAD // 2, 60, "the card catching up",
                     interval=0.002)
        batch = []
        for _ in range(burst):
            w = make()
            while not r.submit(w):  # ring full: the card is behind; wait for room
                r.reap()
            batch.append(w)
        for w in batch:
            r.wait_ack(w.io_id, monotonic_ns() + 1_000_000_000)
            r.post_outcome(w.io_id, Status.COMMITTED)
        sent += burst
    t_acked = time.monotonic() - t0
    wait_for(lambda: card_released(data) - rel0 >= sent, 300, "the card shipping the stream", interval=0.01)
    el = time.monotonic() - t0
    d = diff(c0, cpu_of(pids))
    st1 = card_stats(data)
    cpu = card_cpu(st0, st1, d, sent)
    if "sink" in d:  # the receiving end's floor: TLS, frame decode and an ack per batch, nothing kept
        cpu["sink"] = 1e6 * d["sink"] / sent
    work_s = cpu["card_work"] * sent / 1e6
    busy = cpu["acker_busy"] * sent / 1e6
    ovf = lambda st: sum(((st.get("overflow") or {}).get(k) or 0) for k in ("diverted", "spilled"))  # noqa: E731
    ov = ovf(st1) - ovf(st0)  # writes that went through the overflow log (diverted on arrival, or spilled later)
    return {
        "writes": sent, "acked_per_s": sent / t_acked, "shipped_per_s": sent / el, "overflow_spilled": ov,
        "cpu_us_per_write": cpu,
        # one core's worth of each component: writes per CPU-second (the acker without its empty polls)
        "per_core_per_s": {"acker": sent / busy if busy else None, "worker": sent / d["worker"] if d["worker"] else None,
                           "card": sent / work_s if work_s > 0 else None},
    }


INGEST_CG = "ki"
INGEST_BATCH = 64  # records a batch: the card's 256 KiB batch_bytes of 4 KiB writes
INGEST_WINDOW = 4  # batches in flight, as the card's ship window keeps several


async def ingest(data: Path, address: str, pid: int, small: list[bytes], n: int) -> dict[str, Any]:
    """``n`` 4 KiB records to the appliance's CG ``INGEST_CG`` from a
    synthetic card over real TLS, in batches of ``INGEST_BATCH`` with
    ``INGEST_WINDOW`` in flight; the appliance's CPU per record until the
    last durable ack."""
    cgs = {c.name: c.id for c in CGCatalog(data).list()}
    vdisk = CatalogReader(Layout(data).datastore).get("vi").id
    t = await NetSplitter.open_async(data=data, appliance=address, compress=True, dead_after_s=60)
    try:
        window = asyncio.Semaphore(INGEST_WINDOW)
        seq = 0
        c0 = cpu_seconds(pid)
        t0 = time.monotonic()
        tasks = []

        async def settle(futs: list) -> int:
            try:
                return sum([bool(await f) if isinstance(f, asyncio.Future) else bool(f) for f in futs])
            finally:
                window.release()

        while seq < n:
            await window.acquire()
            ws = []
            for _ in range(INGEST_BATCH):
                seq += 1
                p = small[seq % len(small)]
                ws.append(AugmentedWrite(1 << 40 | seq, cgs[INGEST_CG], seq, vdisk, Op.WRITE, WFlag.NONE,
                                         (seq % 4096) * BS, BS, time.time_ns(), seq.to_bytes(8, "little") + p[8:]))
            if not all(map(t.submit, ws)):
                raise RuntimeError(f"the appliance refused the synthetic card: {t.dead_reason()}")
            deadline = monotonic_ns() + 60_000_000_000
            tasks.append(asyncio.ensure_future(settle([t.ack_future(x.io_id, deadline) for x in ws])))
        durable = sum(await asyncio.gather(*tasks))
        el = time.monotonic() - t0
        cpu = cpu_seconds(pid) - c0
    finally:
        t.close()
    if durable != seq:
        raise RuntimeError(f"only {durable} of {seq} synthetic records were acked durable")
    return {"records": seq, "durable_per_s": seq / el, "cpu_us_per_record": 1e6 * cpu / seq,
            "per_core_per_s": seq / cpu if cpu else None}


# -- part 2: end to end ----------------------------------------------------------------


def host_split(data: Path, vdisks: list[str]) -> dict[str, dict]:
    st = (request(Layout(data).host_sock, {"cmd": "stats"}) or {}).get("stats") or {}
    return {v: ((st.get("vdisks") or {}).get(v) or {}).get("split") or {} for v in vdisks}


def host_spin_us(data: Path) -> int:
    """µs the host has spun for card acks that were not there at once (its
    ``status``: the ``stats`` reply has no ``card`` part, so this read 0
    before stop 28)."""
    st = (request(Layout(data).host_sock, {"cmd": "status"}) or {}).get("status") or {}
    return int((st.get("card") or {}).get("spin_us") or 0)


def cg_state(data: Path, cg: str) -> dict:
    st = json.loads(run_cli(data, "status", "--json").stdout)
    return next((c for c in st["cgs"] if c["name"] == cg), {})


def paced_args(doc: str) -> argparse.ArgumentParser:
    """The options every paced run takes (bench/card_paced.py, bench/appliance_paced.py)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--rate", type=int, default=4000)
    ap.add_argument("--tag", default="")
    ap.add_argument("--sections", type=json.loads, default=None)
    return ap


@contextlib.contextmanager
def paced_up(sections: dict | None) -> Iterator[tuple[Path, UpProcess, Path]]:
    """A fresh data directory (CG "paced" with 1G vdisks p1 and p2, the
    configuration ``sections`` applied) and `nicsplit up` on it, the CG
    protected: yields (data, up, work folder); all is removed at exit."""
    with tempfile.TemporaryDirectory() as t:
        work = Path(t)
        data = init_data(work / "data", validate=False, sections=sections)
        run_cli(data, "cg", "create", "paced")
        for v in ("p1", "p2"):
            run_cli(data, "vdisk", "create", v, "--size", "1G", "--cg", "paced")
        with UpProcess(data) as up:
            wait_for(lambda: cg_state(data, "paced").get("state") == "protected", 60, "protected")
            yield data, up, work


def e2e_phase(data: Path, up: UpProcess, cg: str, vdisks: list[str], *, seconds: float, rate: int,
              work: Path) -> dict[str, Any]:
    card = card_stats(data)
    pids = {"host": up.pid_of("host"), "acker": up.pid_of("card"), "worker": card["worker_pid"],
            "appliance": up.pid_of("appliance")}
    s0, spin0 = host_split(data, vdisks), host_spin_us(data)
    c0, q0 = cpu_of(pids), {k: runq_wait_s(p) for k, p in pids.items()}
    k0 = kernel_threads_cpu()
    fio_q: dict[int, float] = {}  # fio's run-queue wait, sampled while it runs (gone from /proc after)
    fios = []
    for i, v in enumerate(vdisks):
        out = work / f"fio-{cg}-{v}.json"
        cmd = fio_cmd(up.uri(v), rw="randwrite", bs="4k", size="1G", iodepth=16, out=out, runtime=seconds)
        if rate:
            cmd.append(f"--rate_iops={rate // len(vdisks)}")
        cmd.append(f"--randseed={1234 + i}")
        fios.append((subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True), out))
    samples = []
    t0 = time.monotonic()
    prev_n, prev_t = 0, t0
    while any(p.poll() is None for p, _ in fios):
        time.sleep(0.5)  # ok-sleep: sampling cadence of a timed run
        for p, _ in fios:
            if p.poll() is None:
                fio_q[p.pid] = runq_wait_s(p.pid, children=True) or fio_q.get(p.pid, 0.0)
        t = time.monotonic()
        sp = host_split(data, vdisks)
        n = sum(s.get("split", 0) + s.get("marked", 0) for s in sp.values())
        c = cg_state(data, cg)
        samples.append({"t": round(t - t0, 2), "iops": (n - prev_n) / (t - prev_t), "rpo_s": c.get("rpo_seconds"),
                        "states": sorted({v["state"] for v in c.get("vdisks", [])})})
        prev_n, prev_t = n, t
    for p, _ in fios:
        p.wait()
    el = time.monotonic() - t0
    d = diff(c0, cpu_of(pids))
    kthreads = kernel_threads_cpu_s(k0, kernel_threads_cpu())
    q = {k: runq_wait_s(p) - q0[k] for k, p in pids.items()}
    q["fio"] = sum(fio_q.values())
    s1, spin1 = host_split(data, vdisks), host_spin_us(data)
    card1 = card_stats(data)
    writes = sum(s1[v].get("split", 0) + s1[v].get("marked", 0) - s0[v].get("split", 0) - s0[v].get("marked", 0)
                 for v in vdisks)
    marked = sum(s1[v].get("marked", 0) - s0[v].get("marked", 0) for v in vdisks)
    cpu = {"host": 1e6 * d["host"] / max(1, writes), **card_cpu(card, card1, d, writes),
           "appliance": 1e6 * d["appliance"] / max(1, writes), "host_spin": (spin1 - spin0) / max(1, writes)}
    # The host's own work: its CPU without the spin for acks not there at
    # once (what the card's latency costs it), as the card's idle is apart.
    cpu["host_work"] = cpu["host"] - cpu["host_spin"]
    # Kernel threads (harness.kernel_threads_cpu_s): mostly the writeback of
    # the host's datastore, which the host is not charged for while the
    # appliance's fsyncs charge it its own; reported apart, not in the ratio.
    cpu["kernel_threads"] = 1e6 * kthreads / max(1, writes)
    rpos = [s["rpo_s"] for s in samples if s["rpo_s"] is not None]
    states = sorted({x for s in samples for x in s["states"]})
    return {
        "cg": cg, "seconds": round(el, 1), "rate_iops": rate, "writes": writes, "marked": marked,
        "iops": writes / el, "states_seen": states, "left_protected": states != ["protected"],
        "rpo_p99_s": pct(rpos, 99), "rpo_max_s": max(rpos) if rpos else None,
        "split_p50_us": med([s1[v].get("split_p50_us") for v in vdisks]),
        "split_p99_us": max(s1[v].get("split_p99_us", 0) for v in vdisks),
        "split_p999_us": max(s1[v].get("split_p999_us", 0) for v in vdisks),
        "cpu_us_per_write": cpu,
        # runnable but waiting for a CPU, µs a write: how much each process was held up by the
        # others on this shared machine (on the real layout the card and appliance have cores
        # of their own); the acker's alone, without its worker
        "runq_wait_us_per_write": {k: 1e6 * v / max(1, writes) for k, v in q.items()},
        "card_plus_appliance_over_host": (cpu["card_work"] + cpu["appliance"]) / cpu["host"]
        if cpu["host"] else None,
        # the same against the host's work alone (its ack spin not counted)
        "card_plus_appliance_over_host_work": (cpu["card_work"] + cpu["appliance"]) / cpu["host_work"]
        if cpu["host_work"] > 0 else None,
        # the same with the card's idle time counted as work (every CPU cycle the card used)
        "all_card_plus_appliance_over_host": (cpu["acker"] + cpu["worker"] + cpu["appliance"]) / cpu["host"]
        if cpu["host"] else None,
        "fio_errors": [p.stderr.read()[-500:] for p, _ in fios if p.returncode],
        "samples": samples,
    }


def big_writes(data: Path, up: UpProcess, vdisk: str, work: Path, n: int) -> dict[str, Any]:
    out = work / "fio-1m.json"
    cmd = fio_cmd(up.uri(vdisk), rw="write", bs="1m", size=f"{n}M", iodepth=1, out=out, runtime=None)
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    sp = host_split(data, [vdisk])[vdisk]
    return {"writes": sp.get("split", 0) + sp.get("marked", 0), "marked": sp.get("marked", 0),
            "split_p50_us": sp.get("split_p50_us"), "split_p99_us": sp.get("split_p99_us")}


def small_qd1(data: Path, up: UpProcess, vdisk: str, work: Path, n: int) -> dict[str, Any]:
    """``n`` 4 KiB random writes at QD1 from fio through the host: the
    issue's QD1 measure, the host's own ``split`` histogram (publish + the
    wait for the ack after the datastore write), with idle CPUs polling
    (bench/harness.py `idle_poll_hold`: in the halting regime a QD1 gap
    halts the vCPUs and every path pays the exit). fio runs off the card
    acker's CPUs, as a VM runs on its host's cores and never on the card's
    (on the acker's core a QD1 client waits out each of the real-time
    acker's spins, so every write pays its doorbell wake-up)."""
    out = work / "fio-qd1.json"
    cmd = fio_cmd(up.uri(vdisk), rw="randwrite", bs="4k", size="1G", iodepth=1, out=out, runtime=None)
    cmd.append(f"--number_ios={n}")
    cpus = os.sched_getaffinity(0) - os.sched_getaffinity(up.pid_of("card")) or None
    with idle_poll_hold("auto") as hold:
        polled = hold.held
        job = run_fio(cmd, out, 600, cpus=cpus)
    sp = host_split(data, [vdisk])[vdisk]
    clat = job["write"]["clat_ns"]["percentile"]
    return {"writes": sp.get("split", 0) + sp.get("marked", 0) + sp.get("late", 0), "marked": sp.get("marked", 0),
            "late": sp.get("late", 0), "split_p50_us": sp.get("split_p50_us"), "split_p99_us": sp.get("split_p99_us"),
            "fio_p50_us": clat["50.000000"] / 1000, "fio_p99_us": clat["99.000000"] / 1000, "idle_poll": polled,
            "fio_cpus": sorted(cpus) if cpus else "any"}


def e2e_qd1_rounds(rounds: int, n: int, acker_core: str = "shared") -> int:
    """`small_qd1` alone, ``rounds`` times, each in a fresh `nicsplit up`
    (``acker_core``: the ``[card]`` setting, "dedicated" being the DPU's
    layout); prints each round and the medians (one JSON line)."""
    res = []
    for i in range(rounds):
        with tempfile.TemporaryDirectory(prefix="nicsplit-keepup-") as tmp:
            data = e2e_data(Path(tmp), {"card": {"acker_core": acker_core}} if acker_core != "shared" else None)
            with UpProcess(data) as up:
                wait_for(lambda: cg_state(data, "paced").get("state") == "protected", 60, "the CGs protected")
                res.append(small_qd1(data, up, "q", Path(tmp), n))
        print(json.dumps({"round": i + 1, **res[-1]}), flush=True)
    med = {k: statistics.median(r[k] for r in res) for k in ("split_p50_us", "split_p99_us", "fio_p50_us", "fio_p99_us")}
    print(json.dumps({"median": med, "marked": sum(r["marked"] for r in res), "late": sum(r["late"] for r in res),
                      "loadavg": loadavg()}))
    return 0


def e2e_data(work: Path, sections: dict[str, dict] | None = None) -> Path:
    """The end-to-end runs' data directory: the documented default
    configuration, as `make run` writes it (init_data turns the host's chain
    validation on for tests unless told not to), and a CG per phase."""
    data = init_data(work / "data", validate=False, sections=sections)
    for cg, vds in (("paced", ["p1", "p2"]), ("unpaced", ["u1", "u2"]), ("big", ["m"]), ("small", ["q"])):
        run_cli(data, "cg", "create", cg)
        for v in vds:
            run_cli(data, "vdisk", "create", v, "--size", "1G", "--cg", cg)
    return data


def e2e(work: Path, *, seconds: float, rate: int) -> dict[str, Any]:
    data = e2e_data(work)
    out: dict[str, Any] = {}
    with UpProcess(data) as up:
        wait_for(lambda: cg_state(data, "paced").get("state") == "protected", 60, "the CGs protected")
        out["qd1_4k"] = small_qd1(data, up, "q", work, 20_000)
        out["qd1_1m"] = big_writes(data, up, "m", work, 200)
        # 1 MiB writes at QD1 come faster than the appliance journals them:
        # the card's overflow log may hold some. The paced phase starts from
        # a card holding nothing, or its first writes queue behind them.
        wait_for(lambda: cg_state(data, "big").get("state") == "protected"
                 and not (card_stats(data)["overflow"] or {}).get("lagging"), 300, "the 1 MiB writes shipped")
        out["paced"] = e2e_phase(data, up, "paced", ["p1", "p2"], seconds=seconds, rate=rate, work=work)
        out["paced"]["latest_pit_equals_production"] = pit_check(data, up, "paced", ["p1", "p2"], work)
        out["unpaced"] = e2e_phase(data, up, "unpaced", ["u1", "u2"], seconds=seconds, rate=0, work=work)
    return out


def pit_check(data: Path, up: UpProcess, cg: str, vdisks: list[str], work: Path) -> bool | str:
    """Issue 9's "the latest PIT equals production" after a phase: each of
    ``vdisks`` restored at the latest PIT once the journal holds every seq
    the host handed out, compared with production by ``qemu-img compare``.
    True, or what differed (the bench reports it, it does not stop)."""
    try:
        for v in vdisks:
            latest_pit_equals_production(data, cg, v, up.uri(v), work)
            (work / f"{v}-latest.raw").unlink(missing_ok=True)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, TimeoutError, RuntimeError) as e:
        return f"{type(e).__name__}: {str(getattr(e, 'stdout', '') or e)[-300:]}"
    return True


# -- report ---------------------------------------------------------------------------


def summarise(rounds: list[dict]) -> dict[str, Any]:
    def col(path: str) -> list[Any]:
        vals = []
        for r in rounds:
            x: Any = r
            for k in path.split("."):
                x = (x or {}).get(k)
            vals.append(x)
        return vals

    keys = ["qd1.submit_p50_us", "qd1.submit_p99_us", "qd1.doorbells", "qd1.acker_sleeps", "idle.card_pct", "idle.acker_pct", "idle.worker_pct", "qd1.p50_us", "qd1.p99_us", "qd1.p999_us",
            "qd1_1m.p50_us", "qd1_1m.p99_us", "stream.acked_per_s", "stream.shipped_per_s", "stream.overflow_spilled",
            "stream.cpu_us_per_write.acker_busy", "stream.cpu_us_per_write.acker_empty_poll",
            "stream.cpu_us_per_write.acker_sleep", "stream.cpu_us_per_write.worker_empty_poll",
            "stream.cpu_us_per_write.card_work",
            "stream.cpu_us_per_write.worker",
            "stream.per_core_per_s.acker", "stream.per_core_per_s.worker", "stream.per_core_per_s.card",
            "ingest.per_core_per_s", "ingest.cpu_us_per_record", "ingest.durable_per_s"]
    return {k: {"median": med(col(k)), "spread": spread(col(k))} for k in keys}


def f(x: Any, spec: str = ".1f") -> str:
    return "–" if x is None else format(x, spec)


def verdict(x: Any, ok: bool) -> str:
    return "–" if x is None else ("met" if ok else "**not met**")


def markdown(doc: dict) -> str:
    c, e = doc["components"], doc["e2e"]
    m = lambda k: c[k]["median"]  # noqa: E731
    s = lambda k, spec=".1f": "" if c[k]["spread"] is None else f" ({f(c[k]['spread'][0], spec)}–{f(c[k]['spread'][1], spec)})"  # noqa: E731
    p, u, big, small = e["paced"], e["unpaced"], e["qd1_1m"], e.get("qd1_4k") or {}
    rows = [
        ("card ack, synthetic splitter QD1, p50 µs", f(m("qd1.p50_us")) + s("qd1.p50_us"), "≤ 5 (splitter added)", ""),
        ("card ack QD1, p99 µs", f(m("qd1.p99_us")) + s("qd1.p99_us"), "≤ 50", ""),
        ("card ack 1 MiB QD1, p50 µs", f(m("qd1_1m.p50_us")) + s("qd1_1m.p50_us"), "≤ 150", ""),
        ("idle card, % of a core", f(m("idle.card_pct"), ".2f") + s("idle.card_pct", ".2f"), "≤ 1",
         verdict(m("idle.card_pct"), (m("idle.card_pct") or 99) <= 1)),
        ("card writes/s on one core (acker + worker, idle time apart)", f(m("stream.per_core_per_s.card"), ",.0f")
         + s("stream.per_core_per_s.card", ",.0f"), "≥ 100,000",
         verdict(m("stream.per_core_per_s.card"), (m("stream.per_core_per_s.card") or 0) >= 100_000)),
        ("  acker alone, writes/s per core", f(m("stream.per_core_per_s.acker"), ",.0f"), "", ""),
        ("  worker alone, writes/s per core", f(m("stream.per_core_per_s.worker"), ",.0f"), "", ""),
        ("  card stream: writes diverted to the overflow log", f(m("stream.overflow_spilled"), ",.0f"), "0", ""),
        ("appliance ingest records/s on one core (synthetic card over TLS)", f(m("ingest.per_core_per_s"), ",.0f")
         + s("ingest.per_core_per_s", ",.0f"), "≥ 100,000",
         verdict(m("ingest.per_core_per_s"), (m("ingest.per_core_per_s") or 0) >= 100_000)),
        ("stream: acked writes/s (the synthetic splitter's pace)", f(m("stream.acked_per_s"), ",.0f"), "", ""),
        ("ingest: durable records/s (the synthetic card's pace)", f(m("ingest.durable_per_s"), ",.0f"), "", ""),
        ("e2e 4 KiB QD1 split p50 µs (the host's histogram, fio through NBD)", f(small.get("split_p50_us")), "≤ 5",
         verdict(small.get("split_p50_us"), (small.get("split_p50_us") or 1e9) <= 5)),
        ("e2e 4 KiB QD1 split p99 µs", f(small.get("split_p99_us")), "≤ 50",
         verdict(small.get("split_p99_us"), (small.get("split_p99_us") or 1e9) <= 50)),
        ("e2e 4 KiB QD1: fio p50 / p99 µs, writes marked", f"{f(small.get('fio_p50_us'))} / {f(small.get('fio_p99_us'))}, "
         f"{small.get('marked')} of {small.get('writes')} ({small.get('late')} late)", "report", ""),
        ("e2e 1 MiB QD1 split p50 µs", f(big["split_p50_us"]), "≤ 150",
         verdict(big["split_p50_us"], (big["split_p50_us"] or 1e9) <= 150)),
        (f"e2e paced {p['rate_iops']} IOPS QD16: split p99 µs", f(p["split_p99_us"]), "≤ 100",
         verdict(p["split_p99_us"], (p["split_p99_us"] or 1e9) <= 100)),
        ("e2e paced: split p99.9 µs", f(p["split_p999_us"]), "≤ 1000",
         verdict(p["split_p999_us"], (p["split_p999_us"] or 1e9) <= 1000)),
        ("e2e paced: states seen", ", ".join(p["states_seen"]), "protected only",
         verdict(True, not p["left_protected"])),
        ("e2e paced: RPO p99 s", f(p["rpo_p99_s"], ".2f"), "≤ 1", verdict(p["rpo_p99_s"], (p["rpo_p99_s"] or 99) <= 1)),
        ("e2e paced: the latest PIT equals production (p1, p2)", str(p.get("latest_pit_equals_production", "–")),
         "True", verdict(p.get("latest_pit_equals_production"), p.get("latest_pit_equals_production") is True)),
        ("e2e paced: (card work + appliance) / host CPU per write", f(p["card_plus_appliance_over_host"], ".2f"), "≤ 1.0",
         verdict(p["card_plus_appliance_over_host"], (p["card_plus_appliance_over_host"] or 99) <= 1.0)),
        ("e2e paced: the same with the card's idle time counted", f(p["all_card_plus_appliance_over_host"], ".2f"),
         "report", ""),
        ("e2e paced: the same against the host's work (its ack spin apart: "
         f"{f(p['cpu_us_per_write'].get('host_spin'), '.1f')} µs a write)",
         f(p.get("card_plus_appliance_over_host_work"), ".2f"), "report", ""),
        ("e2e unpaced: IOPS (states seen)", f"{f(u['iops'], ',.0f')} ({', '.join(u['states_seen'])})", "report", ""),
        ("e2e unpaced: marked writes / all", f"{u['marked']} / {u['writes']}", "report", ""),
        ("e2e unpaced: RPO p99 / max s", f"{f(u['rpo_p99_s'], '.2f')} / {f(u['rpo_max_s'], '.2f')}", "report", ""),
    ]
    lines = ["# Keeping up (bench/keepup.py)", "", f"{doc['when']}, {doc['machine']}, load average at start "
             f"{doc['loadavg']:.2f}; components: median of {doc['rounds']} rounds (spread min–max).", "",
             "| measure | value | target | verdict |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {t} | {v} |" for a, b, t, v in rows]
    lines += ["", "CPU µs per write, end to end: host / card work (acker busy + rest, worker without its idle) / "
              "card idle (acker empty-poll + acker doorbell sleeps + worker empty-poll) / appliance:", ""]
    for name, ph in (("paced", p), ("unpaced", u)):
        cc = ph["cpu_us_per_write"]
        lines.append(f"- {name}: {f(cc['host'])} / {f(cc['card_work'])} ({f(cc['acker_busy'])} + "
                     f"{f(cc['acker'] - cc['acker_busy'] - cc['acker_empty_poll'] - cc['acker_sleep'])}, "
                     f"{f(cc['worker'] - cc['worker_empty_poll'])}) / {f(cc['card_idle'])} "
                     f"({f(cc['acker_empty_poll'])} + {f(cc['acker_sleep'])} + {f(cc['worker_empty_poll'])}) / "
                     f"{f(cc['appliance'])} ({ph['writes']:,} writes in {ph['seconds']} s); kernel threads "
                     f"(writeback, charged to no process) {f(cc.get('kernel_threads'))}")
    lines += ["", "Runnable but waiting for a CPU, µs per write (schedstat; a tree without it: –): host / acker "
              "(its own threads) / worker / appliance / fio:", ""]
    for name, ph in (("paced", p), ("unpaced", u)):
        rq = ph.get("runq_wait_us_per_write") or {}
        lines.append(f"- {name}: " + " / ".join(f(rq.get(k)) for k in ("host", "acker", "worker", "appliance", "fio")))
    cs = lambda k: c[f"stream.cpu_us_per_write.{k}"]["median"]  # noqa: E731
    lines += ["", "CPU µs per write, components: card stream to the sink: card work / acker busy / acker empty-poll / "
              f"acker sleeps / worker empty-poll / worker: {f(cs('card_work'))} / {f(cs('acker_busy'))} / "
              f"{f(cs('acker_empty_poll'))} / {f(cs('acker_sleep'))} / {f(cs('worker_empty_poll'))} / "
              f"{f(cs('worker'))}; appliance ingest per record: {f(c['ingest.cpu_us_per_record']['median'])}"]
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(2, 2, figsize=(12, 7), sharex="col")
    for col, name in enumerate(("paced", "unpaced")):
        ph = doc["e2e"][name]
        t = [s["t"] for s in ph["samples"]]
        axes[0][col].plot(t, [s["iops"] for s in ph["samples"]])
        axes[0][col].set_title(f"{name}: IOPS (split + marked)")
        rpo = [s["rpo_s"] if s["rpo_s"] is not None else float("nan") for s in ph["samples"]]
        axes[1][col].plot(t, rpo, label="RPO s")
        bad = [s["t"] for s in ph["samples"] if s["states"] != ["protected"]]
        if bad:
            axes[1][col].scatter(bad, [0] * len(bad), color="red", marker="|", label="not protected (lagging or worse)")
        axes[1][col].set_title(f"{name}: RPO (s) and state")
        axes[1][col].set_xlabel("seconds")
        axes[1][col].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round, short phases")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=60, help="each end-to-end phase (default 60)")
    ap.add_argument("--rate-iops", type=int, default=10_000, help="paced phase, in total over two vdisks")
    ap.add_argument("--idle-seconds", type=float, default=20)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    ap.add_argument("--components-only", action="store_true", help="part 1 alone (no end-to-end runs)")
    ap.add_argument("--host-off-card", action="store_true", default=True,
                    help="keep this process (the synthetic host) off the acker's CPUs, as on a DPU and as "
                         "`nicsplit up` does ([host] cpus = \"auto\"); the default")
    ap.add_argument("--host-anywhere", dest="host_off_card", action="store_false",
                    help="leave the synthetic host on every CPU (the scheduler may put it on the acker's)")
    ap.add_argument("--qd1-only", action="store_true",
                    help="the components' 4 KiB QD1 phase alone (no idle, 1 MiB, stream nor end-to-end runs)")
    ap.add_argument("--e2e-qd1-only", action="store_true",
                    help="the end-to-end 4 KiB QD1 phase alone (fio through `nicsplit up`), --rounds times")
    ap.add_argument("--acker-core", choices=("shared", "dedicated"), default="shared",
                    help="with --e2e-qd1-only: [card] acker_core (dedicated: the DPU's layout)")
    a = ap.parse_args(argv)
    if a.e2e_qd1_only:
        return e2e_qd1_rounds(a.rounds, 4_000 if a.quick else 20_000, a.acker_core)
    if a.quick:
        a.rounds, a.seconds, a.idle_seconds = 1, 10, 5
    n_qd1, n_big, n_stream = (2000, 50, 20_000) if a.quick else (10_000, 200, 100_000)
    a.out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": f"{os.cpu_count()} CPUs",
                           "loadavg": loadavg(), "rounds": a.rounds}
    with tempfile.TemporaryDirectory(prefix="nicsplit-keepup-") as tmp:
        work = Path(tmp)
        rounds = []
        for i in range(a.rounds):
            print(f"components round {i + 1}/{a.rounds}", flush=True)
            rounds.append(component_round(work / f"c{i}", n_qd1=n_qd1, n_big=n_big, n_stream=n_stream,
                                          idle_s=a.idle_seconds, qd1_only=a.qd1_only,
                                          host_off_card=a.host_off_card))
        doc["component_rounds"] = rounds
        doc["components"] = summarise(rounds)
        if a.components_only or a.qd1_only:
            (a.out / "keepup.json").write_text(json.dumps(doc, indent=1))
            comp = doc["components"]
            print(json.dumps({k: v for k, v in comp.items() if k.startswith("qd1.") or not a.qd1_only}, indent=1))
            print(json.dumps({"cpus": [{k: r.get(k) for k in ("host_cpus", "acker_cpus", "worker_cpus")} for r in rounds],
                              "loadavg": loadavg()}))
            return 0
        print("end to end", flush=True)
        # The components' journals go first (deleted, their dirty pages need no
        # writeback) and the rest is written back: the kernel's flushers would
        # otherwise share the end-to-end phases' CPUs (the QD1 phase's split
        # p50 read 15.9 µs right after the components, 6.8 alone).
        for i in range(a.rounds):
            shutil.rmtree(work / f"c{i}", ignore_errors=True)
        os.sync()
        doc["e2e"] = e2e(work / "e2e", seconds=a.seconds, rate=a.rate_iops)
    (a.out / "keepup.json").write_text(json.dumps(doc, indent=1))
    md = markdown(doc)
    (a.out / "keepup.md").write_text(md)
    plot(doc, a.out / "keepup.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
