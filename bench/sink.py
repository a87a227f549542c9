#!/usr/bin/env python3
"""A sink for the card: what the keep-up suite ships the card's batches to
when it measures the card alone (issue 9: "the card from a synthetic
splitter through the real ring to a sink").

It speaks the appliance's side of the card protocol over the same TLS 1.3
with mutual certificates (the deployment's ``appliance`` identity, only a
``card`` certificate accepted): HelloAck with every CG resumed at 0, then a
durable Ack for every Batch at once, no journal, no unseal, no fingerprints
learnt (the card dedups nothing by reference). So the card's CPU per write
is its own, not paced by the appliance's ingest, and the ring's data area
is freed as fast as the card ships (the overflow log, which takes over
when the ring is half full of writes waiting for a slow appliance, stays
out of the measure).

    python bench/sink.py --data DATA [--listen 127.0.0.1:0]

Prints one ``{"event": "ready", "address": HOST:PORT}`` line, serves until
SIGTERM; ``{"event": "stats", ...}`` on stderr at exit (batches, records by
seq range, bytes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path

from nicsplit.core import pki
from nicsplit.core.layout import Layout
from nicsplit.wire import frames as F


class Sink:
    def __init__(self) -> None:
        self.batches = 0
        self.writes = 0
        self.bytes = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if pki.peer_name(writer.get_extra_info("ssl_object")) != "card":
            writer.close()
            return
        dec = F.FrameDecoder()
        try:
            while chunk := await reader.read(1 << 20):
                dec.receive_data(chunk)
                self.bytes += len(chunk)
                out = []
                while (fr := dec.next_event()) is not F.NEED_DATA:
                    if isinstance(fr, F.Hello):
                        out.append(F.encode(F.HelloAck("sink", F.PROTOCOL_VERSION, {cg: 0 for cg in fr.cgs})))
                    elif isinstance(fr, F.Batch):
                        self.batches += 1
                        self.writes += fr.last_seq - fr.first_seq + 1
                        out.append(F.encode(F.Ack(fr.batch_id, fr.cg, fr.last_seq, True)))
                    elif isinstance(fr, F.Heartbeat):
                        out.append(F.encode(F.Heartbeat(fr.time_ns)))
                if out:
                    writer.write(b"".join(out))
        except (ConnectionError, F.FrameError) as e:
            print(json.dumps({"event": "dropped", "why": str(e)}), file=sys.stderr, flush=True)
        finally:
            writer.close()


async def main_async(data: Path, listen: str) -> None:
    host, _, port = listen.rpartition(":")
    sink = Sink()
    ctx = pki.server_context(Layout(data).pki, "appliance")
    server = await asyncio.start_server(sink.serve, host or "127.0.0.1", int(port), ssl=ctx)
    addr = server.sockets[0].getsockname()
    print(json.dumps({"event": "ready", "address": f"{addr[0]}:{addr[1]}"}), flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    server.close()
    print(json.dumps({"event": "stats", "batches": sink.batches, "writes": sink.writes, "bytes": sink.bytes}),
          file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--listen", default="127.0.0.1:0")
    a = ap.parse_args(argv)
    import uvloop  # the event loop the appliance runs on

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main_async(a.data, a.listen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
