"""Replies out of order, many connections, multi-conn consistency (libnbd)."""

from __future__ import annotations

import pytest

from nicsplit.testing.datadir import init_data, vdisk
from nicsplit.testing.procs import nbd_connect

pytestmark = pytest.mark.usefixtures("peers")



def test_replies_out_of_order(tmp_path, host_factory):
    """A slow flush does not hold back a later write's reply."""
    data = init_data(tmp_path / "d", vdisks={"disk": {"filters": [{"name": "delay", "flush_ms": 300}]}})
    vdisk(data, "disk", "1M")
    host = host_factory(data)
    h = nbd_connect(host.uri("disk"))
    flush = h.aio_flush()
    write = h.aio_pwrite(b"q" * 4096, 0)
    while not h.aio_command_completed(write):
        h.poll(-1)
    assert not h.aio_command_completed(flush), "the write's reply waited for the slow flush"
    while not h.aio_command_completed(flush):
        h.poll(-1)
    assert h.pread(4096, 0) == b"q" * 4096


def test_multi_conn_flush_on_any_connection(data, host_factory, rng):
    vdisk(data, "disk", "4M")
    host = host_factory(data)
    conns = [nbd_connect(host.uri("disk")) for _ in range(4)]
    assert all(c.can_multi_conn() for c in conns)
    expect = {}
    for i in range(64):
        c = conns[i % 4]
        off = rng.randrange(0, 1024) * 4096
        blob = rng.randbytes(4096)
        c.pwrite(blob, off)
        expect[off] = blob
    conns[3].flush()
    for off, blob in expect.items():
        assert conns[rng.randrange(4)].pread(4096, off) == blob


def test_many_clients_many_exports_at_once(data, host_factory, rng):
    names = [f"v{i}" for i in range(6)]
    for n in names:
        vdisk(data, n, "2M")
    host = host_factory(data)
    handles = {n: [nbd_connect(host.uri(n)) for _ in range(3)] for n in names}
    # Keep many requests in flight on every connection at once.
    cookies = []
    for n, hs in handles.items():
        for k, h in enumerate(hs):
            for j in range(16):
                off = (k * 16 + j) * 4096
                cookies.append((h, h.aio_pwrite(bytes([names.index(n) + 1]) * 4096, off)))
    for h, c in cookies:
        while not h.aio_command_completed(c):
            h.poll(-1)
    for n, hs in handles.items():
        got = hs[0].pread(48 * 4096, 0)
        assert got == bytes([names.index(n) + 1]) * (48 * 4096)
