"""Filters in a running host: the error filter's failures reach the client
with the right errno; third-party filters load from their entry point; a
data-observing filter missing a write verb stops the host at start."""

from __future__ import annotations

import errno
import subprocess
import textwrap
from pathlib import Path

import pytest

from nicsplit.testing.datadir import init_data, vdisk
from nicsplit.testing.procs import HostProcess, import_libnbd, libnbd_errno, nbd_connect, nicsplit_cmd

pytestmark = pytest.mark.usefixtures("peers")



@pytest.mark.parametrize("err", ["EIO", "ENOSPC", "EPERM"])
def test_error_filter_errno_reaches_client(tmp_path, host_factory, err):
    data = init_data(
        tmp_path / "d",
        vdisks={"bad": {"filters": ["stats", {"name": "error", "verbs": ["pwrite", "flush"], "errno": err}]}},
    )
    vdisk(data, "bad", "1M")
    vdisk(data, "good", "1M")
    host = host_factory(data)
    nbd = import_libnbd()
    h = nbd_connect(host.uri("bad"))
    with pytest.raises(nbd.Error) as ei:
        h.pwrite(b"w" * 4096, 0)
    assert libnbd_errno(ei.value) == getattr(errno, err)
    with pytest.raises(nbd.Error) as ei:
        h.flush()
    assert libnbd_errno(ei.value) == getattr(errno, err)
    # reads pass; the failed write never reached the datastore
    assert h.pread(4096, 0) == bytes(4096)
    g = nbd_connect(host.uri("good"))
    g.pwrite(b"w" * 4096, 0)
    assert g.pread(4096, 0) == b"w" * 4096


def test_error_filter_trigger_file_and_rate(tmp_path, host_factory, seed):
    trigger = tmp_path / "fail-now"
    data = init_data(
        tmp_path / "d",
        vdisks={"disk": {"filters": [{"name": "error", "verbs": ["pwrite"], "trigger": str(trigger), "rate": 0.5, "seed": seed}]}},
    )
    vdisk(data, "disk", "1M")
    host = host_factory(data)
    nbd = import_libnbd()
    h = nbd_connect(host.uri("disk"))
    for i in range(20):
        h.pwrite(b"a" * 512, i * 512)  # no trigger: never fails
    trigger.touch()
    failed = 0
    for i in range(200):
        try:
            h.pwrite(b"b" * 512, i * 512)
        except nbd.Error as e:
            assert libnbd_errno(e) == errno.EIO
            failed += 1
    assert 50 < failed < 150, failed  # rate 0.5, seeded


FILTER_PKG = {
    "nicsplit_testfilters.py": '''
from nicsplit.host.chain import Filter

class Leaky(Filter):
    """Observes data but forgets trim: must be refused."""
    name = "leaky"
    observes_data = True
    handles_fua = True
    async def pwrite(self, next, offset, data, flags):
        await next.pwrite(offset, data, flags)
    async def zero(self, next, offset, length, flags):
        await next.zero(offset, length, flags)
    async def flush(self, next, flags):
        await next.flush(flags)

class Invert(Filter):
    """Stores every byte inverted; reads invert back. Complete: accepted."""
    name = "invert"
    observes_data = True
    handles_fua = True
    async def pread(self, next, offset, length, flags):
        return bytes(b ^ 0xFF for b in await next.pread(offset, length, flags))
    async def pwrite(self, next, offset, data, flags):
        await next.pwrite(offset, bytes(b ^ 0xFF for b in data), flags)
    async def zero(self, next, offset, length, flags):
        await next.pwrite(offset, b"\\xff" * length, flags)
    async def trim(self, next, offset, length, flags):
        await next.pwrite(offset, b"\\xff" * length, flags)
    async def flush(self, next, flags):
        await next.flush(flags)
''',
    "nicsplit_testfilters-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: nicsplit-testfilters\nVersion: 0.1\n",
    "nicsplit_testfilters-0.1.dist-info/entry_points.txt": "[nicsplit.filters]\nleaky = nicsplit_testfilters:Leaky\ninvert = nicsplit_testfilters:Invert\n",
}


@pytest.fixture
def third_party(tmp_path, monkeypatch) -> Path:
    site = tmp_path / "site"
    for rel, text in FILTER_PKG.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(textwrap.dedent(text))
    monkeypatch.setenv("PYTHONPATH", str(site))
    return site


def test_third_party_filter_from_entry_point(tmp_path, third_party):
    data = init_data(tmp_path / "d", filters=["stats", "invert"])
    vdisk(data, "disk", "1M")
    with HostProcess(data) as host:
        h = nbd_connect(host.uri("disk"))
        h.pwrite(b"\x0f" * 4096, 0)
        assert h.pread(4096, 0) == b"\x0f" * 4096
        h.zero(4096, 8192)
        assert h.pread(4096, 8192) == bytes(4096)
        h.shutdown()
    # The datastore really holds inverted bytes: read it without the filter.
    (data / "nicsplit.toml").write_text((data / "nicsplit.toml").read_text().replace('filters = ["stats", "invert"]', 'filters = []'))
    with HostProcess(data) as host:
        h = nbd_connect(host.uri("disk"))
        assert h.pread(4096, 0) == b"\xf0" * 4096
        h.shutdown()


def test_chain_refuses_observing_filter_missing_a_write_verb(tmp_path, third_party):
    data = init_data(tmp_path / "d", filters=["leaky"])
    vdisk(data, "disk", "1M")
    p = subprocess.run(
        nicsplit_cmd("--data", str(data), "host", "serve", "--listen", "127.0.0.1:0"),
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert p.returncode == 1
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("nicsplit: error: filter 'leaky' observes data but does not implement: trim"), p.stderr
    assert "Traceback" not in p.stderr
