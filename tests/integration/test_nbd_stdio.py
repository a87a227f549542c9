"""`nicsplit host serve --stdio` (issue 11 Build item 4): the whole server on
stdin/stdout, as nbdkit -s. libnbd runs it as a command (a socketpair); a
fuzzer feeds it pipes. Whatever comes in, the process answers per protocol or
closes, exits 0, and logs no traceback.
"""

from __future__ import annotations

import struct
import subprocess

import pytest

from nicsplit.testing.datadir import vdisk
from nicsplit.testing.procs import import_libnbd, nicsplit_cmd

IHAVEOPT = 0x49484156454F5054
MAGIC_REQ = 0x25609513


@pytest.fixture
def stdio_data(data):
    vdisk(data, "a", "1M")
    return data


def serve_cmd(data) -> list[str]:
    return nicsplit_cmd("--data", str(data), "host", "serve", "--stdio")


def test_libnbd_runs_the_server_as_a_command(stdio_data):
    nbd = import_libnbd()
    h = nbd.NBD()
    h.set_export_name("a")
    h.connect_command(serve_cmd(stdio_data))
    assert h.get_size() == 1 << 20
    h.pwrite(b"\x42" * 8192, 4096)
    h.flush()
    assert h.pread(8192, 4096) == b"\x42" * 8192
    h.shutdown()
    # The data is in the datastore: a second run serves it.
    h = nbd.NBD()
    h.set_export_name("a")
    h.connect_command(serve_cmd(stdio_data))
    assert h.pread(4096, 8192) == b"\x42" * 4096
    h.shutdown()


def conversation() -> bytes:
    name = b"a"
    go = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    return (struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, 7, len(go)) + go
            + struct.pack(">IHHQQI", MAGIC_REQ, 0, 1, 1, 0, 4096) + b"\x7e" * 4096    # WRITE
            + struct.pack(">IHHQQI", MAGIC_REQ, 0, 0, 2, 0, 4096)                     # READ
            + struct.pack(">IHHQQI", MAGIC_REQ, 0, 2, 3, 0, 0))                       # DISC


def test_pipes(stdio_data):
    p = subprocess.run(serve_cmd(stdio_data), input=conversation(), capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr.decode(errors="replace")
    out = p.stdout
    assert out[:16] == b"NBDMAGICIHAVEOPT"
    # The two transmission replies are the last 16 + 16 + 4096 bytes: WRITE ok, READ ok + data.
    tail = out[-(16 + 16 + 4096):]
    assert struct.unpack(">IIQ", tail[:16]) == (0x67446698, 0, 1)
    assert struct.unpack(">IIQ", tail[16:32]) == (0x67446698, 0, 2)
    assert tail[32:] == b"\x7e" * 4096
    assert b"Traceback" not in p.stderr


@pytest.mark.parametrize("wire", [b"NBD", struct.pack(">I", 3) + b"NOTMAGIC" + bytes(8), struct.pack(">I", 1 << 20)],
                         ids=["short", "bad option magic", "bad client flags"])
def test_a_bad_handshake_is_one_log_line(stdio_data, wire):
    p = subprocess.run(serve_cmd(stdio_data), input=wire, capture_output=True, timeout=60)
    err = p.stderr.decode(errors="replace")
    assert p.returncode == 0 and "Traceback" not in err and "closing connection" in err, err
    assert p.stdout[:8] == b"NBDMAGIC"


def test_garbage_in_is_refused_without_a_traceback(stdio_data, rng):
    good = conversation()
    for _ in range(6):
        data = bytearray(good)
        for _ in range(rng.randrange(1, 8)):   # flip a few bytes, or cut it short
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            data = data[:rng.randrange(len(data))]
        p = subprocess.run(serve_cmd(stdio_data), input=bytes(data), capture_output=True, timeout=60)
        err = p.stderr.decode(errors="replace")
        assert p.returncode == 0 and "Traceback" not in err, err
