"""A demo card loop for the ring transport: ack, verify, release, repeat.

Used by the tests and by bench/ring_latency.py; the real card process (the
pipeline) drives `RingEndpoint` the same way.  It creates the endpoint under
``--run-dir``, prints ``{"event": "ready", "pid": N, "volume": PATH}`` on
stdout, then loops: poll (the endpoint acks each write and verifies its
checksum), release every payload at once, busy-poll while work arrives, and
sleep on the doorbell after ``--idle-us`` without work.  On SIGTERM/SIGINT it
prints ``{"event": "stats", ...}`` (endpoint statistics plus an XXH64 digest
over every accepted WRITE's io_id and payload, in order, and ``identity``,
one over every write-like record's io_id, vdisk, op, offset and length) and
exits 0. ``--transport nvme-pi`` serves the nvme-pi transport instead (any
name of `nicsplit.card.transports.base.TRANSPORTS` whose card half is a
`RingEndpoint`).

Example::

    python -m nicsplit.card.transports.ring_echo --run-dir /tmp/run --idle-us 500
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import time

import xxhash

from nicsplit.core.records import AugmentedWrite, Op
from nicsplit.card.transports.base import open_endpoint

HEARTBEAT_EVERY_NS = 1_000_000  # 1 ms: 100x finer than the host's 100 ms staleness bound
SLEEP_TIMEOUT_S = 0.01  # 10 ms doorbell sleeps: heartbeat stays 10x fresher than 100 ms


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ring_echo", description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", required=True, help="directory for card.sock")
    ap.add_argument("--shm-dir", default="/dev/shm", help="where the hidden volume file goes")
    ap.add_argument("--data-size", type=int, default=64 << 20, help="payload area bytes")
    ap.add_argument("--sq-entries", type=int, default=4096, help="SQ (and CQ) entries, power of two")
    ap.add_argument("--idle-us", type=float, default=500.0, help="idle spell before sleeping on the doorbell")
    ap.add_argument("--digest", action="store_true", help="hash every payload (slower; for tests)")
    ap.add_argument("--no-verify", action="store_true", help="do not verify payload checksums")
    ap.add_argument("--transport", default="ring", help="ring | nvme-pi")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s card %(levelname)s %(message)s")

    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    ep = open_endpoint(args.transport, args.run_dir, shm_dir=args.shm_dir, data_size=args.data_size,
                       sq_entries=args.sq_entries, verify_checksums=not args.no_verify)
    print(json.dumps({"event": "ready", "pid": os.getpid(), "volume": ep.volume_path}), flush=True)
    digest = xxhash.xxh64() if args.digest else None
    identity = xxhash.xxh64() if args.digest else None
    idle_ns = int(args.idle_us * 1000)
    mono = time.monotonic_ns
    poll, release, heartbeat = ep.poll, ep.release, ep.heartbeat
    WRITE = Op.WRITE
    last_work = last_beat = mono()
    try:
        while not stop:
            recs = poll()
            now = mono()
            if recs:
                last_work = now
                for r in recs:
                    if identity is not None and type(r) is AugmentedWrite:
                        identity.update(b"%d %d %d %d %d;" % (r.io_id, r.vdisk_id, r.op, r.voffset, r.length))
                    if type(r) is AugmentedWrite and r.op == WRITE:
                        if digest is not None:
                            digest.update(r.io_id.to_bytes(8, "little"))
                            digest.update(r.data)
                        r.data = None  # drop our view before the space is reused
                        release(r.io_id)
            elif now - last_work > idle_ns:
                woke = ep.wait_doorbell(SLEEP_TIMEOUT_S)  # heartbeats on the way in and out
                last_beat = now = mono()
                if woke:
                    last_work = now  # else: sleep again at once, no idle spell
            if now - last_beat > HEARTBEAT_EVERY_NS:
                heartbeat()
                last_beat = now
    finally:
        st = dataclasses.asdict(ep.statistics())
        ep.close()
        print(json.dumps({"event": "stats", **st, "digest": digest.hexdigest() if digest else None,
                          "identity": identity.hexdigest() if identity else None}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
