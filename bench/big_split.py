#!/usr/bin/env python3
"""Issue 9's 1 MiB QD1 figure alone, both ways `bench/keepup.py` measures it:

- *component*: a real appliance and card (``nicsplit card run``) driven by a
  synthetic splitter in this process through the real ring (`RingSplitter`):
  submit -> ack of 1 MiB writes at QD1 (keepup's ``qd1_1m``);
- *e2e*: ``nicsplit up`` with the default configuration, fio writing 1 MiB
  at QD1 through a real NBD connection; the host's ``split`` histogram
  (keepup's ``e2e.qd1_1m``).

- *inproc*: the same ring, acker (`RingAcker`) and pipeline-worker endpoint
  (`HandoffEndpoint`) in this one process, stepped by hand: the CPU time
  (``time.thread_time_ns``, so a loaded box does not inflate it) of the
  host's publish (copy + checksum), the acker's pump up to the ack, and the
  worker's poll, per 1 MiB write. This splits the component figure by side.

- *recv*: the host's side of a 1 MiB write from the socket to the ring, in
  this process: a thread sends the payloads over a TCP loopback connection
  and the bench receives each one the way the host's NBD session does, then
  publishes it, on the receiving thread's CPU time. A tree whose
  `RingSplitter` can ``reserve`` receives straight into the reservation in
  256 KiB ``recv_into`` chunks, checksumming each as it lands, and publishes
  the descriptor; an older tree receives 256 KiB ``recv`` chunks (asyncio's
  read size), copies them into an exact-size buffer (the codec's sink) and
  publishes that (copy into the ring + checksum). ``--size`` sets the write
  size of this phase (the crossover of the in-place path).

Each round runs all four; ``--rounds`` rounds, medians and spread. Meant for a
before/after against another tree: run it with ``PYTHONPATH=<tree>/src``,
alternating trees.

    .venv/bin/python bench/big_split.py [--rounds 3] [--writes 200] [--only component|e2e|inproc]

Nothing here asserts on speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import fio_cmd  # noqa: E402
from keepup import (  # noqa: E402
    Appliance, Card, cg_state, durable_seq, host_split, med, payloads, qd1, spread,
)
from nicsplit.card.handoff import Handoff  # noqa: E402
from nicsplit.card.transports.ring_acker import RingAcker  # noqa: E402
from nicsplit.card.transports.ring_handoff import HandoffEndpoint  # noqa: E402
from nicsplit.card.transports.ring_splitter import RingSplitter  # noqa: E402
from nicsplit.core.layout import Layout  # noqa: E402
from nicsplit.core.records import AugmentedWrite, Op, Status, WFlag  # noqa: E402
from nicsplit.testing.datadir import init_data  # noqa: E402
from nicsplit.testing.procs import UpProcess, run_cli, wait_for  # noqa: E402

MIB = 1 << 20


def component(work: Path, n: int) -> dict[str, Any]:
    data = init_data(work / "data", sections={"card": {"transport_options": {"data_size": "256M"}}})
    run_cli(data, "cg", "create", "k")
    run_cli(data, "vdisk", "create", "v", "--size", "64G", "--cg", "k")
    with Appliance(data) as app:
        card = Card(data, app.ready["address"]).start()
        try:
            r = RingSplitter.connect(str(Layout(data).card_sock))
            try:
                big = payloads(4, MIB)
                writes = [AugmentedWrite(s, 1, s, 1, Op.WRITE, WFlag.NONE, (s % 4096) * MIB, MIB, time.time_ns(),
                                         s.to_bytes(8, "little") + big[s % 4][8:]) for s in range(1, n + 1)]
                out = qd1(r, writes)
                wait_for(lambda: durable_seq(data, "k") >= n, 120, "the appliance holding the writes")
            finally:
                r.close()
        finally:
            card.stop()
    return out


def inproc(work: Path, n: int) -> dict[str, Any]:
    ho = Handoff.create(slots=4096)
    acker = RingAcker(str(work / "run"), handoff=ho, data_size=256 * MIB, sq_entries=4096, cq_entries=4096)
    worker_ho = Handoff(os.dup(ho.fd))
    worker = HandoffEndpoint(worker_ho, acker.volume_path, acker.fake_uid, acker.wake_fd,
                         on_refused=lambda *a: None)  # the card replaces it with its lost log
    sp = RingSplitter.connect(str(acker.socket_path))
    cpu = time.thread_time_ns
    host, ack, take = [], [], []
    try:
        big = payloads(4, MIB)
        for s in range(1, n + 1):
            w = AugmentedWrite(s, 1, s, 1, Op.WRITE, WFlag.NONE, (s % 64) * MIB, MIB, time.time_ns(),
                               memoryview(s.to_bytes(8, "little") + big[s % 4][8:]))
            t0 = cpu()
            assert sp.submit(w)
            t1 = cpu()
            acker.pump()
            t2 = cpu()
            assert sp.wait_ack(w.io_id, time.monotonic_ns() + 10**9)
            sp.post_outcome(w.io_id, Status.COMMITTED)
            acker.pump()
            t3 = cpu()
            got = worker.poll()
            t4 = cpu()
            for e in got:
                if getattr(e, "data", None) is not None:
                    e.data = None  # the view must go before the mapping closes
                    worker.release(e.io_id)
            host.append(t1 - t0)
            ack.append(t2 - t1)
            take.append(t4 - t3)
    finally:
        sp.close()
        worker.close()
        worker_ho.close()
        os.close(worker_ho.fd)
        acker.close()
        ho.close()
        os.close(ho.fd)
    us = lambda xs: statistics.median(xs) / 1000  # noqa: E731
    return {"n": n, "host_publish_cpu_us": us(host), "acker_ack_cpu_us": us(ack), "worker_take_cpu_us": us(take)}


def recv(work: Path, n: int, size: int = MIB) -> dict[str, Any]:
    ho = Handoff.create(slots=4096)
    acker = RingAcker(str(work / "run"), handoff=ho, data_size=256 * MIB, sq_entries=4096, cq_entries=4096)
    sp = RingSplitter.connect(str(acker.socket_path))
    in_place = hasattr(sp, "reserve")
    lst = socket.create_server(("127.0.0.1", 0))
    cli = socket.create_connection(lst.getsockname())
    srv, _ = lst.accept()
    big = payloads(4, max(size, 8))
    chunk = 256 * 1024

    def send() -> None:
        for s in range(1, n + 1):
            cli.sendall(s.to_bytes(8, "little") + big[s % 4][8:size])

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    cpu = time.thread_time_ns
    host, hashing = [], []
    res = w = None
    try:
        for s in range(1, n + 1):
            t0 = cpu()
            if in_place:
                res = sp.reserve(size)
                got = 0
                while got < size:
                    k = srv.recv_into(res.buf[got: got + chunk])
                    got += k
                    res.filled(got)
                data = res.data
            else:
                sink = bytearray(size)
                got = 0
                while got < size:
                    b = srv.recv(min(chunk, size - got))
                    sink[got: got + len(b)] = b
                    got += len(b)
                data = memoryview(sink)
            w = AugmentedWrite(s, 1, s, 1, Op.WRITE, WFlag.NONE, (s % 64) * MIB, size, time.time_ns(), data)
            assert sp.submit(w)
            host.append(cpu() - t0)
            acker.pump()
            assert sp.wait_ack(w.io_id, time.monotonic_ns() + 10**9)
            if in_place:
                hashing.append(res.hash_ns)
                res.release()
            sp.post_outcome(w.io_id, Status.COMMITTED)
            acker.pump()
    finally:
        res = data = w = None  # the views go before the mapping closes
        sender.join(10)
        for x in (cli, srv, lst):
            x.close()
        sp.close()
        acker.close()
        ho.close()
        os.close(ho.fd)
    out = {"n": n, "size": size, "in_place": in_place, "host_recv_publish_cpu_us": statistics.median(host) / 1000}
    if hashing:  # of which the checksum as the chunks landed (wall time: the bench thread does nothing else)
        out["checksum_us"] = statistics.median(hashing) / 1000
    return out


def e2e(work: Path, n: int) -> dict[str, Any]:
    """keepup's ``big_writes``, plus fio's own latency: the client's view,
    which does not depend on what the host's histogram counts."""
    data = init_data(work / "data")  # the documented default configuration, as `make run` writes it
    run_cli(data, "cg", "create", "big")
    run_cli(data, "vdisk", "create", "m", "--size", "1G", "--cg", "big")
    with UpProcess(data) as up:
        wait_for(lambda: cg_state(data, "big").get("state") == "protected", 60, "the CG protected")
        out = work / "fio-1m.json"
        cmd = fio_cmd(up.uri("m"), rw="write", bs="1m", size=f"{n}M", iodepth=1, out=out, runtime=None)
        subprocess.run(cmd, check=True, capture_output=True, timeout=600)
        text = out.read_text()
        lat = json.loads(text[text.index("{"):])["jobs"][0]["write"]["lat_ns"]["percentile"]
        sp = host_split(data, ["m"])["m"]
        return {"writes": sp.get("split", 0) + sp.get("marked", 0), "marked": sp.get("marked", 0),
                "late": sp.get("late", 0), "split_p50_us": sp.get("split_p50_us"),
                "split_p99_us": sp.get("split_p99_us"), "fio_p50_us": lat["50.000000"] / 1000}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--writes", type=int, default=200, help="1 MiB writes per phase (e2e: at most 1000)")
    ap.add_argument("--only", choices=("component", "e2e", "inproc", "recv"))
    ap.add_argument("--size", type=int, default=MIB, help="write size of the recv phase (bytes)")
    a = ap.parse_args(argv)
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="nicsplit-bigsplit-") as tmp:
        for i in range(a.rounds):
            r: dict[str, Any] = {}
            if a.only in (None, "inproc"):
                r["inproc"] = inproc(Path(tmp) / f"i{i}", a.writes)
            if a.only in (None, "recv"):
                r["recv"] = recv(Path(tmp) / f"r{i}", a.writes, a.size)
            if a.only in (None, "component"):
                r["component"] = component(Path(tmp) / f"c{i}", a.writes)
            if a.only in (None, "e2e"):
                r["e2e"] = e2e(Path(tmp) / f"e{i}", min(a.writes, 1000))
            print(json.dumps(r), flush=True)
            rounds.append(r)
    summary = {}
    for phase, key in (("inproc", "host_publish_cpu_us"), ("inproc", "acker_ack_cpu_us"),
                       ("inproc", "worker_take_cpu_us"), ("recv", "host_recv_publish_cpu_us"),
                       ("component", "p50_us"), ("e2e", "split_p50_us"),
                       ("e2e", "fio_p50_us")):
        xs = [r[phase][key] for r in rounds if phase in r]
        if xs:
            summary[f"{phase}.{key}"] = {"median": med(xs), "spread": spread(xs)}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
