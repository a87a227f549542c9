"""Test helpers for the appliance, importable by any test suite.

* `CrashFilesystem` — the D5 power-cut double of `durable.Filesystem`: an
  in-memory disk that knows which bytes were synced.  ``power_cut()`` returns
  the disk as it would be after the plug was pulled: unsynced appends dropped
  or torn (a random prefix kept, its last sector possibly garbage), files
  whose directory entry was never synced possibly gone.  ``fail_sync_at=N``
  makes the N-th sync fail with EIO.
* `ApplianceProcess` — ``python -m nicsplit.appliance run`` as a child
  process, ready when it prints its JSON ready line.
* `CardClient` — a blocking TLS client speaking frames (a stand-in card).
"""

from __future__ import annotations

import errno
import random
import socket
import ssl

from nicsplit.testing.memfs import MemFile, MemFilesystem
from nicsplit.testing.procs import ReadyProcess
from nicsplit.wire import envelope, frames as F

# -- D5: power-cut filesystem ----------------------------------------------------


class CrashFilesystem(MemFilesystem):
    """In-memory `Filesystem` that can lose what was not synced."""

    def __init__(self, *, fail_sync_at: int | None = None, fail_write_at: int | None = None) -> None:
        super().__init__()
        self._durable_names: set[str] = set()  # file names made durable by sync_dir
        self.fail_sync_at = fail_sync_at
        self.fail_write_at = fail_write_at
        self.syncs = 0
        self.writes = 0

    def _maybe_fail(self, what: str, name: str) -> None:
        if what == "sync":
            self.syncs += 1
            if self.fail_sync_at is not None and self.syncs >= self.fail_sync_at:
                raise OSError(errno.EIO, "injected fsync failure", name)
        else:
            self.writes += 1
            if self.fail_write_at is not None and self.writes >= self.fail_write_at:
                raise OSError(errno.ENOSPC, "injected write failure", name)

    def _write(self, name: str, data: bytes) -> None:
        self._maybe_fail("write", name)

    def _sync(self, name: str, f: MemFile) -> None:
        self._maybe_fail("sync", name)
        f.durable = bytes(f.data)

    def _sync_dir(self, path: str) -> None:
        self._maybe_fail("sync", path)
        prefix = path + "/"
        self._durable_names = {n for n in self._durable_names if not n.startswith(prefix) or n in self.files}
        self._durable_names |= {n for n in self.files if n.startswith(prefix)}

    def unsynced_bytes(self) -> int:
        return sum(max(0, len(f.data) - len(f.durable)) for f in self.files.values())

    def power_cut(self, mode: str, rng: random.Random) -> "CrashFilesystem":
        """The disk after a power cut.  ``mode``: "drop" (only synced bytes
        survive), "tear" (a random prefix of each unsynced tail survives and
        its last up-to-512 bytes may be garbage), "keep" (the OS happened to
        write everything back)."""
        if mode not in ("drop", "tear", "keep"):
            raise ValueError(f"unknown power-cut mode {mode!r}")
        after = CrashFilesystem()
        after.dirs = set(self.dirs)
        for name, f in self.files.items():
            if name not in self._durable_names and mode != "keep" and (mode == "drop" or rng.random() < 0.5):
                continue  # its directory entry never reached the disk
            data = bytearray(f.durable)
            if mode == "keep":
                data = bytearray(f.data)
            elif mode == "tear" and len(f.data) > len(f.durable) and f.data[: len(f.durable)] == f.durable:
                tail = f.data[len(f.durable) :]
                kept = rng.randint(0, len(tail))
                data += tail[:kept]
                if kept and rng.random() < 0.5:
                    n = rng.randint(1, min(512, kept))
                    data[len(data) - n :] = rng.randbytes(n)
            after.files[name] = MemFile(data, bytes(data))
            after._durable_names.add(name)
        return after


# -- real processes ------------------------------------------------------------------


class ApplianceProcess(ReadyProcess):
    """``nicsplit appliance run`` as a child; ready on its JSON line."""

    what = "appliance"

    def argv(self) -> list[str]:
        return self.listening_cmd("appliance", "run")

    def on_ready(self, msg: dict) -> None:
        self.address = msg["address"]

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.address.rpartition(":")
        return host, int(port)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()


class CardClient:
    """A blocking frame client over TLS (or any connected socket)."""

    def __init__(self, sock: socket.socket, *, timeout: float = 30) -> None:
        self.sock = sock
        self.sock.settimeout(timeout)
        self.dec = F.FrameDecoder()
        self.closed = False

    @classmethod
    def connect(cls, address: tuple[str, int], ctx: ssl.SSLContext | None, *, server_hostname: str = "localhost",
                timeout: float = 30) -> "CardClient":
        raw = socket.create_connection(address, timeout=timeout)
        if ctx is None:
            return cls(raw, timeout=timeout)
        try:
            return cls(ctx.wrap_socket(raw, server_hostname=server_hostname), timeout=timeout)
        except BaseException:
            raw.close()
            raise

    def send(self, frame: F.Frame) -> None:
        self.sock.sendall(F.encode(frame))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> F.Frame | None:
        """The next frame, skipping heartbeats; None on EOF."""
        while True:
            ev = self.dec.next_event()
            if ev is F.NEED_DATA:
                if self.closed:
                    return None
                data = self.sock.recv(65536)
                self.dec.receive_data(data)
                if not data:
                    self.closed = True
                continue
            if isinstance(ev, F.Heartbeat):
                continue
            return ev

    def hello(self, cgs: tuple[str, ...], card_id: str = "test-card") -> F.HelloAck:
        self.send(F.Hello(card_id, F.PROTOCOL_VERSION, cgs))
        ack = self.recv()
        if not isinstance(ack, F.HelloAck):
            raise AssertionError(f"expected HelloAck, got {ack!r}")
        return ack

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "CardClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_batch(batch_id: int, cg: str, records: list[F.Record], key: bytes | None, *, compress: bool = True,
               first_seq: int | None = None, last_seq: int | None = None) -> F.Batch:
    """A sealed batch over ``records`` (seq range and times taken from them)."""
    first = first_seq if first_seq is not None else records[0].seq
    last = last_seq if last_seq is not None else records[-1].seq
    t0 = min((r.time_ns for r in records), default=0)
    t1 = max((r.time_ns for r in records), default=0)
    head = F.Batch(batch_id, cg, first, last, t0, t1, b"")
    body = envelope.seal(F.encode_records(records), key, F.batch_aad(head), compress=compress)
    return F.Batch(batch_id, cg, first, last, t0, t1, body)
