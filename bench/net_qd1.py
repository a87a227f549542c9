#!/usr/bin/env python3
"""What the card saves (issue 12): QD1 write latency through the host with
the ``ring`` transport (the card acks, ships later) and the ``net``
transport (the classic splitter: the host waits for the appliance's durable
ack), with the link to the appliance emulated by `nicsplit.testing.linkemu`
at a one-way delay of 0 and ``--delay-ms`` (default 0.5 ms).

One data directory, one vdisk in one CG, ``nicsplit up --transport T``
started once per transport per round, rounds alternating ring / net; the
relay sits between whoever ships (the card, or the host) and the appliance
(``[card] appliance`` and ``[splitter] appliance`` both name it). Per
(transport, delay): ``--writes`` 4 KiB libnbd writes one at a time, client
side latency; medians over the rounds of each round's p50 and p99, with the
spread (min..max of the rounds). Nothing here asserts on speed.

    .venv/bin/python bench/net_qd1.py [--rounds 3] [--writes 300] [--delay-ms 0.5]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import percentile as pct  # noqa: E402
from nicsplit.testing.datadir import init_data  # noqa: E402
from nicsplit.testing.linkemu import LinkEmulator  # noqa: E402
from nicsplit.testing.procs import UpProcess, nbd_connect, run_cli, wait_for  # noqa: E402
from nicsplit.testing.recovered import cg_state  # noqa: E402

SIZE = 64 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def qd1(h, n: int, base: int) -> list[float]:
    out = []
    for i in range(n):
        t = time.perf_counter()
        h.pwrite(bytes([i & 0xFF]) * 4096, ((base + i) % (SIZE // 4096)) * 4096)
        out.append((time.perf_counter() - t) * 1e6)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--writes", type=int, default=300)
    ap.add_argument("--delay-ms", type=float, default=0.5)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="net-qd1-"))
    appliance = ("127.0.0.1", free_port())
    link = LinkEmulator(("127.0.0.1", 0), appliance, seed=1).start()
    relay = f"{link.address[0]}:{link.address[1]}"
    data = init_data(tmp / "data", filters=["stats", {"name": "split", "split_timeout_us": 1_000_000}],
                     sections={"card": {"appliance": relay, "transport_options": {"data_size": "256M"}},
                               "splitter": {"appliance": relay}})
    run_cli(data, "cg", "create", "cg1")
    run_cli(data, "vdisk", "create", "a", "--size", str(SIZE), "--cg", "cg1")
    res: dict[tuple[str, float], list[tuple[float, float]]] = {}
    base = 0
    try:
        for r in range(args.rounds):
            for transport in ("ring", "net"):
                with UpProcess(data, "--appliance-listen", f"{appliance[0]}:{appliance[1]}",
                               "--transport", transport) as up:
                    h = nbd_connect(up.uri("a"))
                    qd1(h, 20, base)  # attach (the first writes may find the link connecting)
                    wait_for(lambda: cg_state(data)["state"] == "protected", 120, "cg1 protected", interval=0.2)
                    for delay in (0.0, args.delay_ms):
                        link.set(delay_ms=delay)
                        lat = qd1(h, args.writes, base)
                        base += args.writes
                        res.setdefault((transport, delay), []).append((pct(lat, 50), pct(lat, 99)))
                        print(f"round {r} {transport:<4} delay {delay} ms: p50 {pct(lat, 50):.0f} us, "
                              f"p99 {pct(lat, 99):.0f} us", flush=True)
                    link.set(delay_ms=0.0)
                    state = cg_state(data)["state"]
                    h.shutdown()
                    if state != "protected":
                        print(f"  note: cg1 ended {state} (a write missed its deadline)", flush=True)
    finally:
        link.close()
    print("\n| transport | one-way delay | QD1 p50 (us) | p50 spread | QD1 p99 (us) | p99 spread |")
    print("|---|---|---|---|---|---|")
    out = {}
    for (transport, delay), rounds in sorted(res.items()):
        p50s, p99s = [p for p, _ in rounds], [p for _, p in rounds]
        out[f"{transport}@{delay}"] = {"p50_us": statistics.median(p50s), "p99_us": statistics.median(p99s),
                                       "rounds": rounds}
        print(f"| {transport} | {delay} ms | {statistics.median(p50s):.0f} | {min(p50s):.0f}..{max(p50s):.0f} | "
              f"{statistics.median(p99s):.0f} | {min(p99s):.0f}..{max(p99s):.0f} |")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
