"""The whole NBD server fuzzed through `nicsplit host serve --stdio` (issue 11,
Build 4): Hypothesis byte streams — a valid handshake followed by random or
mutated requests, or a mutated handshake — piped into a real server process.
Whatever comes in, the server answers per protocol or closes, exits 0, and
logs no traceback. A few dozen derandomized streams (each is a process
start); NICSPLIT_FUZZ_SCALE runs more (`nicsplit.testing.fuzz`)."""

from __future__ import annotations

import struct
import subprocess

import pytest
from hypothesis import given, strategies as st

from nicsplit.testing.datadir import vdisk
from nicsplit.testing.fuzz import fuzz_settings
from nicsplit.testing.procs import nicsplit_cmd

IHAVEOPT = 0x49484156454F5054
MAGIC_REQ = 0x25609513
SIZE = 1 << 20


@pytest.fixture
def fuzz_data(data):
    vdisk(data, "a", "1M")
    return data


def handshake(structured: bool) -> bytes:
    name = b"a"
    go = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    opts = struct.pack(">QII", IHAVEOPT, 8, 0) if structured else b""  # STRUCTURED_REPLY
    return struct.pack(">I", 3) + opts + struct.pack(">QII", IHAVEOPT, 7, len(go)) + go


@st.composite
def request(draw) -> bytes:
    cmd = draw(st.integers(0, 12))
    flags = draw(st.one_of(st.integers(0, 31), st.integers(0, 0xFFFF)))
    offset = draw(st.one_of(st.integers(0, SIZE), st.sampled_from([SIZE - 1, (1 << 64) - 1, 1 << 63])))
    length = draw(st.one_of(st.integers(0, 9000), st.sampled_from([0, 1, SIZE, (1 << 32) - 1])))
    data = draw(st.binary(min_size=min(length, 9000), max_size=min(length, 9000))) if cmd == 1 else b""
    if draw(st.booleans()) and data:  # a WRITE whose payload stops short
        data = data[:draw(st.integers(0, len(data)))]
    return struct.pack(">IHHQQI", MAGIC_REQ, flags, cmd, draw(st.integers(0, (1 << 64) - 1)), offset,
                       length) + data


streams = st.one_of(
    st.tuples(st.booleans(), st.lists(request(), max_size=6), st.booleans()).map(
        lambda t: handshake(t[0]) + b"".join(t[1]) + (struct.pack(">IHHQQI", MAGIC_REQ, 0, 2, 0, 0, 0) if t[2] else b"")),
    st.tuples(st.booleans(), st.binary(max_size=200)).map(lambda t: handshake(t[0]) + t[1]),
    st.tuples(st.booleans(), st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1, max_size=4)).map(
        lambda t: bytes(b ^ (v if i in {p % 40 for p, _ in t[1]} else 0)
                        for i, (b, v) in enumerate(zip(handshake(t[0]), [t[1][0][1] or 1] * 99)))),
)


@fuzz_settings(40)
@given(streams)
def test_any_stream_is_answered_or_closed_without_a_traceback(fuzz_data, wire):
    p = subprocess.run(nicsplit_cmd("--data", str(fuzz_data), "host", "serve", "--stdio"), input=wire,
                       capture_output=True, timeout=60)
    err = p.stderr.decode(errors="replace")
    assert p.returncode == 0, err
    assert "Traceback" not in err, err
    assert p.stdout[:16] == b"NBDMAGICIHAVEOPT"
